"""Batch-level metrics: the headline numbers and the vocabulary of verl / slime rollout correction.

Sign convention (as verl's rollout-correction metrics): log_ratio = lp_train - lp_roll,
rho = exp(log_ratio) = pi_theta / pi_roll, the importance weight of the sampled token.
Pure numpy; DataFrames in, plain dicts of floats out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from trm_diag.bounds import BoundInputs
from trm_diag.config import Thresholds
from trm_diag.sequences import CRITERIA

if TYPE_CHECKING:
    import pandas as pd

QUANTILES = {"mean": None, "p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999, "max": 1.0}


def describe(x: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p99, p999, max, skipping NaN (non-finite logits) but keeping inf (zero-probability tokens)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return dict.fromkeys(QUANTILES, math.nan)
    out = {"mean": float(x.mean())}
    finite = bool(np.isfinite(x).all())
    names = [k for k, q in QUANTILES.items() if q is not None]
    # one partition for every quantile; interpolating towards an infinity gives nan, so then take
    # the order statistic above instead
    qs = np.quantile(x, [QUANTILES[k] for k in names], method="linear" if finite else "higher")
    out.update({k: float(v) for k, v in zip(names, qs)})
    return out


def _ess(log_w: np.ndarray) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1], from log-weights."""
    log_w = log_w[np.isfinite(log_w)]
    if log_w.size == 0:
        return math.nan
    w = np.exp(log_w - log_w.max())  # scale-free
    return float(w.sum() ** 2 / (log_w.size * (w * w).sum()))


def batch_metrics(tokens: pd.DataFrame, seqs: pd.DataFrame, fidelity: str, thresholds: Thresholds) -> dict[str, float]:
    """Flat dict of batch metrics (names are stable: the gate and summary.json use them)."""
    lr = tokens["log_ratio"].to_numpy(dtype=np.float64)
    rho = np.exp(lr)
    m: dict[str, float] = {"n_tokens": int(len(tokens)), "n_sequences": int(len(seqs))}
    m["abs_log_ratio_mean"] = float(np.mean(np.abs(lr))) if lr.size else math.nan
    m["abs_log_ratio_max"] = float(np.max(np.abs(lr))) if lr.size else math.nan
    m["k1_mean"] = float(tokens["k1"].mean())  # mean log p_roll - log p_train: verl's KL (k1)
    m["k3_mean"] = float(tokens["k3"].mean())
    m["chi2_token"] = float(np.mean(rho * rho) - 1.0) if lr.size else math.nan
    seq_lr = seqs["log_seq_ratio"].to_numpy(dtype=np.float64)
    with np.errstate(over="ignore"):
        m["chi2_seq"] = float(np.mean(np.exp(2.0 * seq_lr)) - 1.0) if seq_lr.size else math.nan
    m["ess_token"] = _ess(lr)
    m["ess_seq"] = _ess(seq_lr)
    for c in (2.0, 5.0):
        m[f"frac_ratio_outside_{c:g}"] = float(np.mean((rho > c) | (rho < 1.0 / c))) if lr.size else math.nan
    # perplexities per sequence, then averaged (verl: rollout_ppl, training_ppl, ppl_ratio)
    ppl_roll = np.exp(-seqs["lp_roll_mean"].to_numpy())
    ppl_train = np.exp(-seqs["lp_train_mean"].to_numpy())
    m["ppl_roll"] = float(np.nanmean(ppl_roll)) if len(seqs) else math.nan
    m["ppl_train"] = float(np.nanmean(ppl_train)) if len(seqs) else math.nan
    m["ppl_ratio"] = float(np.nanmean(ppl_train / ppl_roll)) if len(seqs) else math.nan
    m["log_ppl_diff"] = float(np.nanmean(seqs["lp_roll_mean"] - seqs["lp_train_mean"])) if len(seqs) else math.nan
    m["log_ppl_abs_diff"] = float(np.nanmean(seqs["ppl_gap"])) if len(seqs) else math.nan
    tier_cols = {"exact": ("kl", "kl_rev", "tv"), "topk": ("kl_lo", "kl_hi", "tv_lo", "tv_hi"), "sampled": ()}
    for col in (*tier_cols[fidelity], "abs_log_ratio", "k2", "k3", "tv_bin", "kl_bin", "ent_train"):
        if col == "abs_log_ratio":
            values = np.abs(lr)
        elif col in tokens:
            values = tokens[col].to_numpy(dtype=np.float64)
        else:
            continue
        for stat, v in describe(values).items():
            m[f"token_{col}_{stat}"] = v
    if fidelity == "exact" and "prefill_gap" in tokens:
        gap = np.abs(tokens["prefill_gap"].to_numpy(dtype=np.float64))
        m["prefill_gap_abs_mean"] = float(np.nanmean(gap)) if gap.size else math.nan
        m["prefill_gap_abs_max"] = float(np.nanmax(gap)) if gap.size else math.nan
    for name in CRITERIA:
        m[f"accept_{name}"] = float(seqs[f"accept_{name}"].mean()) if len(seqs) else math.nan
    # DPPO (no rewards here): fraction of tokens whose binary divergence exceeds its threshold
    m["dppo_tv_token_frac"] = float(np.mean(tokens["tv_bin"] > thresholds.dppo_tv)) if lr.size else math.nan
    m["dppo_kl_token_frac"] = float(np.mean(tokens["kl_bin"] > thresholds.dppo_kl)) if lr.size else math.nan
    return m


