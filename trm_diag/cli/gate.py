"""`trm-diag gate`: gather rules, evaluate them against a report, print and write the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trm_diag.errors import ExitCode, UsageError
from trm_diag.report.gate import (
    ReportMetrics,
    bitwise_rules,
    collect_rules,
    defined_by,
    evaluate,
    parse_rule,
    partial_coverage,
    require_comparable,
    to_github,
    to_json,
    to_junit,
)
from trm_diag.report.gate import to_markdown as gate_markdown
from trm_diag.report.outputs import check_output_file

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
    bitwise: bool = False,
) -> int:
    from trm_diag.cli.numbers import fmt as fmt_num

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt} is unknown", f"use one of: {', '.join(FORMATS)}")
    from trm_diag.report.trend_report import RunMetrics, wants_run

    run_mode = wants_run(report, rules)  # a Monitor run folder: trend.* names over its steps
    if run_mode and baseline:
        raise UsageError("--baseline compares two reports, not a run", "gate the run with absolute rules")
    if run_mode and bitwise:
        raise UsageError("--bitwise certifies one report, not a run", "gate a report folder with --bitwise")
    rep = RunMetrics(report) if run_mode else ReportMetrics(report)
    if not run_mode:  # a report whose sides are not comparable has no drift to gate (report/comparable.py)
        from trm_diag.report.comparable import require_gateable

        require_gateable(rep.summary, report, bitwise)
        part = partial_coverage(rep.summary, f"'{report}'")
        if part:  # the exit code stands; the numbers are those of the shards' prompts alone
            warn(part)
    if output:  # checked before any work: a passing gate must not fail on its output path
        inputs = [f for d in (report, baseline) if d for f in Path(d).iterdir()] + ([config] if config else [])
        check_output_file(output, "--output", inputs=inputs)
    if list_metrics:
        names = rep.names()
        if fmt == "json":
            from trm_diag.report.tables import to_json as json_text

            print(json_text({n: rep.value(n) for n in names}))
        else:
            t = Table(title=f"Metrics of {report}", title_justify="left")
            t.add_column("metric", no_wrap=True)
            t.add_column("value", justify="right")
            t.add_column("by")  # verl's names are verl's (docs/metrics.md)
            for n in names:
                t.add_row(n, fmt_num(rep.value(n)), defined_by(n))
            out_console.print(t, soft_wrap=True)
        return int(ExitCode.OK)
    wanted = bitwise_rules(rep.summary) if bitwise else []
    if not bitwise or rules or config:  # --bitwise alone: its rules only (not pyproject.toml's)
        wanted = collect_rules(rules, config) + wanted
    parsed = [parse_rule(r) for r in wanted]
    base = ReportMetrics(baseline) if baseline else None
    if base is not None:
        names = (f"baseline {baseline}", str(report))
        require_comparable(base.summary, rep.summary, names, strict, warn, "relative rules compare unlike things")
        part = partial_coverage(base.summary, f"baseline '{baseline}'")
        if part:
            warn(part)
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
        for c in ("rule", "value", "threshold", "result"):  # a long rule folds, never cut short
            t.add_column(c, justify="right" if c in ("value", "threshold") else "left", overflow="fold")
        for r in results:
            verdict = Text("PASS", style="bold green") if r.passed else Text("FAIL", style="bold red")
            if r.note:
                verdict.append(f" ({r.note})", style="dim")
            t.add_row(r.rule.text, fmt_num(r.value), fmt_num(r.threshold), verdict)
        out_console.print(t, soft_wrap=True)  # the title and the lines below are grepped: never wrapped
        failed = sum(not r.passed for r in results)
        out_console.print(f"{len(results) - failed}/{len(results)} rules passed", soft_wrap=True)
        for r in results:
            if not r.passed:
                out_console.print(Text(f"FAILED {r.rule.text}: {r.miss()}", style="red"), soft_wrap=True)
        if bitwise:  # the certificate in words: where the first differing bit is
            from trm_diag.report.verdict import bitwise_line

            out_console.print(Text(f"bitwise: {bitwise_line(rep.summary)}"), soft_wrap=True)
        if failed:
            why = f"Why: trm-diag show {report}   (or open {Path(report) / 'report.html'})"
            why = f"Why: trm-diag trend {report}" if run_mode else why
            out_console.print(Text(why), soft_wrap=True)
    else:
        print(text[fmt](), end="" if fmt != "json" else "\n")
    # GitHub renders this file on the job page (a run has no report verdict to append)
    if fmt == "github" and os.environ.get("GITHUB_STEP_SUMMARY") and not run_mode:
        _job_summary(os.environ["GITHUB_STEP_SUMMARY"], gate_markdown(results, report), rep.summary, warn)
    if output:
        from trm_diag.report.tables import atomic_write

        content = text["json"]() + "\n" if fmt == "table" else text[fmt]()
        atomic_write(Path(output), lambda tmp: Path(tmp).write_text(content))
    return int(ExitCode.OK if all(r.passed for r in results) else ExitCode.GATE_FAILED)


def _job_summary(path: str, gate_md: str, summary: dict, warn: Callable[[str], None]) -> None:
    """Append the gate's table and the report's verdict to GitHub's job summary. A side output: when it
    cannot be written, a warning naming the variable, and the gate's exit code stands."""
    from trm_diag.cli.render import to_markdown
    from trm_diag.report.verdict import verdict

    if "verdict" not in summary:  # reports written before verdicts existed
        summary["verdict"] = verdict(summary)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(gate_md + "\n" + to_markdown(summary) + "\n")
    except OSError as e:
        warn(
            f"cannot append the job summary to $GITHUB_STEP_SUMMARY ('{path}': {e.strerror or e}); "
            "the gate's result is unchanged"
        )
