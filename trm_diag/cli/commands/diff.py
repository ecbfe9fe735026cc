"""`trm-diag diff`: two reports side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, out_console
from trm_diag.errors import UsageError


def diff(
    baseline: Annotated[str, typer.Argument(help="The older report (A).")],
    report: Annotated[str, typer.Argument(help="The newer report (B).")],
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    strict: Annotated[
        bool,
        typer.Option(
            help="Refuse reports that differ in model, tokenizer, tier, prompts, sampling, thresholds, view or "
            "horizons (default: warn)."
        ),
    ] = False,
    same_below: Annotated[
        float | None,
        typer.Option(help="Relative changes at or below this read as unchanged (float noise). Default: 1e-6."),
    ] = None,
) -> None:
    """Two reports side by side: what got better or worse, and by how much (B against A).

    Example: trm-diag diff ./before-upgrade ./after-upgrade
    """
    from trm_diag.report.diff import SAME_BELOW, run_diff
    from trm_diag.report.tables import to_json

    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt} is unknown", "use text or json")
    tolerance = SAME_BELOW if same_below is None else same_below
    result = run_diff(baseline, report, strict, tolerance, RichReporter(quiet=True).warn)
    if fmt == "json":
        print(to_json(result))
        return
    from trm_diag.cli.render import render_diff

    render_diff(out_console, result, baseline, report)
