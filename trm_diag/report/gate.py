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
    from trm_diag.math.stats import STATS

    return tuple(STATS)


VIEW_STATS = ("bias", "kl_mean", "kl_p99", "accept_trm_max", "accept_trm_avg", "ppo_clip_frac", "dapo_clip_frac")

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


# One number, one gate name: a summary.json metric that another gate name answers goes by that name
# (the old spelling still answers, with a note). verl's names stay verl's: a column statistic verl names
# goes by verl's name.
SAME_AS = {
    "abs_log_ratio_mean": "token.abs_log_ratio.mean",
    "abs_log_ratio_max": "token.abs_log_ratio.max",
    "abs_rho_m1_mean": "token.abs_rho_m1.mean",
    "kl_share_low_prob": "breakdown.prob_lt_1pct.kl_share",
}
VERL_SAME = {"token.k1.mean": "kl", "token.k3.mean": "k3_kl"}  # k1 = -log_ratio; verl's kl is its mean
# without truncation (or in greedy decoding) the three views coincide: each view statistic is the report's own
VIEW_SAME = {
    "bias": "token.log_ratio.mean", "kl_mean": "token.kl.mean", "kl_p99": "token.kl.p99",
    "accept_trm_max": "accept.trm_max", "accept_trm_avg": "accept.trm_avg",
    "ppo_clip_frac": "metrics.ppo_clip_frac", "dapo_clip_frac": "metrics.dapo_clip_frac",
}  # fmt: skip
TOKEN_KEY = re.compile(r"token_(?P<col>\w+?)_(?P<stat>mean|p50|p90|p999|p99|max|min)")  # summary.json's key
DERIVED_COLUMNS = {"abs_log_ratio": "log_ratio"}  # token.<col>.* of a column the summary derives: |log_ratio|
EMPTY_BUCKET = "bucket empty (n = 0): every statistic is 0"


def defined_by(name: str) -> str:
    """'verl' for a metrics.<name> that has verl's name and definition (docs/metrics.md), else 'trm-diag'."""
    from trm_diag.math.metrics import METRICS

    parts = name.split(".")
    verl = parts[0] == "metrics" and len(parts) == 2 and METRICS.get(parts[1], ("", ""))[1] == "verl"
    return "verl" if verl else "trm-diag"


