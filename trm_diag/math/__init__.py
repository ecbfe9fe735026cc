"""Pure math over tensors and arrays: divergences, views, sampling, bounds, metrics, masks, statistics.

No I/O and nothing from report/, run/, backends/ or cli/ (import-linter contracts in pyproject.toml).
"""
