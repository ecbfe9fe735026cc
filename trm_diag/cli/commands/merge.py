"""`trm-diag merge`: combine shard reports into one."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, print_report
from trm_diag.cli.options import JsonOpt, OutOpt, OverwriteOpt, QuietOpt


def merge(
    reports: Annotated[list[str], typer.Argument(help="Shard report folders (from compare --shard I/N).")],
    out: OutOpt = "trm-report",
    overwrite: OverwriteOpt = False,
    partial: Annotated[
        bool,
        typer.Option(
            "--partial",
            help="Merge an incomplete set of shards (one is missing): the report covers their prompts only, "
            "and summary.json's coverage says which shards it lacks.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Combine shard reports into one report; statistics are recomputed from the rows, not averaged.

    Every shard of the --shard I/N split must be given (or --partial).
    Example: trm-diag compare --shard 0/2 --out s0 && trm-diag compare --shard 1/2 --out s1 && trm-diag merge s0 s1 --out all
    """
    from trm_diag.run.merge import run_merge

    out_dir, summary = run_merge(reports, out, overwrite, warn=RichReporter(quiet).warn, partial=partial)
    print_report(summary, out_dir, json_out)
