"""`trm-diag gate`: threshold rules over a report, for CI. No torch, no pandas.

Metric names address the report, one name per number (summary.json answers every name it holds;
a table is opened only for a name it does not):
- ``token.<column>.<stat>`` and ``seq.<column>.<stat>``: stat in mean, p50, p90, p99,
  p999, max, min of any numeric column of tokens.parquet / sequences.parquet, and
  ``token.abs_log_ratio.<stat>`` (NaN skipped, infinities kept: an infinite KL fails `<=`;
  how many values were infinite or NaN is reported with the rule);
- ``accept.<criterion>``: acceptance rate of a masking criterion (trm_max, trm_avg,
  combined, ln_trm, ser);
- ``bounds.<bound>@<T>``: a bound of the paper at horizon T from the report's measured
  inputs (e.g. ``bounds.unified@4096``);
- ``metrics.<name>``: a batch metric of summary.json that no other name answers (verl's
  names are verl's: ``metrics.kl`` is verl's k1 mean, listed as verl's);
- ``views.<view>.<stat>`` and ``breakdown.[<view>.]<bucket>.<stat>``: exact tier; without
  truncation the views coincide and a view's name answers with the report's own number; an
  empty bucket has n = 0 and every other statistic 0;
- ``routing.flip_rate``: MoE routing flip rate, when the report has routing data.
A retired spelling (``metrics.token_kl_p99``, ``metrics.accept_trm_max``) still answers, with a
note naming the one name.

Rules: ``<metric> <op> <rhs>`` with op in <=, <, >=, >, == and rhs a number,
``baseline``, ``<number> * baseline``, ``baseline * <number>`` or ``baseline + <number>``.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.errors import InputError, UsageError

if TYPE_CHECKING:  # numpy, the Parquet stack and the statistics load only for rules that read tables
    pass
from trm_diag.report.gate_names import (  # noqa: F401 (the names are part of the gate's API)
    EMPTY_BUCKET,
    SAME_AS,
    VERL_SAME,
    VIEW_SAME,
    VIEW_STATS,
    ReportMetrics,
    defined_by,
)

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
RULE_RE = re.compile(r"^\s*(?P<metric>[A-Za-z0-9_.@-]+)\s*(?P<op><=|>=|==|<|>)\s*(?P<rhs>.+?)\s*$")
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
RHS_FORMS = [
    (re.compile(rf"^(?P<a>{NUM})$"), lambda m, b: float(m["a"])),
    (re.compile(r"^baseline$"), lambda m, b: b),
    (re.compile(rf"^(?P<a>{NUM})\s*\*\s*baseline$"), lambda m, b: float(m["a"]) * b),
    (re.compile(rf"^baseline\s*\*\s*(?P<a>{NUM})$"), lambda m, b: float(m["a"]) * b),
    (re.compile(rf"^baseline\s*\+\s*(?P<a>{NUM})$"), lambda m, b: b + float(m["a"])),
]


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str
    op: str
    rhs: str

    @property
    def uses_baseline(self) -> bool:
        return "baseline" in self.rhs


def parse_rule(text: str) -> Rule:
    """Parse ``metric op rhs``; raises UsageError naming the malformed part."""
    m = RULE_RE.match(text)
    if not m:
        raise UsageError(f"malformed rule '{text}'", "write '<metric> <op> <value>', e.g. 'token.kl.p99 <= 1e-3'")
    rhs = m["rhs"]
    if not any(form.match(rhs) for form, _ in RHS_FORMS):
        raise UsageError(
            f"malformed right-hand side '{rhs}' in rule '{text}'",
            "use a number, 'baseline', 'N * baseline' or 'baseline + N'",
        )
    return Rule(text.strip(), m["metric"], m["op"], rhs)


def load_rules_toml(path: Path, explicit: bool = True) -> list[str]:
    """Rules from a TOML file: ``rules`` at the top level, in ``[gate]`` or in ``[tool.trm-diag.gate]``.
    Rules at more than one of those levels, a gate table that is not a table or holds another key, and
    (for a file passed with --config, ``explicit``) a file without rules are refused: none is dropped."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read gate config '{path}': {e}", "check the TOML syntax") from None

    fix = "write rules = [...] at the top level, under [gate] or under [tool.trm-diag.gate]"
    tool = data.get("tool")
    trm = tool.get("trm-diag") if isinstance(tool, dict) else None
    tables: dict[str, Any] = {"top level": data, "[gate]": data.get("gate")}
    if isinstance(trm, dict):
        tables["[tool.trm-diag.gate]"] = trm.get("gate")
    found = []
    for where, table in tables.items():
        if table is None:
            continue
        if not isinstance(table, dict):
            raise InputError(f"'{path}': {where.strip('[]')} must be a table, not {type(table).__name__}", fix)
        if where != "top level":
            odd = sorted(k for k in table if k != "rules")
            if odd:
                raise InputError(
                    f"'{path}': unknown key '{odd[0]}' in {where}", "the gate's table holds one key: rules"
                )
        if "rules" in table:
            found.append(where)
    if len(found) > 1:
        raise InputError(
            f"'{path}' holds gate rules at more than one level ({', '.join(found)})",
            "keep them in one list: " + fix.removeprefix("write "),
        )
    if not found:
        if explicit:
            raise InputError(f"gate config '{path}' holds no rules", fix)
        return []
    rules = tables[found[0]]["rules"]
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise InputError(f"'{path}': rules must be a list of strings", 'write rules = ["token.kl.p99 <= 1e-3"]')
    return rules