def bound_inputs(tokens: Any, seqs: Any, fidelity: str) -> BoundInputs:
    """Estimate delta, eps, D_KL^seq, D_TV^seq and Dbar_t from a report (DESIGN.md section 2).

    exact: delta = max kl, eps = max tv (empirical maxima over the sampled positions),
    D_KL^seq = mean_i sum_t kl, Dbar_t = mean_i tv_{i,t} (0 after a response ended).
    topk: the same from the certified upper ends kl_hi / tv_hi (upper-valid).
    sampled: k2 max and k3 sums stand in for delta and D_KL^seq ('heuristic'), and no
    TV input is produced: binary and lower-end values never feed a bound.
    D_TV^seq is always the unbiased Monte-Carlo mean_i max(0, 1 - prod_t rho_t).
    """

    def col(frame, name: str) -> np.ndarray:  # works for DataFrames and dicts of arrays alike
        return np.asarray(frame[name], dtype=np.float64)

    n_seq, n_tok = len(seqs["length"]), len(tokens["log_ratio"])
    inp = BoundInputs(samples={"sequences": n_seq, "tokens": n_tok})
    if n_seq == 0 or n_tok == 0:
        return inp
    lengths = np.asarray(seqs["length"])
    inp.seq_T = int(lengths.max())
    seq_lr = col(seqs, "log_seq_ratio")
    with np.errstate(over="ignore"):
        inp.tv_seq = float(np.nanmean(np.maximum(0.0, 1.0 - np.exp(seq_lr))))
    inp.source["tv_seq"] = f"measured (Monte-Carlo over {n_seq} rollouts)"
    if fidelity in ("exact", "topk"):
        kl_col, tv_col = ("kl", "tv") if fidelity == "exact" else ("kl_hi", "tv_hi")
        how = "" if fidelity == "exact" else ", certified top-K upper ends"
        kl, tv = col(tokens, kl_col), col(tokens, tv_col)
        inp.delta = float(np.nanmax(kl))
        inp.eps = float(np.nanmax(tv))
        inp.kl_seq = float(np.nansum(kl) / n_seq)
        inp.kl_rate = float(np.nanmean(kl))
        inp.tv_rate = float(np.nanmean(tv))
        pos = np.asarray(tokens["pos"], dtype=np.int64)
        inp.dbar = np.bincount(pos, weights=np.nan_to_num(tv), minlength=inp.seq_T) / n_seq
        inp.source.update(
            delta=f"measured (empirical max over {n_tok} tokens{how})",
            eps=f"measured (empirical max over {n_tok} tokens{how})",
            kl_seq=f"measured (mean over {n_seq} rollouts{how})",
            dbar=f"measured (mean over {n_seq} rollouts{how})",
        )
    else:
        k2, k3 = col(tokens, "k2"), col(tokens, "k3")
        inp.delta = float(np.nanmax(k2))
        inp.kl_seq = float(np.nansum(k3) / n_seq)
        inp.kl_rate = float(np.nanmean(k3))
        inp.source.update(delta="heuristic (k2 max; exact KL needs full logits)", kl_seq="heuristic (k3 mean)")
    return inp
