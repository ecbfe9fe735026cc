"""The bounds of a report or of given parameters: inputs, JSON, bounds.parquet and the plot.

No printing (cli/bounds.py renders). Imports only numpy on the parameter path (pandas/pyarrow
only for a report), so `trm-diag bounds` answers in well under a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trm_diag.errors import UsageError
from trm_diag.math.bounds import BOUND_NAMES, LABEL, UNIFIED, BoundInputs, BudgetDelta


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
    from trm_diag.report.tables import complete_report

    _, summary = complete_report(report, tables=False)
    saved = BoundInputs.from_dict(summary.get("bound_inputs"))
    if saved is not None:
        return saved
    from trm_diag.math.metrics import bound_inputs
    from trm_diag.report.tables import load_report

    data = load_report(report)
    return bound_inputs(data["tokens"], data["sequences"], fidelity=data["summary"]["fidelity"])


def used_inputs(rows: list[dict]) -> dict[int, dict[str, Any]]:
    """Per horizon, the inputs its bounds used (the same at every bound of a horizon) and their sources."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["T"], {k: r[k] for k in ("delta", "eps", "kl_seq", "tv_seq", "sources")})
    return out


def bounds_json(rows: list[dict], inp: BoundInputs, inverse: dict[int, BudgetDelta] | None) -> dict[str, Any]:
    """`bounds --json`: bounds per T, the inputs as given or measured, the inputs each T used, the inverse view."""
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
            "tv_rate": inp.tv_rate,
            "seq_T": inp.seq_T,
            "source": inp.source,
            "samples": inp.samples,
        },  # fmt: skip
        "used": {str(T): u for T, u in used_inputs(rows).items()},
    }
    if inverse is not None:
        out["max_delta"] = {
            str(T): {
                "delta": v.delta,
                "eps": v.eps,
                "budget": v.budget,
                "kl_rate": v.kl_rate,
                "assumption": v.assumption,
            }
            for T, v in inverse.items()
        }
    return out


def merge_bounds_parquet(report: Path, rows: list[dict]) -> list[int]:
    """Add the rows of horizons not yet in REPORT/bounds.parquet; the rows already there (the run's own,
    observed length included) are kept as they are. Returns the horizons added (none: file untouched)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trm_diag.report.tables import META_KEY, atomic_write, read_schema, read_table

    f = report / "bounds.parquet"
    old = read_table(f) if f.is_file() else None  # a damaged file is an InputError, never overwritten
    have = set() if old is None else set(old.column("T").to_pylist())
    new = [r for r in rows if r["T"] not in have]
    if not new:
        return []
    table = pa.Table.from_pylist(new)
    if old is not None:
        table = pa.concat_tables([old.replace_schema_metadata(None), table], promote_options="permissive")
        table = table.sort_by([("T", "ascending")])  # a stable sort: each horizon keeps its bound order
    meta = (old.schema.metadata if old is not None else read_schema(report / "tokens.parquet").metadata) or {}
    if META_KEY in meta:
        table = table.replace_schema_metadata({META_KEY: meta[META_KEY]})
    atomic_write(f, lambda tmp: pq.write_table(table, tmp))
    return sorted({r["T"] for r in new})


def plot_bounds(rows: list[dict], path: str, observed_T: int | None = None) -> None:
    """`bounds --plot`: every bound and B* against T (plots.bounds_png), written as a PNG."""
    try:
        from trm_diag.report.plots import bounds_png

        png = bounds_png(rows, LABEL, UNIFIED, observed_T)
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install matplotlib (install.sh installs it)") from None
    from trm_diag.report.tables import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(png))  # never a half-written file