def _distinct(v: float, t: float) -> tuple[str, str, int]:
    """v and t with the fewest significant digits (3 or more) that tell them apart, and that count."""
    for d in range(3, 18):
        a, b = f"{v:.{d}g}", f"{t:.{d}g}"
        if a != b or v == t:
            return a, b, d
    return a, b, d


@dataclass
class RuleResult:
    rule: Rule
    value: float
    threshold: float
    baseline: float | None
    passed: bool
    note: str = ""

    def miss(self) -> str:
        """By how much a failed rule missed, in words ("" when it passed): 'value 3.2e-04 is 2.2e-04 above the
        limit 1e-04 (3.2x)'; at equality, that the rule wants a strict inequality."""
        if self.passed:
            return ""
        v, t, op = self.value, self.threshold, self.rule.op
        if math.isnan(v) or math.isnan(t):
            return self.note
        a, b, d = _distinct(v, t)
        if op == "==":
            return f"value {a} is not the limit {b}"
        if v == t:
            return f"value {a} equals the limit; the rule wants it strictly {'below' if op == '<' else 'above'}"
        side = "above" if op in ("<=", "<") else "below"
        if math.isinf(v) or math.isinf(t):
            return f"value {a} is {side} the limit {b}"
        times = f" ({v / t:.{d}g}x)" if t > 0 and v >= 0 else ""
        return f"value {a} is {abs(v - t):.3g} {side} the limit {b}{times}"

    def as_dict(self) -> dict[str, Any]:
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else v

        return {
            "rule": self.rule.text, "metric": self.rule.metric, "op": self.rule.op, "value": clean(self.value),
            "threshold": clean(self.threshold), "baseline": clean(self.baseline), "passed": self.passed, "note": self.note,
            "miss": self.miss(),
        }  # fmt: skip


def evaluate(rules: list[Rule], report: ReportMetrics, baseline: ReportMetrics | None) -> list[RuleResult]:
    """Evaluate every rule; NaN values fail with a note. Unknown metrics raise UsageError."""
    results = []
    for rule in rules:
        value = report.value(rule.metric)
        base = None
        if rule.uses_baseline:
            if baseline is None:
                raise UsageError(f"rule '{rule.text}' compares with a baseline", "pass --baseline OLD_REPORT_DIR")
            base = baseline.value(rule.metric)
        for form, fn in RHS_FORMS:
            m = form.match(rule.rhs)
            if m:
                threshold = fn(m, base if base is not None else math.nan)
                break
        notes = [report.notes.get(rule.metric, "")]
        if math.isnan(value):
            passed = False
            notes.insert(0, "the report has no value for this metric")
        elif math.isnan(threshold) and base is not None and not math.isnan(base):  # 0 * inf, inf + -inf
            passed = False
            notes.insert(0, f"the limit '{rule.rhs}' has no value with the baseline {base:g}")
        elif math.isnan(threshold):
            passed = False
            notes.insert(0, "the baseline has no value for this metric")
        else:  # an infinite value is compared like any other: inf <= 0.05 fails
            passed = bool(OPS[rule.op](value, threshold))
        results.append(RuleResult(rule, value, threshold, base, passed, "; ".join(n for n in notes if n)))
    return results


def to_json(results: list[RuleResult], report: str, baseline: str | None) -> str:
    return json.dumps(
        {
            "report": report,
            "baseline": baseline,
            "passed": all(r.passed for r in results),
            "n_rules": len(results),
            "n_failed": sum(not r.passed for r in results),
            "rules": [r.as_dict() for r in results],
        },
        indent=2,
    )


