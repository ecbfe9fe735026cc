"""Per-sequence statistics and the masking criteria (docs/design.md sections 2 and 4).

Pure numpy over the flat per-token arrays of a batch plus the sequence offsets, so the
same code serves any number of sequences without Python loops over tokens.
"""

from __future__ import annotations

import numpy as np

from trm_diag.config import Thresholds
from trm_diag.criteria import CRITERIA
from trm_diag.tiers import TIERS


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and segment ids for flat arrays laid out sequence after sequence."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return starts, seg


def _seg_reduce(x: np.ndarray, lengths: np.ndarray, op: str) -> np.ndarray:
    """sum / mean / max of x over each sequence; NaN for an empty sequence and for one holding a NaN
    (a token nobody could score: non-finite logits), so such a sequence fails every mask; inf is kept."""
    out = np.full(len(lengths), np.nan)
    nonempty = lengths > 0
    if not nonempty.any():
        return out
    starts, _ = _segments(lengths)
    s = starts[nonempty]
    if op in ("sum", "mean"):
        with np.errstate(invalid="ignore"):  # inf - inf inside a sum: NaN, as the sum is undefined
            vals = np.add.reduceat(x, s)
        if op == "mean":
            vals = vals / lengths[nonempty]
    elif op == "max":
        vals = np.maximum.reduceat(x, s)  # NaN propagates through maximum
    else:
        raise ValueError(op)
    out[nonempty] = vals
    return out


def per_sequence(x: np.ndarray, lengths: np.ndarray, op: str) -> np.ndarray:
    """sum / mean / max of a flat token column over each sequence (a NaN token makes it NaN, inf kept)."""
    return _seg_reduce(np.asarray(x, dtype=np.float64), np.asarray(lengths, dtype=np.int64), op)


def _seg_argmax(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Position (within its sequence) of each sequence's max of x, a NaN (unscored) token counting as the
    worst; -1 for empty sequences."""
    starts, seg = _segments(lengths)
    x = np.where(np.isnan(x), np.inf, x)
    mx = _seg_reduce(x, lengths, "max")
    out = np.full(len(lengths), -1, dtype=np.int64)
    if len(x) == 0:
        return out
    hit = np.where(x == mx[seg])[0]
    first = np.full(len(lengths), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, seg[hit], hit - starts[seg[hit]])  # earliest position of the max
    found = first != np.iinfo(np.int64).max
    out[found] = first[found]
    return out


def mc_tv(log_ratio: np.ndarray) -> np.ndarray:
    """(1 - rho_t)^+ per token: E_{y ~ pi_roll}[(1 - q(y)/p(y))^+] = sum_v (p_v - q_v)^+ = TV(p, q) exactly,
    whatever p's support (truncated sampling included), where E|rho - 1| = 2 TV - (1 - Q_t) (docs/design.md
    section 9). NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.maximum(0.0, -np.expm1(np.asarray(log_ratio, dtype=np.float64)))


def ln_trm_scores(abs_rho_m1: np.ndarray, lengths: np.ndarray, delta: float) -> np.ndarray:
    """W~ = sum_t |rho_t - 1| w_t / sum_t w_t per sequence (0 when every weight is 0, T = 1); the caller
    passes the tier's stand-in for |rho_t - 1| (2 tv, 2 tv_hi or 2 (1 - rho_t)^+: tiers.Tier.tv_token)."""
    starts, seg = _segments(lengths)
    pos = np.arange(len(abs_rho_m1)) - starts[seg]  # 0-based t - 1
    t_len = lengths[seg].astype(np.float64)
    w = np.minimum(1.0, np.sqrt((t_len - (pos + 1)) * delta / 2.0))
    num = _seg_reduce(abs_rho_m1 * w, lengths, "sum")
    den = _seg_reduce(w, lengths, "sum")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(lengths > 0, 0.0, np.nan))


