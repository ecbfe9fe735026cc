"""`trm-diag bounds`: gather inputs (parameters or a report), evaluate, render (bounds_report.py
holds everything but the rendering)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trm_diag.errors import UsageError
from trm_diag.math.bounds import BoundInputs, BudgetDelta, bounds_table, delta_for_budget, pinsker_conflicts
from trm_diag.report.bounds_report import (
    bounds_json,
    merge_bounds_parquet,
    parameter_inputs,
    plot_bounds,
    report_inputs,
    used_inputs,
)
from trm_diag.report.outputs import check_output_file
from trm_diag.report.tables import to_json


def _check_parameters(
    delta: float | None, eps: float | None, kl_seq: float | None, tv_seq: float | None, kl_rate: float | None,
    budget: float | None,
) -> None:  # fmt: skip
    """Refuse parameters that no output would use."""
    if kl_seq is not None and kl_rate is not None:
        raise UsageError(
            "--kl-seq and --kl-rate both set D_KL^seq (--kl-seq as it is at every T, --kl-rate as T * rate)",
            "pass one of them",
        )
    if delta is None and eps is None:
        given = [
            f"--{k.replace('_', '-')}"
            for k, v in (("kl_seq", kl_seq), ("tv_seq", tv_seq), ("kl_rate", kl_rate))
            if v is not None and not (k == "kl_rate" and budget is not None)
        ]
        if given:
            raise UsageError(
                f"no bound from {' and '.join(given)} alone: every bound needs the token-level maxima"
                + (" (--budget uses --kl-rate only)" if budget is not None else ""),
                "add --delta (max token KL) and/or --eps (max token TV), or use --report DIR",
            )
        if budget is None:
            raise UsageError(
                "no inputs given", "pass --delta (and --eps, --kl-seq, --tv-seq), --report DIR, or --budget"
            )


def _report_horizons(horizons: tuple[int, ...], inp: BoundInputs) -> list[int]:
    """The asked horizons and the report's observed max length (the T of its verdict and bounds_at_observed_T)."""
    from trm_diag.config import MAX_HORIZON

    seen = inp.seq_T
    extra = {seen} if isinstance(seen, int) and not isinstance(seen, bool) and 1 <= seen <= MAX_HORIZON else set()
    return sorted({*horizons, *extra})


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
    write: bool = False,
    json_out: bool,
    plot: str | None,
    out_console: Console,
    err_console: Console,
) -> None:
    from trm_diag.cli.render import bounds_rich_table

    if report is not None:
        if any(v is not None for v in (delta, eps, kl_seq, tv_seq, kl_rate)):
            raise UsageError(
                "--report cannot be combined with --delta/--eps/--kl-seq/--tv-seq/--kl-rate",
                "use one mode: the report's measured inputs, or parameters",
            )
    elif write:
        raise UsageError(
            "--write needs --report DIR", "pass --report DIR: --write adds its --horizons rows to DIR/bounds.parquet"
        )
    else:
        _check_parameters(delta, eps, kl_seq, tv_seq, kl_rate, budget)
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise UsageError(f"--budget {budget} is invalid", "use a positive number (1 = the reward range)")
    if report is not None:
        inp = report_inputs(report)
        ts = _report_horizons(horizons, inp)
    else:
        inp = parameter_inputs(delta, eps, kl_seq, tv_seq, kl_rate)
        ts = list(horizons)
        for w in pinsker_conflicts(delta, eps, kl_seq, tv_seq):
            err_console.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    rows = bounds_table(ts, inp) if (inp.delta is not None or inp.eps is not None) else []
    if plot:
        if not rows:
            raise UsageError("--plot has no bounds to draw (--budget alone gives the inverse view only)",
                             "add --delta and/or --eps, or drop --plot")  # fmt: skip
        inputs = list(Path(report).iterdir()) if report is not None else []  # the report is never overwritten
        check_output_file(plot, "--plot", inputs=inputs)
    if write and not rows:
        raise UsageError(f"--write: the report '{report}' has no delta or eps, so no bound to add", "drop --write")
    inverse = None if budget is None else {T: delta_for_budget(T, budget, inp.kl_rate) for T in ts}
    if write:
        added = merge_bounds_parquet(Path(report), rows)
        kept = "the rows already there kept"
        err_console.print(
            f"{report}/bounds.parquet: added T = {', '.join(f'{T:,}' for T in added)} ({kept})"
            if added
            else f"{report}/bounds.parquet already holds every horizon asked for: left as it was"
        )
    if plot:
        plot_bounds(rows, plot, inp.seq_T)
    if json_out:
        print(to_json(bounds_json(rows, inp, inverse)))  # strict JSON: infinite bounds are null
        return
    if rows:
        out_console.print(bounds_rich_table(rows))
        _print_used(out_console, rows)
    if inverse is not None:
        _print_inverse(out_console, inverse, budget, measured=report is not None)


def _print_used(console: Console, rows: list[dict]) -> None:
    """The inputs each horizon's bounds used (D_KL^seq and D_TV^seq change with T), and their sources."""
    from trm_diag.cli.render import fmt

    used = used_inputs(rows)
    t = Table(title="Inputs each horizon used", title_justify="left")
    for col in ("T", "delta", "eps", "D_KL^seq", "D_TV^seq"):
        t.add_column(col, justify="right")
    for T, u in used.items():
        t.add_row(f"{T:,}", *(fmt(u[k]) for k in ("delta", "eps", "kl_seq", "tv_seq")))
    console.print(t)
    by_source: dict[str, list[int]] = {}
    for T, u in used.items():
        by_source.setdefault(u["sources"], []).append(T)
    for src, ts in by_source.items():
        where = "every T" if len(by_source) == 1 else "T = " + ", ".join(f"{T:,}" for T in ts)
        console.print(f"[dim]sources at {where}: {escape(src)}[/dim]")


def _print_inverse(console: Console, inverse: dict[int, BudgetDelta], budget: float, measured: bool) -> None:
    from trm_diag.cli.render import fmt

    t = Table(
        title=f"Largest token-level delta with B* <= {budget:g} (eps = min(1, sqrt(delta/2)))", title_justify="left"
    )
    t.add_column("T", justify="right")
    t.add_column("max delta (TRM-Max threshold)", justify="right")
    t.add_column("matching eps", justify="right")
    for T, v in inverse.items():
        t.add_row(f"{T:,}", "any delta" if v.delta is None else fmt(v.delta), "-" if v.eps is None else fmt(v.eps))
    console.print(t)
    v = next(iter(inverse.values()))
    if v.kl_rate is not None:
        whose = " (the report's measured per-token KL)" if measured else " (--kl-rate)"
    else:
        whose = "; the report holds no per-token KL rate" if measured else "; --kl-rate gives a measured rate"
    console.print(f"[dim]sequence terms: {escape(v.assumption)}{whose}; D_TV^seq by Pinsker; "
                  "Dbar_t = min(1, eps, sqrt(delta/2))[/dim]")  # fmt: skip
    if any(x.delta is None for x in inverse.values()):
        console.print(f"[dim]any delta: B* stays <= {budget:g} however large delta is (B* never exceeds "
                      "4 (T - 1), and is 0 at T = 1)[/dim]")  # fmt: skip
    console.print(
        "[dim]For comparison: the paper's runs use TRM-Max delta = 0.05; at T in the thousands that "
        "makes B* far above 1 (vacuous).[/dim]"
    )