def to_junit(results: list[RuleResult], report: str) -> str:
    """A JUnit XML document: one testcase per rule, a <failure> for each failed rule."""
    import xml.etree.ElementTree as ET

    suite = ET.Element(
        "testsuite",
        name="trm-diag gate",
        tests=str(len(results)),
        failures=str(sum(not r.passed for r in results)),
        errors="0",
    )
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="report", value=report)
    for r in results:
        # the JUnit class name users filter on: kept as it was before the package layout changed
        case = ET.SubElement(suite, "testcase", classname="trm_diag.gate", name=r.rule.text)
        if not r.passed:
            msg = f"{r.rule.metric} = {r.value:.6g}, required {r.rule.op} {r.threshold:.6g}" + (
                f" ({r.note})" if r.note else ""
            )
            ET.SubElement(case, "failure", message=msg, type="GateRuleFailed").text = msg
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def to_github(results: list[RuleResult]) -> str:
    """GitHub Actions workflow commands: an ::error per failed rule, a ::notice summary."""

    def esc(s: str) -> str:
        return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    lines = []
    for r in results:
        if not r.passed:
            why = "; ".join(x for x in (r.miss(), r.note if r.note != r.miss() else "") if x)
            lines.append(f"::error title=trm-diag gate::{esc(f'{r.rule.text} failed: {why}')}")
    failed = sum(not r.passed for r in results)
    lines.append(f"::notice title=trm-diag gate::{len(results) - failed}/{len(results)} rules passed")
    return "\n".join(lines) + "\n"


def to_markdown(results: list[RuleResult], report: str) -> str:
    """The gate's result as Markdown (GitHub's job summary): a line, then one row per rule."""
    failed = sum(not r.passed for r in results)
    head = f"## trm-diag gate: {len(results) - failed}/{len(results)} rules passed ({report})"
    rows = [
        f"| `{r.rule.text}` | {r.value:.4g} | {'PASS' if r.passed else 'FAIL: ' + r.miss()} |".replace("\n", " ")
        for r in results
    ]
    return "\n".join([head, "", "| rule | value | result |", "| --- | --- | --- |", *rows]) + "\n"


def collect_rules(rules: list[str], config: Path | None) -> list[str]:
    """--rule options plus the config file's; pyproject.toml's table when neither is given."""
    out = list(rules)
    if config is not None:
        if config.is_dir():
            raise InputError(f"gate config '{config}' is a folder", "pass --config with a TOML file, e.g. rules.toml")
        if not config.is_file():
            raise InputError(f"gate config '{config}' does not exist", "pass --config with a TOML file")
        out += load_rules_toml(config)
    elif not out and Path("pyproject.toml").is_file():
        out += load_rules_toml(Path("pyproject.toml"), explicit=False)
    if not out:
        raise UsageError("no gate rules given", "pass --rule 'token.kl.p99 <= 1e-3' or --config rules.toml")
    return out


def bitwise_rules(summary: dict) -> list[str]:
    """`gate --bitwise`: every compared number bit-equal (math/certify.py); full rows too in the exact tier."""
    rules = ["certify.n_tokens_differing == 0", "certify.max_abs_log_ratio == 0"]
    return rules + (["certify.n_rows_differing == 0"] if summary.get("fidelity") == "exact" else [])


def partial_coverage(summary: dict, name: str) -> str | None:
    """The warning for a report (called ``name``) that covers only part of its run's prompts (one shard, or a
    --partial merge), else None."""
    cov = summary.get("coverage")
    shard = summary.get("shard")
    if isinstance(cov, dict) and cov.get("complete") is False:
        missing = ", ".join(str(m) for m in cov.get("missing") or ())
        what = f"merges {len(cov.get('shards') or ())} of {cov.get('split')} shards (missing {missing}, --partial)"
    elif shard:
        what = f"is shard {shard} of a --shard split"
    else:
        return None
    return f"{name} {what}: its numbers cover those prompts only"


def comparability(a: dict, b: dict) -> list[str]:
    """How two reports differ in what makes their numbers comparable: models, tokenizer, fidelity tier."""
    out = []
    for side in ("rollout", "train"):
        fa, fb = (s.get(side, {}).get("model_fingerprint") for s in (a, b))
        if fa and fb and fa != fb:
            out.append(f"the {side} model")
    known = all((s.get("vocab") or {}).get("logits_width") is not None for s in (a, b))  # null: made without a model
    if known and a.get("vocab") != b.get("vocab"):
        out.append("the vocabulary / tokenizer")
    if a.get("fidelity") != b.get("fidelity"):
        out.append(f"the fidelity tier ({a.get('fidelity')} vs {b.get('fidelity')})")
    return out


def require_comparable(
    a: dict, b: dict, names: tuple[str, str], strict: bool, warn: Callable[[str], None], consequence: str
) -> bool:
    """Whether two reports are comparable; if not, a warning naming the difference and its
    ``consequence``, or with ``strict`` a UsageError. Shared by `gate --baseline` and `diff`."""
    from trm_diag.report.comparable import NotComparable

    differences = comparability(a, b)
    if differences:
        text = f"'{names[0]}' and '{names[1]}' differ in {'; '.join(differences)}"
        if strict:
            raise NotComparable(
                text, "compare reports of the same model, tokenizer and fidelity tier, or drop --strict"
            )
        warn(f"{text}: {consequence}")
    return not differences
