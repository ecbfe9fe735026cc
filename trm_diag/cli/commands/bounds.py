"""`trm-diag bounds`: the bounds of the paper versus horizon T (the work is in cli/bounds.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import err_console, out_console
from trm_diag.config import parse_horizons


def bounds(
    delta: Annotated[float | None, typer.Option(help="D_KL^{tok,max}: max token-level KL(p||q).")] = None,
    eps: Annotated[
        float | None, typer.Option(help="D_TV^{tok,max}: max token-level TV (default: Pinsker min(1, sqrt(delta/2))).")
    ] = None,
    kl_seq: Annotated[
        float | None, typer.Option(help="D_KL^seq: sequence-level KL (used at every T; not with --kl-rate).")
    ] = None,
    tv_seq: Annotated[
        float | None, typer.Option(help="D_TV^seq: sequence-level TV (default: Pinsker from --kl-seq).")
    ] = None,
    kl_rate: Annotated[
        float | None, typer.Option(help="Mean per-token KL: models D_KL^seq(T) = T * rate (also for --budget).")
    ] = None,
    report: Annotated[
        str | None, typer.Option(help="Measured mode: read the inputs from a report folder (read only; see --write).")
    ] = None,
    horizons: Annotated[
        str, typer.Option(help="Comma-separated horizons T (with --report, its observed max length is added).")
    ] = "256,1024,4096,16384",
    budget: Annotated[
        float | None,
        typer.Option(
            help="Inverse view: largest delta with B* <= budget, per T; D_KL^seq = T * per-token KL rate "
            "(the report's, or --kl-rate; else T * delta)."
        ),
    ] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write", help="With --report: add rows for new horizons to its bounds.parquet (keeps its rows)."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
    plot: Annotated[
        str | None, typer.Option(help="Write a log-log plot of the bounds versus T (needs matplotlib).")
    ] = None,
) -> None:
    """Tables of every bound of the paper versus horizon T, from parameters or from a report.

    Example (the paper's table): trm-diag bounds --delta 1e-4 --eps 5e-3 --kl-seq 0.01 --tv-seq 0.05 --horizons 4096
    """
    from trm_diag.cli.bounds import run_bounds

    run_bounds(
        delta=delta, eps=eps, kl_seq=kl_seq, tv_seq=tv_seq, kl_rate=kl_rate, report=report,
        horizons=parse_horizons(horizons), budget=budget, write=write, json_out=json_out, plot=plot,
        out_console=out_console, err_console=err_console,
    )  # fmt: skip
