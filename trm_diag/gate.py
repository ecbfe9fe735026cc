"""`trm-diag gate`: threshold rules over a report, for CI. No torch, no pandas.

Metric names address the report:
- ``token.<column>.<stat>`` and ``seq.<column>.<stat>``: stat in mean, p50, p90, p99,
  p999, max, min of any numeric column of tokens.parquet / sequences.parquet (NaN skipped,
  infinities kept: an infinite KL fails `<=`; how many values were infinite or NaN is
  reported with the rule);
- ``accept.<criterion>``: acceptance rate of a masking criterion (trm_max, trm_avg,
  combined, ln_trm, ser);
- ``bounds.<bound>@<T>``: a bound of the paper at horizon T from the report's measured
  inputs (e.g. ``bounds.unified@4096``);
- ``metrics.<name>``: any batch metric of summary.json (e.g. ``metrics.chi2_token``);
- ``routing.flip_rate``: MoE routing flip rate, when the report has routing data.

Rules: ``<metric> <op> <rhs>`` with op in <=, <, >=, >, == and rhs a number,
``baseline``, ``<number> * baseline``, ``baseline * <number>`` or ``baseline + <number>``.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.config import VIEWS, parse_horizons
from trm_diag.criteria import CRITERIA
from trm_diag.errors import InputError, UsageError
from trm_diag.schema import BREAKDOWN_STATS, ID_COLUMNS

if TYPE_CHECKING:  # numpy, the Parquet stack and the statistics load only for rules that read tables
    import numpy as np


def _stat_names() -> tuple[str, ...]:
    from trm_diag.stats import STATS

    return tuple(STATS)


VIEW_STATS = ("bias", "kl_mean", "kl_p99", "accept_trm_max", "accept_trm_avg", "ppo_clip_frac", "dapo_clip_frac")

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
RULE_RE = re.compile(r"^\s*(?P<metric>[A-Za-z0-9_.@]+)\s*(?P<op><=|>=|==|<|>)\s*(?P<rhs>.+?)\s*$")
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


def load_rules_toml(path: Path) -> list[str]:
    """Rules from a TOML file: top-level ``rules``, ``[gate]`` or ``[tool.trm-diag.gate]``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read gate config '{path}': {e}", "check the TOML syntax") from None

    def sub(d: dict, key: str) -> dict:
        return d[key] if isinstance(d.get(key), dict) else {}  # `tool = 5` is no table, not a crash

    for table in (sub(sub(sub(data, "tool"), "trm-diag"), "gate"), sub(data, "gate"), data):
        if "rules" in table:
            rules = table["rules"]
            if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
                raise InputError(f"'{path}': rules must be a list of strings", 'write rules = ["token.kl.p99 <= 1e-3"]')
            return rules
    return []


