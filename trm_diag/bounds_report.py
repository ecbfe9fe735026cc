"""The bounds of a report or of given parameters: inputs, JSON, bounds.parquet and the plot.

No printing (cli/bounds.py renders). Imports only numpy on the parameter path (pandas/pyarrow
only for a report), so `trm-diag bounds` answers in well under a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trm_diag.bounds import BOUND_NAMES, LABEL, UNIFIED, BoundInputs
from trm_diag.errors import UsageError


def _check_nonneg(**values: float | None) -> None:
    for name, v in values.items():
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} {v} is invalid", "divergences are finite and >= 0")


def parameter_inputs(
    delta: float | None, eps: float | None, kl_seq: float | None, tv_seq: float | None, kl_rate: float | None
) -> BoundInputs:
    """Inputs from command-line parameters; eps defaults to Pinsker sqrt(delta/2)."""
    _check_nonneg(delta=delta, eps=eps, kl_seq=kl_seq, tv_seq=tv_seq, kl_rate=kl_rate)
    if tv_seq is not None and tv_seq > 1:
        raise UsageError(f"--tv-seq {tv_seq} exceeds 1", "a total variation lies in [0, 1]")
    if eps is not None and eps > 1:
        raise UsageError(f"--eps {eps} exceeds 1", "a total variation lies in [0, 1]")
    inp = BoundInputs(delta=delta, eps=eps, kl_seq=kl_seq, tv_seq=tv_seq, kl_rate=kl_rate)
    if eps is None and delta is not None:
        inp.eps = min(1.0, math.sqrt(delta / 2.0))  # a TV is at most 1, whatever Pinsker allows
        inp.source["eps"] = "modelled: Pinsker sqrt(delta/2), at most 1"
    return inp


def report_inputs(report: str) -> BoundInputs:
    """Measured inputs of a report folder: as the run saved them, else recomputed from its tables."""
    from trm_diag.report import complete_report

    _, summary = complete_report(report, tables=False)
    saved = BoundInputs.from_dict(summary.get("bound_inputs"))
    if saved is not None:
        return saved
    from trm_diag.metrics import bound_inputs
    from trm_diag.report import load_report

    data = load_report(report)
    return bound_inputs(data["tokens"], data["sequences"], fidelity=data["summary"]["fidelity"])


def bounds_json(rows: list[dict], inp: BoundInputs, inverse: dict[int, dict] | None) -> dict[str, Any]:
    by_t: dict[str, dict[str, float | None]] = {}
    for r in rows:
        by_t.setdefault(str(r["T"]), dict.fromkeys(BOUND_NAMES))[r["bound"]] = r["value"]
    out: dict[str, Any] = {
        "bounds": by_t,
        "inputs": {
            "delta": inp.delta,
            "eps": inp.eps,
            "kl_seq": inp.kl_seq,
            "tv_seq": inp.tv_seq,
            "kl_rate": inp.kl_rate,
            "source": inp.source,
            "samples": inp.samples,
        },  # fmt: skip
    }
    if inverse is not None:
        out["max_delta"] = {str(T): v for T, v in inverse.items()}
    return out


def write_bounds_parquet(report: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trm_diag.report import META_KEY, atomic_write, read_schema

    table = pa.Table.from_pylist(rows)
    old = read_schema(report / "tokens.parquet").metadata or {}
    if META_KEY in old:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: old[META_KEY]})
    atomic_write(report / "bounds.parquet", lambda tmp: pq.write_table(table, tmp))


def plot_bounds(rows: list[dict], path: str, observed_T: int | None = None) -> None:
    """`bounds --plot`: every bound and B* against T (plots.bounds_png), written as a PNG."""
    try:
        from trm_diag.plots import bounds_png

        png = bounds_png(rows, LABEL, UNIFIED, observed_T)
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install matplotlib (install.sh installs it)") from None
    Path(path).write_bytes(png)
