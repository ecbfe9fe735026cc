"""trm-diag: audit the rollout/training policy mismatch with the math of Trust Region Masking.

The library API, independent of the package layout (docs/architecture.md): each name below is
imported on first use, so ``import trm_diag`` loads neither torch nor an engine.

    from trm_diag import CompareConfig, load_report, parse_spec, run_compare
    m = "sample_data/tiny-llama"
    cfg = CompareConfig(rollout=parse_spec(f"hf:dtype=bfloat16,model={m}"),
                        train=parse_spec(f"hf:dtype=float32,model={m}"), model=m, out="trm-report")
    result = run_compare(cfg)  # result.summary: summary.json's content
    report = load_report(result.out_dir)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (one place: a new public name is one line here)
API: dict[str, str] = {
    "run_compare": "trm_diag.run.pipeline",
    "run_score": "trm_diag.run.score",
    "CompareConfig": "trm_diag.run.pipeline",
    "ScoreConfig": "trm_diag.run.score",
    "CompareResult": "trm_diag.run.pipeline",
    "run_sweep": "trm_diag.run.sweep",
    "SweepConfig": "trm_diag.run.sweep",
    "run_locate": "trm_diag.run.locate",
    "Monitor": "trm_diag.run.monitor",
    "MonitorResult": "trm_diag.run.monitor",
    "LocateConfig": "trm_diag.run.locate",
    "SamplingConfig": "trm_diag.config",
    "Thresholds": "trm_diag.config",
    "parse_spec": "trm_diag.backends",
    "load_report": "trm_diag.report.tables",
    "complete_report": "trm_diag.report.tables",
    "read_table": "trm_diag.report.tables",
    "verdict": "trm_diag.report.verdict",
    "BoundInputs": "trm_diag.math.bounds",
    "bounds_table": "trm_diag.math.bounds",
    "TrmDiagError": "trm_diag.errors",
}
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name in API:
        value = getattr(import_module(API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trm_diag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
