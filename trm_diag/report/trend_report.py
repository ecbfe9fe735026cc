"""`trm-diag trend RUN` and `gate RUN`: a run's metrics versus step, the flags of math/trend.py, and the gate's
`trend.*` names over a run (docs/trend.md). Reads a Monitor run folder or a `score` report of a multi-step dump.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError, UsageError
from trm_diag.math.trend import Flag, TrendConfig, trend_flags
from trm_diag.report.run_log import RunData, read_run

AGGREGATES = ("last", "first", "max", "min", "mean")  # trend.<aggregate>.<metric> over the steps
FLAG_KINDS = ("spike", "drift", "acceptance")


@dataclass
class TrendResult:
    """A run read and judged: its data (steps, buckets) and the flags, oldest first."""

    data: RunData
    flags: list[Flag]
    config: TrendConfig

    def as_dict(self, rows: int | None = None) -> dict[str, Any]:
        steps = self.data.steps
        records = steps.to_dict("records") if rows is None else steps.tail(rows).to_dict("records")
        return {
            "run": str(self.data.path), "source": self.data.source, "n_steps": len(steps),
            "horizons": list(self.data.horizons), "notes": self.data.notes,
            "flags": [f.as_dict() for f in self.flags], "steps": records,
        }  # fmt: skip


def rows_shown(steps: list[int], flagged: set[int], rows: int) -> list[int]:
    """Indices of the steps listed: every step when they fit, else evenly spaced ones, the flagged ones and the last."""
    n = len(steps)
    if n <= rows:
        return list(range(n))
    every = max(1, n // rows)
    keep = set(range(0, n, every)) | {i for i, s in enumerate(steps) if s in flagged} | {n - 1}
    return sorted(keep)


def run_trend(path: str | Path, config: TrendConfig | None = None) -> TrendResult:
    """Read a run (or a multi-step `score` report) and flag what changed when."""
    cfg = config or TrendConfig()
    data = read_run(path)
    if data.steps.empty:
        return TrendResult(data, [], cfg)
    series = {k: data.steps[k].to_numpy() for k in data.steps.columns if k != "bucket"}
    return TrendResult(data, trend_flags(series, cfg), cfg)


def wants_run(path: str | Path, rules: list[str]) -> bool:
    """The gate reads ``path`` as a run: a Monitor folder, or a report gated by trend.* rules only."""
    from trm_diag.report.run_log import is_run

    return is_run(path) or (bool(rules) and all(r.strip().startswith("trend.") for r in rules))


class RunMetrics:
    """The gate's names over a run: trend.<aggregate>.<metric> (aggregate: last, first, max, min, mean over the
    steps; metric: a column of the step rows, or <column>.<stat> for token_<column>_<stat>), trend.flags (how
    many flags), trend.flags.<kind> and trend.steps. Duck-types report.gate_names.ReportMetrics for evaluate()."""

    def __init__(self, path: str | Path, config: TrendConfig | None = None) -> None:
        self.result = run_trend(path, config)
        self.path = Path(path)
        self.summary: dict[str, Any] = {}
        self.notes: dict[str, str] = {}
        steps = self.result.data.steps
        self.columns = [c for c in steps.columns if c not in ("step", "rank", "written", "attempt", "time", "bucket")
                        and steps[c].dtype.kind in "fiub"]  # fmt: skip
        if steps.empty:
            raise InputError(f"run '{path}' has no steps yet", "gate the run after its first Monitor.update")

    def names(self) -> list[str]:
        out = [f"trend.{a}.{c}" for a in AGGREGATES for c in self.columns]
        return out + ["trend.flags", *(f"trend.flags.{k}" for k in FLAG_KINDS), "trend.steps"]

    def _column(self, metric: str) -> str | None:
        if metric in self.columns:
            return metric
        col, _, stat = metric.rpartition(".")
        if col and f"token_{col}_{stat}" in self.columns:
            return f"token_{col}_{stat}"
        if col in self.columns and stat == "mean":  # k3_kl.mean: verl's k3_kl is already the mean over tokens
            self.notes[f"trend.x.{metric}"] = f"{col} is a mean over tokens already"
            return col
        return None

    def value(self, name: str) -> float:
        import numpy as np

        parts = name.split(".")
        res = self.result
        if name == "trend.steps":
            return float(len(res.data.steps))
        if parts[:2] == ["trend", "flags"] and len(parts) in (2, 3):
            if len(parts) == 3 and parts[2] not in FLAG_KINDS:
                raise UsageError(f"unknown metric '{name}'", f"use trend.flags or trend.flags.<{'|'.join(FLAG_KINDS)}>")
            flags = [f for f in res.flags if len(parts) == 2 or f.kind == parts[2]]
            if flags:
                self.notes[name] = "; ".join(f"{f.message} ({f.kind}: {f.action.split(':')[0]})" for f in flags[:3])
            return float(len(flags))
        if parts[0] == "trend" and len(parts) >= 3 and parts[1] in AGGREGATES:
            col = self._column(".".join(parts[2:]))
            if col is not None:
                x = res.data.steps[col].to_numpy(dtype=np.float64)
                note = self.notes.pop(f"trend.x.{'.'.join(parts[2:])}", "")
                if note:
                    self.notes[name] = note
                agg = parts[1]
                if agg in ("last", "first"):
                    return float(x[-1] if agg == "last" else x[0])
                ok = x[~np.isnan(x)]
                if not ok.size:
                    return math.nan
                return float({"max": np.max, "min": np.min, "mean": np.mean}[agg](ok))
        if len(parts) == 4 and parts[1] in AGGREGATES and parts[2] == "kl" and f"token_k1_{parts[3]}" in self.columns:
            agg, stat = parts[1], parts[3]
            raise UsageError(
                f"'{name}': a run keeps the sampled tier's numbers, with no per-token KL (kl is verl's mean of k1 "
                "over tokens)",
                f"use trend.{agg}.k1.{stat} (k1 = -log ratio per token) or trend.{agg}.abs_log_ratio.{stat}; "
                f"trend.{agg}.kl for verl's kl",
            )
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "list the names with `trm-diag gate --list-metrics RUN`"
        )
        raise UsageError(f"unknown metric '{name}' for run '{self.path}'", hint)
