"""Where the mismatch sits: token statistics per bucket of the rollout's probability of the sampled
token, of the entropy and of the position in the response, plus the profile along the response and
the histogram of the log ratio that report.html plots.

Pure numpy over token columns; the buckets are data (AXES), so a new bucket or axis is one edit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trm_diag.config import VIEWS
from trm_diag.math.stats import statistic

RATIO_BAND = (0.8, 1.25)  # the ratio band of the breakdowns: rho outside it counts as a large token ratio


@dataclass(frozen=True)
class Axis:
    """One way of bucketing tokens: the token column it reads, how it is transformed, the bucket edges
    (lower edges inclusive, the last bucket open above) and a name per bucket (no dots: the gate splits on them)."""

    name: str
    label: str  # axis title, with units
    column: str
    transform: str  # "exp" (log-prob -> probability) or "" (as stored)
    edges: tuple[float, ...]
    buckets: tuple[str, ...]
    ranges: tuple[str, ...]  # what each bucket spans, for people


AXES: tuple[Axis, ...] = (
    Axis(
        "prob", "rollout probability of the sampled token", "lp_roll", "exp",
        (0.0, 0.01, 0.1, 0.5, 0.9),
        ("prob_lt_1pct", "prob_1_10pct", "prob_10_50pct", "prob_50_90pct", "prob_gt_90pct"),
        ("< 1%", "1-10%", "10-50%", "50-90%", "> 90%"),
    ),
    Axis(
        "entropy", "entropy of the next-token distribution (nats)", "ent_roll", "",
        (0.0, 1e-3, 1e-2, 1e-1, 1.0),
        ("ent_lt_1e-3", "ent_1e-3_1e-2", "ent_1e-2_1e-1", "ent_1e-1_1", "ent_gt_1"),
        ("< 0.001", "0.001-0.01", "0.01-0.1", "0.1-1", "> 1"),
    ),
    Axis(
        "position", "position in the response (tokens)", "pos", "",
        (0, 16, 64, 256, 1024, 4096, 16384),
        ("pos_0_15", "pos_16_63", "pos_64_255", "pos_256_1023", "pos_1024_4095", "pos_4096_16383", "pos_ge_16384"),
        ("0-15", "16-63", "64-255", "256-1,023", "1,024-4,095", "4,096-16,383", ">= 16,384"),
    ),
)  # fmt: skip
AXIS = {a.name: a for a in AXES}
BUCKETS = {b: a for a in AXES for b in a.buckets}


def _finite_mean(x: np.ndarray) -> float:
    """Mean with NaN skipped and infinities kept (the report's one statistics function)."""
    return statistic(x, "mean")


def _p99(x: np.ndarray) -> float:
    return statistic(x, "p99")


def breakdown(
    values: np.ndarray, axis: Axis, kl: np.ndarray | None, log_ratio: np.ndarray
) -> list[dict[str, float | int | str]]:
    """One row per non-empty bucket of ``axis``: token count and share, KL mean / p99 and share of the
    total KL (when the tier has a per-token KL), mean |log ratio| and the fraction of tokens whose ratio
    exp(log ratio) lies outside RATIO_BAND. Tokens whose axis value is NaN fall in no bucket."""
    v = np.exp(values) if axis.transform == "exp" else values.astype(np.float64)
    idx = np.searchsorted(np.asarray(axis.edges, dtype=np.float64), v, side="right") - 1
    idx[np.isnan(v)] = -1
    total_kl = float(np.nansum(kl)) if kl is not None else math.nan
    abs_lr = np.abs(log_ratio)
    lo, hi = math.log(RATIO_BAND[0]), math.log(RATIO_BAND[1])
    outside = ((log_ratio < lo) | (log_ratio > hi)).astype(np.float64)
    outside[np.isnan(log_ratio)] = np.nan
    n_all = int((idx >= 0).sum())
    rows: list[dict[str, float | int | str]] = []
    for b, (name, span) in enumerate(zip(axis.buckets, axis.ranges)):
        sel = idx == b
        n = int(sel.sum())
        if n == 0:
            continue
        row: dict[str, float | int | str] = {"axis": axis.name, "bucket": name, "range": span, "n": n}
        row["token_share"] = n / n_all
        if kl is not None:
            k = kl[sel]
            row["kl_mean"] = _finite_mean(k)
            row["kl_p99"] = _p99(k)
            row["kl_share"] = float(np.nansum(k)) / total_kl if 0 < total_kl < math.inf else math.nan
        row["abs_log_ratio_mean"] = _finite_mean(abs_lr[sel])
        row["outside_band"] = _finite_mean(outside[sel])
        rows.append(row)
    return rows


def position_profile(pos: np.ndarray, columns: dict[str, np.ndarray], max_bins: int = 48) -> dict[str, list]:
    """Mean and p99 of each column in equal-width position bins (at most ``max_bins``), for plots of a
    divergence along the response. NaN values are skipped; a bin without values gives NaN."""
    if pos.size == 0:
        return {"pos_lo": [], "pos_hi": [], "n": []}
    top = int(pos.max()) + 1
    width = max(1, math.ceil(top / max_bins))
    bins = pos.astype(np.int64) // width
    order = np.argsort(bins, kind="stable")
    uniq, starts = np.unique(bins[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    out: dict[str, list] = {
        "pos_lo": [int(u * width) for u in uniq],
        "pos_hi": [int(min(top, (u + 1) * width) - 1) for u in uniq],
        "n": [int(e - s) for s, e in zip(starts, ends)],
    }
    for name, x in columns.items():
        xs = x[order]
        out[f"{name}_mean"] = [_finite_mean(xs[s:e]) for s, e in zip(starts, ends)]
        out[f"{name}_p99"] = [_p99(xs[s:e]) for s, e in zip(starts, ends)]
    return out


def histogram(x: np.ndarray, bins: int = 60) -> dict[str, list | int | float]:
    """Counts of x in ``bins`` equal bins over +-1.2 times its 99.9th absolute percentile (symmetric, so
    a bias shows); values beyond are counted in ``below`` / ``above``, NaN and inf in ``nonfinite``."""
    finite = x[np.isfinite(x)]
    nonfinite = int(x.size - finite.size)
    if finite.size == 0:
        return {"edges": [], "counts": [], "below": 0, "above": 0, "nonfinite": nonfinite}
    m = max(float(np.quantile(np.abs(finite), 0.999)) * 1.2, 1e-9)
    counts, edges = np.histogram(finite, bins=bins, range=(-m, m))
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "below": int((finite < -m).sum()),
        "above": int((finite > m).sum()),
        "nonfinite": nonfinite,
    }


def report_breakdowns(tokens, fidelity: str) -> dict[str, dict]:
    """summary.json's ``breakdowns``, ``profile`` and ``histograms`` from a report's token columns (a
    mapping of column name -> array-like; the tier's upper-valid KL and TV, else none)."""
    from trm_diag.tiers import TIERS

    t = TIERS[fidelity]

    def col(name: str) -> np.ndarray:
        return np.asarray(tokens[name], dtype=np.float64)

    kl = col(t.kl) if t.kl else None
    lr = col("log_ratio")
    ent = "ent_roll" if "ent_roll" in tokens else "ent_train"
    # each axis column read once (a report's columns may live on disk), shared by every view below
    values = {a.name: col(c) for a in AXES if (c := ent if a.name == "entropy" else a.column) in tokens}
    if "entropy" in values and values["entropy"].size and np.isnan(values["entropy"]).all():  # no trainer rows
        del values["entropy"]
        ent = None
    rows = [r for a in AXES if a.name in values for r in breakdown(values[a.name], a, kl, lr)]
    along = {"abs_log_ratio": np.abs(lr)}
    if t.kl:
        along[t.kl] = kl
    if t.tv:
        along[t.tv] = col(t.tv)
    by_view = {}
    if all(f"{k}_{v}" in tokens for v in VIEWS for k in ("kl", "lr")):  # truncated sampling: every view
        for v in VIEWS:
            kl_v, lr_v = col(f"kl_{v}"), col(f"lr_{v}")
            by_view[v] = [r for a in AXES if a.name in values for r in breakdown(values[a.name], a, kl_v, lr_v)]
    return {
        "breakdowns": {
            "kl_column": t.kl,
            "entropy_column": ent,
            "ratio_band": list(RATIO_BAND),
            "rows": rows,
            **({"by_view": by_view} if by_view else {}),
        },  # fmt: skip
        "profile": {"columns": sorted(along), **position_profile(values["position"], along)},
        "histograms": {"log_ratio": histogram(lr)},
    }