def _number(v: Any) -> float | None:
    """A summary value as a float (None, a missing value, is NaN); None when it is no number at all."""
    if v is None:
        return math.nan
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class ReportMetrics:
    """Lazily reads a report folder and resolves metric names to floats: summary.json answers every
    name it holds; a table is opened only for a name the summary does not answer."""

    def __init__(self, path: str | Path) -> None:
        from trm_diag.report.tables import complete_report

        self.path, self.summary = complete_report(path, tables=False)  # tables checked when a rule reads one
        self.metrics: dict[str, Any] = self.summary["metrics"]
        self._checked = False
        self._schemas: dict[str, list[str]] = {}
        self._flags: dict[str, set[str]] = {}  # boolean columns: only their mean (a fraction) is a metric
        self._cols: dict[tuple[str, str], np.ndarray] = {}
        self._bound_inputs = None
        self.notes: dict[str, str] = {}  # metric -> what the reader should know about its value

    # -------------------------------------------------------------- tables
    def _file(self, table: str) -> Path:
        if not self._checked:
            from trm_diag.report.tables import check_tables

            check_tables(self.path, self.summary)
            self._checked = True
        return self.path / f"{table}.parquet"

    def numeric_columns(self, table: str) -> list[str]:
        if table not in self._schemas:
            import pyarrow as pa

            from trm_diag.report.tables import read_schema

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

            from trm_diag.report.tables import read_table

            arr = read_table(self._file(table), columns=[name]).column(0).to_numpy(zero_copy_only=False)
            self._cols[key] = np.asarray(arr, dtype=np.float64)
        return self._cols[key]

    # -------------------------------------------------------------- views and breakdowns
    @property
    def fidelity(self) -> str:
        return self.summary["fidelity"]

    def _by_view(self, section: str) -> dict | None:
        """summary.json's per-view part of ``views`` or ``breakdowns`` (truncated sampling), else None."""
        sec = self.summary.get(section)
        by = sec.get("by_view") if isinstance(sec, dict) else None
        return by if isinstance(by, dict) and by else None

    def views_coincide(self) -> bool:
        """An exact-tier report whose sampler does not truncate: the pipeline, replay and full views are one."""
        views = self.summary.get("views")
        return self.fidelity == "exact" and isinstance(views, dict) and self._by_view("views") is None

    def _no_views(self, name: str) -> UsageError:
        """Why a per-view name has no value in this report (the tier's, or an older report's)."""
        views = self.summary.get("views")
        if self.fidelity != "exact":
            return UsageError(
                f"'{name}' needs the exact tier (the views come from full rows); '{self.path}' is {self.fidelity}",
                "gate a report of `compare --fidelity exact`, or drop the rule",
            )
        why = "written by an older trm-diag" if not isinstance(views, dict) else "its views are damaged"
        return UsageError(f"report '{self.path}' keeps no views ({why})", "re-run the command that wrote it")

    def _breakdown(self, name: str, view: str | None, bucket: str, stat: str) -> float:
        """One statistic of one bucket; an empty bucket (no row in summary.json) has n = 0 and every other
        statistic 0, with a note, so a rule on it is judged whatever the data."""
        from trm_diag.math.breakdowns import BUCKETS
        from trm_diag.tiers import TIERS

        brk = self.summary.get("breakdowns")
        if not isinstance(brk, dict) or not isinstance(brk.get("rows"), list):
            raise UsageError(
                f"report '{self.path}' keeps no breakdowns (written by an older trm-diag)",
                "re-run the command that wrote it",
            )
        if stat.startswith("kl_") and TIERS[self.fidelity].kl is None:
            raise UsageError(
                f"'{name}': the {self.fidelity} tier has no per-token KL",
                "use n, token_share, abs_log_ratio_mean or outside_band, or compare with --fidelity exact or topk",
            )
        if view is None:
            rows = brk["rows"]
        else:
            by = self._by_view("breakdowns")
            if by is None or not isinstance(by.get(view), list):
                raise self._no_views(name)
            rows = by[view]
        rows = [r for r in rows if isinstance(r, dict)]
        row = next((r for r in rows if r.get("bucket") == bucket), None)
        if row is None:
            axis = BUCKETS[bucket].name
            if any(r.get("axis") == axis for r in rows) or not self.metrics.get("n_tokens"):
                self.notes[name] = EMPTY_BUCKET
                return 0.0
            raise UsageError(f"report '{self.path}' has no {axis} breakdown", "re-run the command that wrote it")
        v = _number(row.get(stat))
        return math.nan if v is None else v

    # -------------------------------------------------------------- names
    def _same(self, name: str) -> tuple[str, bool] | None:
        """(the gate name of this number, whether ``name`` is a retired spelling), or None: ``name`` is its
        own. Decided from the name, the tier and summary.json alone (no table)."""
        from trm_diag.math.breakdowns import BUCKETS
        from trm_diag.schema import TOKEN_COLUMNS

        parts = name.split(".")
        if parts[0] == "metrics" and len(parts) == 2:
            key = parts[1]
            if key in SAME_AS and (not SAME_AS[key].startswith("breakdown.") or "breakdowns" in self.summary):
                return SAME_AS[key], True
            if key.startswith("accept_") and key.removeprefix("accept_") in CRITERIA:
                return f"accept.{key.removeprefix('accept_')}", True
            m = TOKEN_KEY.fullmatch(key)
            if m and m["col"] not in ID_COLUMNS and (m["col"] in TOKEN_COLUMNS or m["col"] in DERIVED_COLUMNS):
                return f"token.{m['col']}.{m['stat']}", True
        elif name in VERL_SAME and VERL_SAME[name] in self.metrics:
            return f"metrics.{VERL_SAME[name]}", True
        elif parts[0] == "seq" and len(parts) == 3 and parts[2] == "mean":
            crit = parts[1].removeprefix("accept_")
            if parts[1].startswith("accept_") and crit in CRITERIA:
                return f"accept.{crit}", True
        elif parts[0] == "views" and len(parts) == 3 and parts[1] in VIEWS and parts[2] in VIEW_SAME:
            if self.views_coincide():
                return VIEW_SAME[parts[2]], False
        elif parts[0] == "breakdown" and len(parts) in (4, 5) and parts[1] in VIEWS and parts[2] in BUCKETS:
            if self.views_coincide():
                return ".".join(["breakdown", *parts[2:]]), False
        return None

    def canonical(self, name: str) -> tuple[str, str]:
        """The one gate name of ``name``'s number, and the note a rule on another spelling carries."""
        canon, retired = name, False
        for _ in range(3):  # metrics.token_k3_mean -> token.k3.mean -> metrics.k3_kl (verl's)
            nxt = self._same(canon)
            if nxt is None:
                break
            canon, retired = nxt[0], retired or nxt[1]
        if canon == name:
            return name, ""
        if not retired:
            return canon, f"no truncation, the views coincide: same number as {canon}"
        owner = "verl's " if defined_by(canon) == "verl" else ""
        return canon, f"same number as {owner}{canon}: write that name"

    def names(self) -> list[str]:
        """Every metric name this report can answer, one per number (`gate --list-metrics`)."""
        from trm_diag.math.breakdowns import AXES
        from trm_diag.math.stats import STATS
        from trm_diag.tiers import TIERS

        out = []
        for prefix, table in (("token", "tokens"), ("seq", "sequences")):
            cols = self.numeric_columns(table)
            if prefix == "token":
                cols = cols + [d for d, src in DERIVED_COLUMNS.items() if src in cols and d not in cols]
            for c in cols:
                if c in ID_COLUMNS or c.startswith("accept_"):  # identifiers; acceptance is accept.<criterion>
                    continue
                out += (
                    [f"{prefix}.{c}.mean"] if c in self._flags.get(table, ()) else [f"{prefix}.{c}.{s}" for s in STATS]
                )
        seq_cols = self.numeric_columns("sequences")
        out += [f"accept.{c}" for c in CRITERIA if f"accept_{c}" in self.metrics or f"accept_{c}" in seq_cols]
        horizons = sorted({int(r) for r in self._report_horizons()})
        from trm_diag.math.bounds import BOUND_NAMES

        out += [f"bounds.{b}@{T}" for T in horizons for b in BOUND_NAMES]
        out += [f"metrics.{k}" for k, v in self.metrics.items() if _number(v) is not None]
        by_view = self._by_view("views")
        if by_view:
            for view, stats in by_view.items():
                if isinstance(stats, dict):
                    out += [f"views.{view}.{k}" for k, v in stats.items() if _number(v) is not None]
        brk = self.summary.get("breakdowns")
        if isinstance(brk, dict) and isinstance(brk.get("rows"), list):
            stats = [s for s in BREAKDOWN_STATS if not s.startswith("kl_") or TIERS[self.fidelity].kl]
            axes = {r.get("axis") for r in brk["rows"] if isinstance(r, dict)}
            buckets = [b for a in AXES if a.name in axes or not self.metrics.get("n_tokens") for b in a.buckets]
            out += [f"breakdown.{b}.{s}" for b in buckets for s in stats]
            for view in self._by_view("breakdowns") or {}:
                out += [f"breakdown.{view}.{b}.{s}" for b in buckets for s in stats]
        routing = self.summary.get("routing")
        if isinstance(routing, dict) and "flip_rate" in routing:
            out.append("routing.flip_rate")
        return [n for n in dict.fromkeys(out) if self.canonical(n)[0] == n]

    def _report_horizons(self) -> list[int]:
        f = self._file("bounds")
        if not f.is_file():
            return []
        from trm_diag.report.tables import read_table

        return list(set(read_table(f, columns=["T"]).column(0).to_pylist()))

    # -------------------------------------------------------------- values
    def value(self, name: str) -> float:
        """The metric's value (inf counts, NaN when it has no value); UsageError for unknown names.
        Another spelling of a number answers with that number and a note naming its one name."""
        canon, note = self.canonical(name)
        v = self._value(canon)
        if note:
            self.notes[name] = "; ".join(x for x in (note, self.notes.get(canon, "")) if x)
        return v

    def _value(self, name: str) -> float:
        from trm_diag.math.breakdowns import BUCKETS
        from trm_diag.math.metrics import RENAMED

        parts = name.split(".")
        try:
            if parts[0] in ("token", "seq") and len(parts) == 3 and parts[2] in _stat_names():
                col, stat = parts[1], parts[2]
                if col not in ID_COLUMNS:
                    if parts[0] == "token":
                        v = self._summary_stat(name, col, stat)
                        if v is not None:
                            return v
                    table = "tokens" if parts[0] == "token" else "sequences"
                    if col in self.numeric_columns(table):
                        return self._stat(name, self.column(table, col), stat)
                    if parts[0] == "token" and DERIVED_COLUMNS.get(col) in self.numeric_columns(table):
                        return self._stat(name, abs(self.column(table, DERIVED_COLUMNS[col])), stat)
            elif parts[0] == "accept" and len(parts) == 2 and parts[1] in CRITERIA:
                v = _number(self.metrics.get(f"accept_{parts[1]}", ""))
                if v is not None:
                    return v
                if f"accept_{parts[1]}" in self.numeric_columns("sequences"):
                    x = self.column("sequences", f"accept_{parts[1]}")
                    return float(x.mean()) if x.size else math.nan
            elif parts[0] == "bounds" and len(parts) == 2 and "@" in parts[1]:
                return self._bound(*parts[1].split("@", 1))
            elif parts[0] == "metrics" and len(parts) == 2:
                key = parts[1] if parts[1] in self.metrics else RENAMED.get(parts[1])
                if key in self.metrics:
                    if key != parts[1]:
                        self.notes[name] = f"renamed to metrics.{key} (verl's name)"
                    v = _number(self.metrics[key])
                    if v is not None:
                        return v
            elif parts[0] == "views" and len(parts) == 3:  # views.<view>.<stat>: truncated sampling
                by = self._by_view("views")
                stats = (by or {}).get(parts[1])
                if isinstance(stats, dict) and (parts[2] in stats or parts[2] in VIEW_STATS):
                    v = _number(stats.get(parts[2]))
                    if v is not None:
                        return v
                elif by is None and parts[1] in VIEWS and parts[2] in VIEW_STATS:
                    raise self._no_views(name)
            elif parts[0] == "breakdown" and len(parts) in (3, 4, 5):
                # breakdown.[<view>.]<bucket>.<stat>, the stat as kl_mean or kl.mean; no view: the report's view
                view = parts[1] if parts[1] in VIEWS else None
                rest = parts[2:] if view else parts[1:]
                stat = "_".join(rest[1:])
                if rest and rest[0] in BUCKETS and stat in BREAKDOWN_STATS:
                    return self._breakdown(name, view, rest[0], stat)
            elif name == "routing.flip_rate":
                r = self.summary.get("routing")
                if isinstance(r, dict) and "flip_rate" in r:
                    v = _number(r["flip_rate"])
                    if v is not None:
                        return v
                elif isinstance(r, dict):
                    raise UsageError(
                        f"'{self.path}' compared no routing ({r.get('reason', 'no reason given')})",
                        "drop the rule, or gate a report whose routing was compared",
                    )
        except ValueError:
            pass
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "list the names with `trm-diag gate --list-metrics DIR`"
        )
        raise UsageError(f"unknown metric '{name}' for report '{self.path}'", hint)

    def _summary_stat(self, name: str, col: str, stat: str) -> float | None:
        """token.<col>.<stat> from summary.json (None when it does not hold it): the same numbers as the
        table's (stats.describe over the same column); notes how many values were not finite."""
        m = self.metrics
        counts = "abs_log_ratio" if col in ("log_ratio", "k1") else col  # |x| is infinite or NaN where x is
        if f"token_{col}_{stat}" in m:
            v = _number(m[f"token_{col}_{stat}"])
        elif (col, stat) == ("log_ratio", "mean") and "kl" in m:
            v = _number(m["kl"])  # verl's kl is the mean of k1 = -log_ratio
            v = None if v is None else -v
        else:
            key = next((k for k, same in SAME_AS.items() if same == name and k in m), None)
            if key is None:
                return None
            v = _number(m[key])
        if v is None:
            return None
        n = m.get("n_tokens")
        parts = []
        if m.get(f"token_{counts}_n_inf"):
            of = f" of {n:,}" if isinstance(n, (int, float)) else ""
            parts.append(f"{m[f'token_{counts}_n_inf']:,}{of} values are infinite")
        if m.get(f"token_{counts}_n_nan"):
            parts.append(f"{m[f'token_{counts}_n_nan']:,} NaN skipped")
        if parts:
            self.notes[name] = "; ".join(parts)
        return v

    def _stat(self, name: str, x: np.ndarray, stat: str) -> float:
        """One statistic of a column (stats.describe: the summary's own); notes how many values were not finite."""
        from trm_diag.math.stats import describe

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
        from trm_diag.math.bounds import BOUND_NAMES, BoundInputs, all_bounds
        from trm_diag.math.metrics import bound_inputs

        if bound not in BOUND_NAMES:
            raise ValueError(bound)
        (T,) = parse_horizons(horizon, f"bounds.{bound}@T: T", fix=f"write e.g. bounds.{bound}@4096")  # 4096 or 4e3
        if self._bound_inputs is None:  # saved by the run; recomputed from the tables for older reports
            self._bound_inputs = BoundInputs.from_dict(self.summary.get("bound_inputs"))
        if self._bound_inputs is None:
            tok_cols = ("log_ratio", "pos", "kl", "tv", "kl_hi", "tv_hi", "k2", "k3")
            tokens = {c: self.column("tokens", c) for c in tok_cols if c in self.numeric_columns("tokens")}
            seqs = {c: self.column("sequences", c) for c in ("length", "log_seq_ratio")}
            self._bound_inputs = bound_inputs(tokens, seqs, self.fidelity)
        v = all_bounds(T, self._bound_inputs)[0][bound]
        return math.nan if v is None else float(v)


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
