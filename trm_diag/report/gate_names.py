"""The gate's metric names and their values in a report (ReportMetrics): one name per number, summary.json
first, a table only for a name the summary does not hold. The rule language, evaluation and output formats are
in gate.py; the names are documented there.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.config import VIEWS, parse_horizons
from trm_diag.criteria import CRITERIA
from trm_diag.errors import UsageError
from trm_diag.schema import BREAKDOWN_STATS, ID_COLUMNS

if TYPE_CHECKING:  # numpy, the Parquet stack and the statistics load only for rules that read tables
    import numpy as np


def _stat_names() -> tuple[str, ...]:
    from trm_diag.math.stats import STATS

    return tuple(STATS)


VIEW_STATS = ("bias", "kl_mean", "kl_p99", "accept_trm_max", "accept_trm_avg", "ppo_clip_frac", "dapo_clip_frac")


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
# certify.<key>: summary.json `certification` (math/certify.py); n_rows_differing in the exact tier only
CERTIFY_KEYS = ("n_tokens_differing", "max_abs_log_ratio", "n_rows_differing")


def defined_by(name: str) -> str:
    """'verl' for a metrics.<name> (or a run's trend.<aggregate>.<name>) that has verl's name and definition
    (docs/metrics.md), else 'trm-diag'."""
    from trm_diag.math.metrics import METRICS

    parts = name.split(".")
    if parts[0] == "trend" and len(parts) == 3:  # trend.<aggregate>.<metric> of a run: the step rows' metric
        parts = ["metrics", parts[2]]
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
        cert = self.summary.get("certification")
        if isinstance(cert, dict):
            out += [f"certify.{k}" for k in CERTIFY_KEYS if _number(cert.get(k, "")) is not None]
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
            elif parts[0] == "certify" and len(parts) == 2 and parts[1] in CERTIFY_KEYS:
                return self._certify(name, parts[1])
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
        other_tier = self._exact_only(parts)
        if other_tier is not None:
            raise other_tier
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "list the names with `trm-diag gate --list-metrics DIR`"
        )
        raise UsageError(f"unknown metric '{name}' for report '{self.path}'", hint)

    def _exact_only(self, parts: list[str]) -> UsageError | None:
        """Why token.<column>.<stat> of a column only the exact tier fills has no value here, and this tier's
        nearest names (the top-K tier brackets kl and tv; the sampled tier estimates from the sampled tokens)."""
        from trm_diag.tiers import TIERS

        exact = TIERS["exact"]
        if parts[0] != "token" or len(parts) != 3 or self.fidelity == "exact" or parts[1] not in exact.columns:
            return None
        name, col, stat = ".".join(parts), parts[1], parts[2]
        if self.fidelity == "topk" and f"{col}_hi" in TIERS["topk"].columns:
            use = f"token.{col}_hi.{stat} (its certified upper end; token.{col}_lo.{stat} the lower)"
            why = f"the topk tier brackets the per-token {col}"
        elif self.fidelity == "sampled":
            k3 = f"token.k3.{stat} or " if col.startswith("kl") else ""
            use = f"{k3}token.abs_log_ratio.{stat} (estimates from the sampled tokens)"
            why = f"the sampled tier has no per-token {col} (no full rows)"
        else:
            use = f"a name `trm-diag gate --list-metrics {self.path}` lists"
            why = f"the {self.fidelity} tier has no {col}"
        return UsageError(
            f"'{name}' needs the exact tier: {why}; '{self.path}' is {self.fidelity}",
            f"use {use}, or gate a report of `compare --fidelity exact`",
        )

    def _certify(self, name: str, key: str) -> float:
        """certify.<key> from summary.json `certification` (bit-for-bit comparison of the two sides)."""
        cert = self.summary.get("certification")
        if not isinstance(cert, dict):
            raise UsageError(
                f"report '{self.path}' keeps no certification (written by an older trm-diag)",
                "re-run the command that wrote it",
            )
        if key not in cert:
            raise UsageError(
                f"'{name}' needs the exact tier (full rows of both sides); '{self.path}' is {self.fidelity}",
                "gate a report of `compare --fidelity exact`, or drop the rule",
            )
        v = _number(cert[key])
        if v is not None and v != v:
            self.notes[name] = "the full rows were not compared"
        return math.nan if v is None else v

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
            tok_cols = ("log_ratio", "pos", "kl", "tv", "kl_hi", "tv_hi", "k1", "k2", "k3")
            tokens = {c: self.column("tokens", c) for c in tok_cols if c in self.numeric_columns("tokens")}
            seqs = {c: self.column("sequences", c) for c in ("length", "log_seq_ratio")}
            self._bound_inputs = bound_inputs(tokens, seqs, self.fidelity)
        v = all_bounds(T, self._bound_inputs)[0][bound]
        return math.nan if v is None else float(v)