class ReportMetrics:
    """Lazily reads a report folder and resolves metric names to floats."""

    def __init__(self, path: str | Path) -> None:
        from trm_diag.report import complete_report

        self.path, self.summary = complete_report(path, tables=False)  # tables checked when a rule reads one
        self._checked = False
        self._schemas: dict[str, list[str]] = {}
        self._flags: dict[str, set[str]] = {}  # boolean columns: only their mean (a fraction) is a metric
        self._cols: dict[tuple[str, str], np.ndarray] = {}
        self._bound_inputs = None
        self.notes: dict[str, str] = {}  # metric -> what the reader should know about its value

    # -------------------------------------------------------------- tables
    def _file(self, table: str) -> Path:
        if not self._checked:
            from trm_diag.report import check_tables

            check_tables(self.path, self.summary)
            self._checked = True
        return self.path / f"{table}.parquet"

    def numeric_columns(self, table: str) -> list[str]:
        if table not in self._schemas:
            import pyarrow as pa

            from trm_diag.report import read_schema

            f = self._file(table)
            if not f.is_file():
                self._schemas[table] = []
            else:
                schema = read_schema(f)
                self._schemas[table] = [
                    fld.name
                    for fld in schema
                    if pa.types.is_integer(fld.type) or pa.types.is_floating(fld.type) or pa.types.is_boolean(fld.type)
                ]
                self._flags[table] = {fld.name for fld in schema if pa.types.is_boolean(fld.type)}
        return self._schemas[table]

    def column(self, table: str, name: str) -> np.ndarray:
        key = (table, name)
        if key not in self._cols:
            import numpy as np

            from trm_diag.report import read_table

            arr = read_table(self._file(table), columns=[name]).column(0).to_numpy(zero_copy_only=False)
            self._cols[key] = np.asarray(arr, dtype=np.float64)
        return self._cols[key]

    # -------------------------------------------------------------- names
    def names(self) -> list[str]:
        """Every metric name this report can answer."""
        from trm_diag.stats import STATS

        out = []
        for prefix, table in (("token", "tokens"), ("seq", "sequences")):
            for c in self.numeric_columns(table):
                if c in ID_COLUMNS or c.startswith("accept_"):  # identifiers; acceptance is accept.<criterion>
                    continue
                out += (
                    [f"{prefix}.{c}.mean"] if c in self._flags.get(table, ()) else [f"{prefix}.{c}.{s}" for s in STATS]
                )
        out += [f"accept.{c}" for c in CRITERIA if f"accept_{c}" in self.numeric_columns("sequences")]
        horizons = sorted({int(r) for r in self._report_horizons()})
        from trm_diag.bounds import BOUND_NAMES

        out += [f"bounds.{b}@{T}" for T in horizons for b in BOUND_NAMES]
        out += [
            f"metrics.{k}"
            for k, v in self.summary.get("metrics", {}).items()
            if isinstance(v, (int, float)) or v is None
        ]
        for view, stats in ((self.summary.get("views") or {}).get("by_view") or {}).items():
            out += [f"views.{view}.{k}" for k in stats]
        out += [f"breakdown.{r['bucket']}.{k}" for r in self._breakdown_rows() for k in BREAKDOWN_STATS if k in r]
        for view in (self.summary.get("breakdowns") or {}).get("by_view") or {}:
            out += [
                f"breakdown.{view}.{r['bucket']}.{k}"
                for r in self._breakdown_rows(view)
                for k in BREAKDOWN_STATS
                if k in r
            ]
        if self._file("routing").is_file() or "routing" in self.summary:
            out.append("routing.flip_rate")
        return out

    def _breakdown_rows(self, view: str | None = None) -> list[dict]:
        """summary.json's breakdown rows of one view (default: the report's); none in older reports."""
        brk = self.summary.get("breakdowns") or {}
        return list((brk.get("by_view") or {}).get(view) or []) if view else list(brk.get("rows") or [])

    def _report_horizons(self) -> list[int]:
        f = self._file("bounds")
        if not f.is_file():
            return []
        from trm_diag.report import read_table

        return list(set(read_table(f, columns=["T"]).column(0).to_pylist()))

    def value(self, name: str) -> float:
        """The metric's value (inf counts, NaN when it has no value); UsageError for unknown names."""
        from trm_diag.metrics import RENAMED

        parts = name.split(".")
        try:
            if parts[0] in ("token", "seq") and len(parts) == 3 and parts[2] in _stat_names():
                table = "tokens" if parts[0] == "token" else "sequences"
                if parts[1] in self.numeric_columns(table) and parts[1] not in ID_COLUMNS:
                    return self._stat(name, self.column(table, parts[1]), parts[2])
            elif parts[0] == "accept" and len(parts) == 2 and f"accept_{parts[1]}" in self.numeric_columns("sequences"):
                x = self.column("sequences", f"accept_{parts[1]}")
                return float(x.mean()) if x.size else math.nan
            elif parts[0] == "bounds" and len(parts) == 2 and "@" in parts[1]:
                return self._bound(*parts[1].split("@", 1))
            elif parts[0] == "metrics" and len(parts) == 2:
                metrics = self.summary.get("metrics", {})
                key = parts[1] if parts[1] in metrics else RENAMED.get(parts[1])
                if key in metrics:
                    if key != parts[1]:
                        self.notes[name] = f"renamed to metrics.{key} (verl's name)"
                    v = metrics[key]
                    return math.nan if v is None else float(v)
            elif parts[0] == "views" and len(parts) == 3:  # views.<view>.<stat>: truncated sampling
                v = ((self.summary.get("views") or {}).get("by_view") or {}).get(parts[1], {}).get(parts[2])
                if isinstance(v, (int, float)) or (v is None and parts[2] in VIEW_STATS):
                    return math.nan if v is None else float(v)
            elif parts[0] == "breakdown" and len(parts) in (3, 4, 5):
                # breakdown.[<view>.]<bucket>.<stat>, the stat as kl_mean or kl.mean; no view: the report's view
                view = parts[1] if parts[1] in VIEWS else None
                rest = parts[2:] if view else parts[1:]
                row = next((r for r in self._breakdown_rows(view) if r["bucket"] == rest[0]), None)
                stat = "_".join(rest[1:])
                if row is not None and stat in BREAKDOWN_STATS:
                    v = row.get(stat)
                    return math.nan if v is None else float(v)
            elif name == "routing.flip_rate":
                r = self.summary.get("routing") or {}
                if "flip_rate" in r:
                    return float(r["flip_rate"])
        except ValueError:
            pass
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "list the names with `trm-diag gate --list-metrics DIR`"
        )
        raise UsageError(f"unknown metric '{name}' for report '{self.path}'", hint)

    def _stat(self, name: str, x: np.ndarray, stat: str) -> float:
        """One statistic of a column (stats.describe: the summary's own); notes how many values were not finite."""
        from trm_diag.stats import describe

        d = describe(x, (stat,))
        parts = []
        if d["n_inf"]:
            parts.append(f"{d['n_inf']:,} of {x.size:,} values are infinite")
        if d["n_nan"]:
            parts.append(f"{d['n_nan']:,} NaN skipped")
        if parts:
            self.notes[name] = "; ".join(parts)
        return d[stat]

    def _bound(self, bound: str, horizon: str) -> float:
        from trm_diag.bounds import BOUND_NAMES, BoundInputs, all_bounds
        from trm_diag.metrics import bound_inputs

        if bound not in BOUND_NAMES:
            raise ValueError(bound)
        (T,) = parse_horizons(horizon, f"bounds.{bound}@T: T", fix=f"write e.g. bounds.{bound}@4096")  # 4096 or 4e3
        if self._bound_inputs is None:  # saved by the run; recomputed from the tables for older reports
            self._bound_inputs = BoundInputs.from_dict(self.summary.get("bound_inputs"))
        if self._bound_inputs is None:
            tok_cols = ("log_ratio", "pos", "kl", "tv", "kl_hi", "tv_hi", "k2", "k3")
            tokens = {c: self.column("tokens", c) for c in tok_cols if c in self.numeric_columns("tokens")}
            seqs = {c: self.column("sequences", c) for c in ("length", "log_seq_ratio")}
            self._bound_inputs = bound_inputs(tokens, seqs, self.summary["fidelity"])
        v = all_bounds(T, self._bound_inputs)[0][bound]
        return math.nan if v is None else float(v)


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
        limit 1e-04 (3.2x)'."""
        if self.passed:
            return ""
        v, t = self.value, self.threshold
        if math.isnan(v) or math.isnan(t):
            return self.note
        if self.rule.op == "==" or math.isinf(v) or math.isinf(t):
            return f"value {v:.3g}, limit {self.rule.op} {t:.3g}"
        side = "above" if self.rule.op in ("<=", "<") else "below"
        times = f" ({v / t:.3g}x)" if t > 0 and v >= 0 else ""
        return f"value {v:.3g} is {abs(v - t):.3g} {side} the limit {t:.3g}{times}"

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
        if not config.is_file():
            raise InputError(f"gate config '{config}' does not exist", "pass --config with a TOML file")
        out += load_rules_toml(config)
    elif not out and Path("pyproject.toml").is_file():
        out += load_rules_toml(Path("pyproject.toml"))
    if not out:
        raise UsageError("no gate rules given", "pass --rule 'token.kl.p99 <= 1e-3' or --config rules.toml")
    return out


def comparability(a: dict, b: dict) -> list[str]:
    """How two reports differ in what makes their numbers comparable: models, tokenizer, fidelity tier."""
    out = []
    for side in ("rollout", "train"):
        fa, fb = (s.get(side, {}).get("model_fingerprint") for s in (a, b))
        if fa and fb and fa != fb:
            out.append(f"the {side} model")
    if a.get("vocab") != b.get("vocab"):
        out.append("the vocabulary / tokenizer")
    if a.get("fidelity") != b.get("fidelity"):
        out.append(f"the fidelity tier ({a.get('fidelity')} vs {b.get('fidelity')})")
    return out


def require_comparable(
    a: dict, b: dict, names: tuple[str, str], strict: bool, warn: Callable[[str], None], consequence: str
) -> bool:
    """Whether two reports are comparable; if not, a warning naming the difference and its
    ``consequence``, or with ``strict`` a UsageError. Shared by `gate --baseline` and `diff`."""
    differences = comparability(a, b)
    if differences:
        text = f"'{names[0]}' and '{names[1]}' differ in {'; '.join(differences)}"
        if strict:
            raise UsageError(text, "compare reports of the same model, tokenizer and fidelity tier, or drop --strict")
        warn(f"{text}: {consequence}")
    return not differences