def sequence_stats(
    tok: dict[str, np.ndarray], lengths: np.ndarray, th: Thresholds, basis: str | None = None
) -> dict[str, np.ndarray]:
    """Aggregates of one row per sequence from flat token columns.

    ``tok`` needs log_ratio, k1, k2, k3, abs_rho_m1, lp_roll, lp_train, tv_bin, kl_bin,
    and whichever of kl, tv, kl_rev, kl_lo, kl_hi, tv_lo, tv_hi the fidelity tier has.
    ``basis`` (exact, topk, sampled; default: exact when kl is given) picks what the
    TRM-Max / TRM-Avg masks test (tiers.Tier.trm_max / trm_avg) and the per-token TV that SER and
    LN-TRM average (tiers.Tier.tv_token; the sampled tier's tv_mc is derived from log_ratio).
    ``worst_pos``: each sequence's position of the tier's locate column max (kl, kl_hi or k2).
    """
    basis = basis or ("exact" if "kl" in tok else "sampled")
    lengths = np.asarray(lengths, dtype=np.int64)
    lr = tok["log_ratio"]
    out: dict[str, np.ndarray] = {"length": lengths}
    for col in ("kl", "tv", "kl_rev", "kl_lo", "kl_hi", "tv_lo", "tv_hi"):
        if col in tok:
            out[f"{col}_sum"] = _seg_reduce(tok[col], lengths, "sum")
            out[f"{col}_mean"] = _seg_reduce(tok[col], lengths, "mean")
            out[f"{col}_max"] = _seg_reduce(tok[col], lengths, "max")
    tier = TIERS[basis]
    out["worst_pos"] = _seg_argmax(tok[tier.locate], lengths)
    with np.errstate(invalid="ignore"):  # k1 = -inf (rollout probability 0): no KL estimate, the mask fails
        out["k1_mean"] = _seg_reduce(np.where(np.isneginf(tok["k1"]), np.nan, tok["k1"]), lengths, "mean")
    out["k2_max"] = _seg_reduce(tok["k2"], lengths, "max")
    out["k3_mean"] = _seg_reduce(tok["k3"], lengths, "mean")
    out["abs_log_ratio_max"] = _seg_reduce(np.abs(lr), lengths, "max")
    out["log_seq_ratio"] = _seg_reduce(lr, lengths, "sum")  # log prod rho_t
    mean_lr = _seg_reduce(lr, lengths, "mean")
    out["geo_mean_ratio"] = np.exp(mean_lr)
    out["ppl_gap"] = np.abs(mean_lr)  # |log PPL_roll - log PPL_train| (the paper's Delta_PPL)
    two_tv = 2.0 * (tok[tier.tv_token] if tier.tv_token in tok else mc_tv(lr))  # stands in for |rho - 1|
    out["abs_rho_m1_mean"] = _seg_reduce(tok["abs_rho_m1"], lengths, "mean")  # the paper's SER statistic as is
    out["ser"] = _seg_reduce(two_tv, lengths, "mean")
    out["ln_trm"] = ln_trm_scores(two_tv, lengths, th.ln_delta)
    out["lp_roll_mean"] = _seg_reduce(tok["lp_roll"], lengths, "mean")
    out["lp_train_mean"] = _seg_reduce(tok["lp_train"], lengths, "mean")
    out["dppo_tv_frac"] = _seg_reduce((tok["tv_bin"] > th.dppo_tv).astype(np.float64), lengths, "mean")
    out["dppo_kl_frac"] = _seg_reduce((tok["kl_bin"] > th.dppo_kl).astype(np.float64), lengths, "mean")
    out.update(accept_flags(out, th, basis))
    return out


def accept_flags(seq: dict[str, np.ndarray], th: Thresholds, basis: str) -> dict[str, np.ndarray]:
    """One boolean per sequence and criterion (docs/design.md section 4); empty sequences pass and
    NaN scores (non-finite inputs) fail."""
    empty = seq["length"] == 0
    flags = {}
    for name, c in CRITERIA.items():
        if c.score is not None:
            flags[f"accept_{name}"] = empty | (seq[c.score(TIERS[basis])] <= getattr(th, c.threshold))
        else:
            flags[f"accept_{name}"] = np.logical_and.reduce([flags[f"accept_{r}"] for r in c.requires])
    return flags
