"""Masking analysis: acceptance versus threshold and versus length (docs/design.md section 4).

TRM-Max rejects a sequence when any token exceeds delta, so with i.i.d. violations at a
per-token rate p its acceptance is about (1 - p)^T: long sequences are dropped more.
These tables let a user see that length bias next to the measured acceptance. Pure numpy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trm_diag.config import Thresholds
from trm_diag.criteria import CRITERIA, SCORED
from trm_diag.tiers import TIERS

SWEEP_FACTORS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def _scores(seqs: pd.DataFrame, basis: str) -> dict[str, tuple[np.ndarray, str]]:
    """criterion -> (per-sequence score, threshold field of Thresholds), for criteria with a score."""
    return {
        name: (seqs[CRITERIA[name].score(TIERS[basis])].to_numpy(dtype=np.float64), CRITERIA[name].threshold)
        for name in SCORED
    }


def _accept(score: np.ndarray, length: np.ndarray, limit: float) -> np.ndarray:
    return (length == 0) | (score <= limit)


def threshold_sweep(seqs: pd.DataFrame, th: Thresholds, basis: str) -> list[dict]:
    """Acceptance of each criterion at the default threshold times each of SWEEP_FACTORS."""
    length = seqs["length"].to_numpy()
    rows = []
    for name, (score, field) in _scores(seqs, basis).items():
        base = getattr(th, field)
        for f in SWEEP_FACTORS:
            limit = base * f
            rows.append(
                {
                    "criterion": name,
                    "factor": f,
                    "threshold": limit,
                    "acceptance": float(_accept(score, length, limit).mean()) if len(length) else float("nan"),
                }
            )
    return rows


def length_buckets(lengths: np.ndarray, n_buckets: int = 4) -> list[tuple[int, int]]:
    """Up to n_buckets contiguous length ranges holding similar numbers of sequences."""
    if len(lengths) == 0:
        return []
    qs = np.unique(np.quantile(lengths, np.linspace(0, 1, n_buckets + 1)).round().astype(int))
    edges = [(int(lengths.min()) if i == 0 else int(qs[i]) + 1, int(qs[i + 1])) for i in range(len(qs) - 1)]
    return [(lo, hi) for lo, hi in edges if lo <= hi] or [(int(lengths.min()), int(lengths.max()))]


def acceptance_by_length(tokens: pd.DataFrame, seqs: pd.DataFrame, th: Thresholds, basis: str) -> list[dict]:
    """Acceptance per criterion in each length bucket, with the (1 - p)^T prediction for TRM-Max.

    p is the measured per-token violation rate of the TRM-Max score over all tokens.
    """
    p = token_violation_rate(tokens, th, basis)
    length = seqs["length"].to_numpy()
    scores = _scores(seqs, basis)
    rows = []
    for lo, hi in length_buckets(length):
        sel = (length >= lo) & (length <= hi)
        if not sel.any():
            continue
        row = {"lengths": f"{lo}-{hi}", "n": int(sel.sum()), "mean_T": float(length[sel].mean())}
        for name, (score, field) in scores.items():
            row[name] = float(_accept(score[sel], length[sel], getattr(th, field)).mean())
        row["trm_max_predicted"] = float(np.mean((1.0 - p) ** length[sel])) if p == p else float("nan")
        rows.append(row)
    return rows


def token_violation_rate(tokens: pd.DataFrame, th: Thresholds, basis: str) -> float:
    """Fraction of tokens whose TRM-Max score exceeds its threshold (the p of (1 - p)^T)."""
    s = tokens[TIERS[basis].locate].to_numpy(dtype=np.float64)
    s = s[~np.isnan(s)]
    return float((s > th.trm_max).mean()) if s.size else float("nan")


def thresholds_for_target(seqs: pd.DataFrame, basis: str, target: float = 0.7) -> dict[str, float | None]:
    """Per criterion, the smallest threshold that keeps at least ``target`` of the sequences (empty
    sequences always pass, NaN scores never do); None where no threshold does."""
    length = seqs["length"].to_numpy()
    need = int(np.ceil(target * len(length) - 1e-9)) - int((length == 0).sum())  # non-empty ones that must pass
    out: dict[str, float | None] = {}
    for name, (score, _) in _scores(seqs, basis).items():
        s = np.sort(score[(length > 0) & ~np.isnan(score)])
        out[name] = 0.0 if need <= 0 else (float(s[need - 1]) if need <= len(s) else None)
    return out
