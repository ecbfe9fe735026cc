"""`trm-diag gate`: check rules against a report (the work is in cli/gate.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, out_console


def gate(
    report: Annotated[
        str, typer.Argument(help="Report folder written by `trm-diag compare`, or a run folder of trm_diag.Monitor.")
    ],
    rule: Annotated[
        list[str] | None,
        typer.Option("--rule", "-r", help="Rule '<metric> <op> <value>', e.g. 'token.kl.p99 <= 1e-3'. Repeatable."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="TOML file with rules = \\[...] (top level, \\[gate] or \\[tool.trm-diag.gate]). "
            "Default: \\[tool.trm-diag.gate] of ./pyproject.toml when no --rule is given."
        ),
    ] = None,  # fmt: skip
    baseline: Annotated[
        str | None, typer.Option(help="Older report for relative rules: 'token.kl.p99 <= 1.2 * baseline'.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table, json, junit or github (workflow annotations).")
    ] = "table",
    output: Annotated[
        str | None, typer.Option(help="Also write the result to this file (JSON for table, else the chosen format).")
    ] = None,
    list_metrics: Annotated[
        bool, typer.Option("--list-metrics", help="List every metric name with its value.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(help="Refuse a --baseline of another model, tokenizer or fidelity tier (default: warn)."),
    ] = False,
    bitwise: Annotated[
        bool,
        typer.Option(
            help="Certify bit-for-bit equality: pass only when no sampled-token log-prob (and, in the exact tier, "
            "no full row) differs by any bit between the sides; adds its rules to any --rule."
        ),
    ] = False,
) -> None:
    """Check rules against a report: exit 0 when all hold, 1 when any fails, 2 on a usage or input error or a
    report whose two sides are not comparable.

    Metric names: token.<column>.<stat>, seq.<column>.<stat> (stat: mean p50 p90 p99 p999 max min),
    accept.<criterion>, bounds.<bound>@<T>, metrics.<name>, routing.flip_rate, views.<view>.<stat>,
    breakdown.<bucket>.<stat> (`--list-metrics` lists them all). A run folder (trm_diag.Monitor): trend.<last|first|
    max|min|mean>.<metric>, trend.flags, trend.flags.<spike|drift|acceptance>, trend.steps (docs/trend.md).
    Example: trm-diag gate ./trm-report -r 'token.kl.p99 <= 1e-3' -r 'accept.trm_max >= 0.7'
    """
    from pathlib import Path

    from trm_diag.cli.gate import run_gate

    code = run_gate(
        report=report, rules=rule or [], config=Path(config) if config else None,
        baseline=baseline, fmt=fmt, output=output, list_metrics=list_metrics,
        out_console=out_console, strict=strict, warn=RichReporter(quiet=True).warn, bitwise=bitwise,
    )  # fmt: skip
    raise typer.Exit(code)
