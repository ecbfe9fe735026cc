"""`trm-diag gate`: gather rules, evaluate them against a report, print and write the result."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trm_diag.errors import ExitCode, InputError, UsageError
from trm_diag.gate import ReportMetrics, evaluate, load_rules_toml, parse_rule, to_github, to_json, to_junit

FORMATS = ("table", "json", "junit", "github")


def collect_rules(rules: list[str], config: Path | None) -> list[str]:
    """--rule options plus the config file's; pyproject.toml's table when neither is given."""
    out = list(rules)
    if config is not None:
        if not config.is_file():
            raise InputError(f"gate config '{config}' does not exist", "pass --config with a TOML file")
        out += load_rules_toml(config)
    elif not out and Path("pyproject.toml").is_file():
        out += load_rules_toml(Path("pyproject.toml"))
    if not out:
        raise UsageError("no gate rules given", "pass --rule 'token.kl.p99 <= 1e-3' or --config rules.toml")
    return out


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
) -> int:
    from trm_diag.summary import fmt as fmt_num

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt} is unknown", f"use one of: {', '.join(FORMATS)}")
    rep = ReportMetrics(report)
    if list_metrics:
        names = rep.names()
        if fmt == "json":
            import json

            print(json.dumps({n: _finite(rep.value(n)) for n in names}, indent=1))
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
            verdict = Text("PASS", style="bold green") if r.passed else Text("FAIL " + r.note, style="bold red")
            t.add_row(r.rule.text, fmt_num(r.value), fmt_num(r.threshold), verdict)
        out_console.print(t)
        failed = sum(not r.passed for r in results)
        out_console.print(f"{len(results) - failed}/{len(results)} rules passed")
    else:
        print(text[fmt](), end="" if fmt != "json" else "\n")
    if output:
        content = text["json"]() + "\n" if fmt == "table" else text[fmt]()
        Path(output).write_text(content)
    return int(ExitCode.OK if all(r.passed for r in results) else ExitCode.GATE_FAILED)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
