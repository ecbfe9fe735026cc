"""`trm-diag bounds`: gather inputs (parameters or a report), evaluate, render.

Imports only numpy and rich on the parameter path (pandas/pyarrow only with --report),
so the command answers in well under a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trm_diag.bounds import BOUND_NAMES, BoundInputs, bounds_table, max_delta_for_budget
from trm_diag.errors import UsageError
from trm_diag.outputs import check_output_file
from trm_diag.report import to_json


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

    _, summary = complete_report(report)
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


def run_bounds(
    *,
    delta: float | None,
    eps: float | None,
    kl_seq: float | None,
    tv_seq: float | None,
    kl_rate: float | None,
    report: str | None,
    horizons: tuple[int, ...],
    budget: float | None,
    json_out: bool,
    plot: str | None,
    out_console: Console,
    err_console: Console,
) -> None:
    from trm_diag.summary import bounds_rich_table, fmt

    if report is not None:
        if any(v is not None for v in (delta, eps, kl_seq, tv_seq)):
            raise UsageError("--report cannot be combined with --delta/--eps/--kl-seq/--tv-seq", "use one mode")
        inp = report_inputs(report)
    else:
        if delta is None and eps is None and budget is None:
            given = [
                f"--{k.replace('_', '-')}"
                for k, v in (("kl_seq", kl_seq), ("tv_seq", tv_seq), ("kl_rate", kl_rate))
                if v is not None
            ]
            if given:
                raise UsageError(
                    f"no bound from {' and '.join(given)} alone: every bound needs the token-level maxima",
                    "add --delta (max token KL) and/or --eps (max token TV), or use --report DIR",
                )
            raise UsageError(
                "no inputs given", "pass --delta (and --eps, --kl-seq, --tv-seq), --report DIR, or --budget"
            )
        inp = parameter_inputs(delta, eps, kl_seq, tv_seq, kl_rate)
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise UsageError(f"--budget {budget} is invalid", "use a positive number (1 = the reward range)")
    if plot:
        check_output_file(plot, "--plot")
    rows = bounds_table(list(horizons), inp) if (inp.delta is not None or inp.eps is not None) else []
    inverse = None
    if budget is not None:
        inverse = {}
        for T in horizons:
            d = max_delta_for_budget(T, budget, inp.kl_rate)
            inverse[T] = {"delta": d, "eps": math.sqrt(d / 2.0), "budget": budget}
    if report is not None:
        _write_bounds_parquet(Path(report), rows)
    if plot:
        _plot(rows, plot)
    if json_out:
        print(to_json(bounds_json(rows, inp, inverse)))  # strict JSON: infinite bounds are null
        return
    if rows:
        out_console.print(bounds_rich_table(rows))
        src = rows[-1]["sources"]
        out_console.print(f"[dim]inputs: delta={fmt(inp.delta)} eps={fmt(inp.eps)} D_KL^seq={fmt(inp.kl_seq)} "
                          f"D_TV^seq={fmt(inp.tv_seq)} ({src})[/dim]")  # fmt: skip
    if inverse is not None:
        t = Table(title=f"Largest token-level delta with B* <= {budget:g} (eps = sqrt(delta/2))", title_justify="left")
        t.add_column("T", justify="right")
        t.add_column("max delta (TRM-Max threshold)", justify="right")
        t.add_column("matching eps", justify="right")
        for T, v in inverse.items():
            t.add_row(f"{T:,}", fmt(v["delta"]), fmt(v["eps"]))
        out_console.print(t)
        out_console.print(
            "[dim]For comparison: the paper's runs use TRM-Max delta = 0.05; at T in the thousands that "
            "makes B* far above 1 (vacuous).[/dim]"
        )


def _write_bounds_parquet(report: Path, rows: list[dict]) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trm_diag.report import META_KEY, atomic_write, read_schema

    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    old = read_schema(report / "tokens.parquet").metadata or {}
    if META_KEY in old:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: old[META_KEY]})
    atomic_write(report / "bounds.parquet", lambda tmp: pq.write_table(table, tmp))


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib", "pip install 'trm-diag[plot]' (or pip install matplotlib)"
        ) from None
    from trm_diag.bounds import LABEL

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in BOUND_NAMES:
        pts = sorted((r["T"], r["value"]) for r in rows if r["bound"] == name and r["value"] is not None)
        if pts and all(v > 0 for _, v in pts):
            ax.plot(*zip(*pts), marker="o", label=LABEL[name], lw=2.5 if name == "unified" else 1)
    ax.axhspan(1, ax.get_ylim()[1] if ax.get_ylim()[1] > 1 else 10, color="red", alpha=0.08, label="vacuous (>= 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("horizon T")
    ax.set_ylabel("bound on surrogate error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
