"""`trm-diag gate`: gather rules, evaluate them against a report, print and write the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trm_diag.errors import ExitCode, UsageError
from trm_diag.gate import (
    ReportMetrics,
    collect_rules,
    evaluate,
    parse_rule,
    require_comparable,
    to_github,
    to_json,
    to_junit,
)
from trm_diag.gate import to_markdown as gate_markdown
from trm_diag.outputs import check_output_file

FORMATS = ("table", "json", "junit", "github")


def run_gate(
    *,
    report: str,
    rules: list[str],
    config: Path | None,
    baseline: str | None,
    fmt: str,
    output: str | None,
    list_metrics: bool,
    out_console: Console,
    strict: bool = False,
    warn: Callable[[str], None] = print,
) -> int:
    from trm_diag.cli.numbers import fmt as fmt_num

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt} is unknown", f"use one of: {', '.join(FORMATS)}")
    rep = ReportMetrics(report)
    if output:  # checked before any work: a passing gate must not fail on its output path
        inputs = [f for d in (report, baseline) if d for f in Path(d).iterdir()] + ([config] if config else [])
        check_output_file(output, "--output", inputs=inputs)
    if list_metrics:
        names = rep.names()
        if fmt == "json":
            from trm_diag.report import to_json as json_text

            print(json_text({n: rep.value(n) for n in names}))
        else:
            t = Table(title=f"Metrics of {report}", title_justify="left")
            t.add_column("metric")
            t.add_column("value", justify="right")
            for n in names:
                t.add_row(n, fmt_num(rep.value(n)))
            out_console.print(t)
        return int(ExitCode.OK)
    parsed = [parse_rule(r) for r in collect_rules(rules, config)]
    base = ReportMetrics(baseline) if baseline else None
    if base is not None:
        names = (f"baseline {baseline}", str(report))
        require_comparable(base.summary, rep.summary, names, strict, warn, "relative rules compare unlike things")
    results = evaluate(parsed, rep, base)
    text = {
        "json": lambda: to_json(results, report, baseline),
        "junit": lambda: to_junit(results, report),
        "github": lambda: to_github(results),
    }
    if fmt == "table":
        t = Table(
            title=f"trm-diag gate: {report}" + (f" vs baseline {baseline}" if baseline else ""), title_justify="left"
        )
        for c in ("rule", "value", "threshold", "result"):
            t.add_column(c, justify="right" if c in ("value", "threshold") else "left")
        for r in results:
            verdict = Text("PASS", style="bold green") if r.passed else Text("FAIL", style="bold red")
            if r.note:
                verdict.append(f" ({r.note})", style="dim")
            t.add_row(r.rule.text, fmt_num(r.value), fmt_num(r.threshold), verdict)
        out_console.print(t)
        failed = sum(not r.passed for r in results)
        out_console.print(f"{len(results) - failed}/{len(results)} rules passed")
        for r in results:
            if not r.passed:
                out_console.print(Text(f"FAILED {r.rule.text}: {r.miss()}", style="red"))
        if failed:
            out_console.print(f"Why: trm-diag show {report}   (or open {Path(report) / 'report.html'})")
    else:
        print(text[fmt](), end="" if fmt != "json" else "\n")
    if fmt == "github" and os.environ.get("GITHUB_STEP_SUMMARY"):  # GitHub renders this file on the job page
        from trm_diag.cli.render import to_markdown
        from trm_diag.verdict import verdict

        if "verdict" not in rep.summary:  # reports written before verdicts existed
            rep.summary["verdict"] = verdict(rep.summary)
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
            f.write(gate_markdown(results, report) + "\n" + to_markdown(rep.summary) + "\n")
    if output:
        from trm_diag.report import atomic_write

        content = text["json"]() + "\n" if fmt == "table" else text[fmt]()
        atomic_write(Path(output), lambda tmp: Path(tmp).write_text(content))
    return int(ExitCode.OK if all(r.passed for r in results) else ExitCode.GATE_FAILED)
