"""`trm-diag trend`: a training run's mismatch versus step, and what changed when."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from trm_diag.cli.console import err_console, out_console
from trm_diag.errors import UsageError

if TYPE_CHECKING:
    from trm_diag.report.trend_report import TrendResult


def trend(
    run: Annotated[
        str, typer.Argument(help="Run folder of trm_diag.Monitor, or a `score` report of a multi-step dump.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    rows: Annotated[int, typer.Option(help="Steps printed at most (evenly spaced; flagged steps always).")] = 30,
    window: Annotated[int, typer.Option(help="Trailing steps that set a step's noise floor (spikes).")] = 20,
    spike_z: Annotated[float, typer.Option(help="Robust z-score from which a step's gap is a spike.")] = 6.0,
    drift_window: Annotated[int, typer.Option(help="Steps over which a drift's slope is fitted.")] = 50,
    write_html: Annotated[
        bool,
        typer.Option(
            "--html",
            help="Write the run's page (figures versus step, flags; RUN/report.html, or trend.html in a score "
            "report) and say where.",
        ),
    ] = False,
) -> None:
    """The metrics versus step (k1, k3, |log ratio|, TRM acceptance, B* at the horizons) and flags: a spike
    above the run's noise floor (check weight sync / staleness), a sustained drift (its rate per 100 steps),
    acceptance below 70% (its first step). Rules: docs/trend.md.

    Example: trm-diag trend runs/exp1
    """
    from trm_diag.math.trend import TrendConfig
    from trm_diag.report.trend_report import run_trend

    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt} is unknown", "use text or json")
    if rows < 1 or window < 2 or drift_window < 3 or not spike_z > 0:
        raise UsageError(
            "--rows must be >= 1, --window >= 2, --drift-window >= 3 and --spike-z > 0",
            "e.g. --window 20 --spike-z 6 --drift-window 50",
        )
    cfg = TrendConfig(window=window, min_window=min(5, window), spike_z=spike_z, drift_window=drift_window,
                      drift_min=min(20, drift_window))  # fmt: skip
    res = run_trend(run, cfg)
    if write_html:
        write_page(res)
        return
    if fmt == "json":
        from trm_diag.report.tables import to_json

        print(to_json(res.as_dict()))
        return
    from trm_diag.cli.trend import render_trend

    render_trend(out_console, res, rows)


def write_page(res: TrendResult) -> None:
    """Write the run's page (report/trend_html.py) and say where."""
    from rich.markup import escape

    from trm_diag.report.trend_html import write_trend_html

    path = write_trend_html(res)
    err_console.print(f"wrote {escape(str(path))} (open it in a browser; no network needed)", soft_wrap=True)
