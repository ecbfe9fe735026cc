"""Batch-level metrics: the headline numbers and the vocabulary of verl / slime rollout correction.

Sign convention (as verl's rollout-correction metrics): log_ratio = lp_train - lp_roll,
rho = exp(log_ratio) = pi_theta / pi_roll, the importance weight of the sampled token.
Pure numpy; DataFrames in, plain dicts of floats out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from trm_diag.config import CLIP_BANDS, Thresholds
from trm_diag.criteria import CRITERIA
from trm_diag.math.bounds import BoundInputs
from trm_diag.math.sequences import mc_tv
from trm_diag.math.stats import describe, upper_mean
from trm_diag.tiers import TIERS

if TYPE_CHECKING:
    import pandas as pd

SAFETY_BOUND = 20.0  # verl clamps log ratios to [-20, 20] before exponentiating (chi2, IS weights)
IS_THRESHOLD = 2.0  # verl's default rollout_is_threshold C: IS weights clamped to [1/C, C] for its ESS
NARROW_BAND = (0.9, 1.1)  # frac_ratio_outside_10pct: the band a batch-shape audit reports (sweep --arms batch)
SUMMARY_STATS = ("mean", "p50", "p90", "p99", "p999", "max")  # token_<column>_<stat> in summary.json

# Every batch metric: name -> (formula, counterpart). A counterpart "verl" means verl's literal name
# and definition (rollout_corr_helper.compute_offpolicy_metrics / compute_is_metrics); anything else
# is trm-diag's own. docs/metrics.md is checked against this table.
METRICS: dict[str, tuple[str, str]] = {
    "n_tokens": ("number of response tokens", "trm-diag"),
    "n_sequences": ("number of rollouts", "trm-diag"),
    "kl": ("mean over tokens of lp_roll - lp_train (k1 estimator of KL(pi_roll || pi_theta))", "verl"),
    "k3_kl": ("mean over tokens of rho - 1 - log rho (k3 estimator)", "verl"),
    "training_ppl": ("mean over sequences of exp(-mean_t lp_train)", "verl"),
    "training_log_ppl": ("mean over sequences of -mean_t lp_train", "verl"),
    "rollout_ppl": ("mean over sequences of exp(-mean_t lp_roll)", "verl"),
    "rollout_log_ppl": ("mean over sequences of -mean_t lp_roll", "verl"),
    "log_ppl_diff": ("mean over sequences of d_i = mean_t lp_roll - mean_t lp_train", "verl"),
    "log_ppl_abs_diff": ("mean over sequences of |d_i|", "verl"),
    "log_ppl_diff_max": ("max over sequences of d_i", "verl"),
    "log_ppl_diff_min": ("min over sequences of d_i", "verl"),
    "ppl_ratio": ("mean over sequences of exp(d_i) = training PPL / rollout PPL", "verl"),
    "chi2_token": ("mean over tokens of exp(clamp(log rho, -20, 20))^2, minus 1", "verl"),
    "chi2_seq": ("mean over sequences of exp(2 clamp(sum_t log rho, -20, 20)), minus 1", "verl"),
    "rollout_is_eff_sample_size_token": (
        "verl's rollout_is_eff_sample_size with rollout_is=token: 1 / mean_t (w_t / mean w)^2, "
        "w_t = clip(exp(clamp(log rho_t, -20, 20)), 1/2, 2)",
        "verl",
    ),
    "rollout_is_eff_sample_size_seq": (
        "verl's rollout_is_eff_sample_size with rollout_is=sequence: as the token one with every token of "
        "sequence i weighted w_i = clip(exp(clamp(sum_t log rho_t, -20, 20)), 1/2, 2)",
        "verl",
    ),
    "ess_token": ("(sum rho)^2 / (n sum rho^2) over tokens, unclamped (Kish ESS, normalised)", "trm-diag"),
    "ess_seq": ("(sum w)^2 / (n sum w^2), w_i = prod_t rho_t, one weight per sequence, unclamped", "trm-diag"),
    "abs_log_ratio_mean": ("mean over tokens of |log rho|", "trm-diag"),
    "abs_rho_m1_mean": (
        "mean over tokens of |rho - 1| (the paper's SER statistic; E = 2 TV - (1 - Q_t): low under truncation)",
        "trm-diag",
    ),
    "tv_mc_mean": (
        "mean over tokens of (1 - rho)^+, an unbiased estimate of the mean token TV(pi_roll, pi_theta) under any "
        "truncation when the rollouts were drawn from pi_roll (docs/design.md section 9)",
        "trm-diag",
    ),
    "abs_log_ratio_max": ("max over tokens of |log rho|", "trm-diag"),
    "frac_ratio_outside_2": (
        "fraction of tokens with rho > 2 or rho < 1/2",
        "trm-diag (verl: rollout_is_ratio_fraction_high + _low at C = 2)",
    ),
    "frac_ratio_outside_5": ("fraction of tokens with rho > 5 or rho < 1/5", "trm-diag"),
    "ppo_clip_frac": (
        "fraction of tokens whose rho leaves PPO's clip band [1 - 0.2, 1 + 0.2] through the mismatch alone "
        "(the policies are equal before the update): the tokens whose gradient PPO clips before learning",
        "trm-diag",
    ),
    "dapo_clip_frac": ("the same for DAPO's band [1 - 0.2, 1 + 0.28]", "trm-diag"),
    "ppo_clip_flip_pos": (
        "clip-status flips for a positive advantage: fraction of tokens with rho > 1 + 0.2, whose gradient PPO's "
        "clipped objective zeroes only because the two passes disagree (in exact arithmetic rho = 1)",
        "trm-diag",
    ),
    "ppo_clip_flip_neg": (
        "the same for a negative advantage: fraction of tokens with rho < 1 - 0.2; pos + neg = ppo_clip_frac",
        "trm-diag",
    ),
    "dapo_clip_flip_pos": ("the same under DAPO's clip-higher: fraction of tokens with rho > 1 + 0.28", "trm-diag"),
    "dapo_clip_flip_neg": ("DAPO, negative advantage: rho < 1 - 0.2 (= ppo_clip_flip_neg)", "trm-diag"),
    "frac_ratio_outside_10pct": (
        "fraction of tokens with rho outside the band [0.9, 1.1] (|rho - 1| > 0.1): the batch-shape band",
        "trm-diag",
    ),
    "kl_share_low_prob": (
        "share of the summed per-token KL (upper ends in the top-K tier) on tokens whose rollout probability "
        "is below 1% (exact and top-K tiers)",
        "trm-diag",
    ),
    "token_<column>_<stat>": (
        "stat (mean p50 p90 p99 p999 max) of a token column; NaN skipped, inf kept",
        "trm-diag",
    ),
    "token_<column>_n_inf": ("how many values of the token column are +/-inf", "trm-diag"),
    "token_<column>_n_nan": ("how many values of the token column are NaN (skipped)", "trm-diag"),
    "prefill_gap_abs_mean": ("mean |lp_roll_prefill - lp_roll| (exact tier)", "trm-diag"),
    "prefill_gap_abs_max": ("max |lp_roll_prefill - lp_roll| (exact tier)", "trm-diag"),
    "accept_<criterion>": (
        "fraction of sequences a masking criterion keeps (docs/design.md section 4)",
        "trm-diag (paper)",
    ),
    "dppo_tv_token_frac": ("fraction of tokens with binary TV above --dppo-tv", "trm-diag (DPPO)"),
    "dppo_kl_token_frac": ("fraction of tokens with binary KL above --dppo-kl", "trm-diag (DPPO)"),
}
# names of earlier versions, still understood by the gate
RENAMED = {"k1_mean": "kl", "k3_mean": "k3_kl", "ppl_roll": "rollout_ppl", "ppl_train": "training_ppl"}


def _ess(log_w: np.ndarray) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1], from log-weights."""
    log_w = log_w[np.isfinite(log_w)]
    if log_w.size == 0:
        return math.nan
    w = np.exp(log_w - log_w.max())  # scale-free
    return float(w.sum() ** 2 / (log_w.size * (w * w).sum()))


def verl_ess(log_w: np.ndarray, counts: np.ndarray) -> float:
    """verl's rollout_is_eff_sample_size: 1 / E[(w / E w)^2] over tokens, each weight counted
    ``counts`` times (1 per token, or a sequence's length), w = clip(exp(clamp(log_w, +-20)), 1/C, C)."""
    keep = ~np.isnan(log_w) & (counts > 0)
    if not keep.any():
        return math.nan
    w = np.clip(np.exp(np.clip(log_w[keep], -SAFETY_BOUND, SAFETY_BOUND)), 1.0 / IS_THRESHOLD, IS_THRESHOLD)
    c = counts[keep].astype(np.float64)
    mean = float((w * c).sum() / c.sum())
    return float(1.0 / (((w / (mean + 1e-8)) ** 2 * c).sum() / c.sum()))


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def batch_metrics(tokens: pd.DataFrame, seqs: pd.DataFrame, fidelity: str, thresholds: Thresholds) -> dict[str, float]:
    """Flat dict of batch metrics, named as in :data:`METRICS` (the gate and summary.json use them).

    Tokens with NaN (non-finite logits) are skipped; empty sequences have no per-sequence mean.
    """
    lr = tokens["log_ratio"].to_numpy(dtype=np.float64)
    ok = ~np.isnan(lr)
    lr_ok = lr[ok]
    rho = np.exp(lr_ok)
    m: dict[str, float] = {"n_tokens": int(len(tokens)), "n_sequences": int(len(seqs))}
    m["kl"] = _nanmean(-lr)
    with np.errstate(invalid="ignore"):  # inf - inf where a token has probability 0
        m["k3_kl"] = _nanmean(tokens["k3"].to_numpy(dtype=np.float64))
    lp_roll = seqs["lp_roll_mean"].to_numpy(dtype=np.float64)
    lp_train = seqs["lp_train_mean"].to_numpy(dtype=np.float64)
    d = lp_roll - lp_train  # per sequence: log rollout PPL ratio (NaN for empty sequences)
    with np.errstate(over="ignore", invalid="ignore"):
        m["training_ppl"] = _nanmean(np.exp(-lp_train))
        m["training_log_ppl"] = _nanmean(-lp_train)
        m["rollout_ppl"] = _nanmean(np.exp(-lp_roll))
        m["rollout_log_ppl"] = _nanmean(-lp_roll)
        m["log_ppl_diff"] = _nanmean(d)
        m["log_ppl_abs_diff"] = _nanmean(np.abs(d))
        m["log_ppl_diff_max"] = float(np.nanmax(d)) if (~np.isnan(d)).any() else math.nan
        m["log_ppl_diff_min"] = float(np.nanmin(d)) if (~np.isnan(d)).any() else math.nan
        m["ppl_ratio"] = _nanmean(np.exp(d))
    m["chi2_token"] = _nanmean(np.exp(np.clip(lr, -SAFETY_BOUND, SAFETY_BOUND)) ** 2) - 1.0
    seq_lr = seqs["log_seq_ratio"].to_numpy(dtype=np.float64)
    m["chi2_seq"] = _nanmean(np.exp(2.0 * np.clip(seq_lr, -SAFETY_BOUND, SAFETY_BOUND))) - 1.0
    m["rollout_is_eff_sample_size_token"] = verl_ess(lr, np.ones(len(lr), dtype=np.int64))
    m["rollout_is_eff_sample_size_seq"] = verl_ess(seq_lr, seqs["length"].to_numpy())
    m["ess_token"] = _ess(lr_ok)
    m["ess_seq"] = _ess(seq_lr)
    m["abs_log_ratio_mean"] = float(np.mean(np.abs(lr_ok))) if lr_ok.size else math.nan
    m["abs_log_ratio_max"] = float(np.max(np.abs(lr_ok))) if lr_ok.size else math.nan
    m["abs_rho_m1_mean"] = float(np.mean(np.abs(np.expm1(lr_ok)))) if lr_ok.size else math.nan
    m["tv_mc_mean"] = float(np.mean(mc_tv(lr_ok))) if lr_ok.size else math.nan
    for c in (2.0, 5.0):
        m[f"frac_ratio_outside_{c:g}"] = float(np.mean((rho > c) | (rho < 1.0 / c))) if lr_ok.size else math.nan
    for name, (lo, hi) in CLIP_BANDS.items():  # clipped objectives' ratio bands, left by the mismatch alone
        m[f"{name}_clip_frac"] = float(np.mean((rho < 1.0 - lo) | (rho > 1.0 + hi))) if lr_ok.size else math.nan
        # clip-status flips per sign of the advantage: the two halves of the clip fraction
        m[f"{name}_clip_flip_pos"] = float(np.mean(rho > 1.0 + hi)) if lr_ok.size else math.nan
        m[f"{name}_clip_flip_neg"] = float(np.mean(rho < 1.0 - lo)) if lr_ok.size else math.nan
    lo, hi = NARROW_BAND
    m["frac_ratio_outside_10pct"] = float(np.mean((rho < lo) | (rho > hi))) if lr_ok.size else math.nan
    for col in (*TIERS[fidelity].columns, "abs_log_ratio", "k2", "k3", "tv_bin", "kl_bin", "ent_train"):
        if col == "abs_log_ratio":
            values = np.abs(lr)
        elif col in tokens:
            values = tokens[col].to_numpy(dtype=np.float64)
        else:
            continue
        for stat, v in describe(values, SUMMARY_STATS).items():
            m[f"token_{col}_{stat}"] = v
    t = TIERS[fidelity]
    if t.kl is not None:  # where does the KL sit: on tokens the sampler rarely picks?
        kl = tokens[t.kl].to_numpy(dtype=np.float64)
        low = np.exp(tokens["lp_roll"].to_numpy(dtype=np.float64)) < 0.01
        total = float(np.nansum(kl))
        m["kl_share_low_prob"] = float(np.nansum(kl[low]) / total) if 0 < total < math.inf else math.nan
    if fidelity == "exact" and "prefill_gap" in tokens:
        gap = np.abs(tokens["prefill_gap"].to_numpy(dtype=np.float64))
        m["prefill_gap_abs_mean"] = _nanmean(gap)
        m["prefill_gap_abs_max"] = float(np.nanmax(gap)) if (~np.isnan(gap)).any() else math.nan
    for name in CRITERIA:  # no token at all (a step whose mask is all zero): no criterion was tested, not 100%
        m[f"accept_{name}"] = float(seqs[f"accept_{name}"].mean()) if len(seqs) and lr.size else math.nan
    # DPPO (no rewards here): fraction of tokens whose binary divergence exceeds its threshold
    m["dppo_tv_token_frac"] = float(np.mean(tokens["tv_bin"] > thresholds.dppo_tv)) if lr.size else math.nan
    m["dppo_kl_token_frac"] = float(np.mean(tokens["kl_bin"] > thresholds.dppo_kl)) if lr.size else math.nan
    return m


def bound_inputs(tokens: Any, seqs: Any, fidelity: str, sampler_note: str | None = None) -> BoundInputs:
    """Estimate delta, eps, D_KL^seq, D_TV^seq and Dbar_t from a report (docs/design.md sections 2, 9).

    exact: delta = max kl, eps = max tv (empirical maxima over the sampled positions),
    D_KL^seq = mean_i sum_t kl, Dbar_t = mean_i tv_{i,t} (0 after a response ended).
    topk: the same from the certified upper ends kl_hi / tv_hi (upper-valid).
    sampled: the k2 max stands in for delta ('heuristic') and the k1 sums for D_KL^seq (their mean is an
    unbiased estimate under any truncation, where k3 is low by the trainer's mass outside the kept set; the
    bounds take its upper 95% confidence value, kl_seq_mean keeps the mean); no TV input: binary and
    lower-end values never feed a bound.
    D_TV^seq is always the unbiased Monte-Carlo mean_i max(0, 1 - prod_t rho_t).
    Every input is unknown (None) when a scored token is NaN (nobody could score it), and every
    Monte-Carlo input is labelled an estimate when ``sampler_note`` says the rollouts were drawn from
    another distribution than the view's pi_roll (config.sampler_differs).
    """

    def col(frame, name: str) -> np.ndarray:  # works for DataFrames and dicts of arrays alike
        return np.asarray(frame[name], dtype=np.float64)

    n_seq, n_tok = len(seqs["length"]), len(tokens["log_ratio"])
    inp = BoundInputs(samples={"sequences": n_seq, "tokens": n_tok})
    if n_seq == 0 or n_tok == 0:
        return inp
    t = TIERS[fidelity]
    used = ("log_ratio",) + ((t.kl, t.tv) if t.kl is not None and t.tv is not None else ("k1", "k2"))
    n_nan = int(np.logical_or.reduce([np.isnan(col(tokens, c)) for c in used]).sum())
    if n_nan:  # an unscored token could hide any divergence: no bound holds over it
        why = f"unknown: {n_nan:,} scored token(s) are NaN (non-finite logits on a side)"
        inp.samples["nan_tokens"] = n_nan
        inp.source.update({k: why for k in ("delta", "eps", "kl_seq", "tv_seq", "dbar")})
        return inp
    lengths = np.asarray(seqs["length"])
    inp.seq_T = int(lengths.max())
    # a rollout with no scored token (all masked out, an empty response) samples no trajectory: the Monte-Carlo
    # means run over the others, and the count of those left out is kept
    scored = lengths > 0
    n_seq = int(scored.sum())
    under = f" under another sampler: {sampler_note}" if sampler_note else ""
    if n_seq < len(lengths):
        inp.samples["empty_sequences"] = len(lengths) - n_seq
        under += f"; {len(lengths) - n_seq:,} rollout(s) with no token left out"
    seq_lr = col(seqs, "log_seq_ratio")[scored]
    mc = "estimate" if sampler_note else "measured"  # a Monte-Carlo mean is unbiased only under its sampler
    with np.errstate(over="ignore"):
        terms = np.maximum(0.0, 1.0 - np.exp(seq_lr))  # NaN where a sequence's log ratio is inf - inf
    inp.tv_seq = None if np.isnan(terms).any() else float(np.mean(terms))
    inp.source["tv_seq"] = (
        f"{mc} (Monte-Carlo over {n_seq:,} rollouts{under})"
        if inp.tv_seq is not None
        else ("unknown: a rollout's log ratio is undefined (probability 0 on both sides of a ratio)")
    )
    if t.kl is not None and t.tv is not None:  # columns that bound the divergences from above
        how = t.bound_how
        kl, tv = col(tokens, t.kl), col(tokens, t.tv)
        inp.delta = float(np.max(kl))
        inp.eps = float(np.max(tv))
        inp.kl_seq = float(np.sum(kl) / n_seq)
        inp.kl_rate = float(np.mean(kl))
        inp.tv_rate = float(np.mean(tv))
        pos = np.asarray(tokens["pos"], dtype=np.int64)
        inp.dbar = np.bincount(pos, weights=tv, minlength=inp.seq_T) / n_seq
        inp.source.update(
            delta=f"measured (empirical max over {n_tok:,} tokens{how})",
            eps=f"measured (empirical max over {n_tok:,} tokens{how})",
            kl_seq=f"{mc} (mean over {n_seq:,} rollouts{how}{under})",
            dbar=f"{mc} (mean over {n_seq:,} rollouts{how}{under})",
        )
    else:
        k1, k2 = col(tokens, "k1"), col(tokens, "k2")
        inp.delta = float(np.max(k2))
        if np.isneginf(k1).any():  # a sampled token the rollout gave probability 0: k1 = -inf, no KL estimate
            inp.source.update(
                delta="heuristic (k2 max; exact KL needs full logits)",
                kl_seq="unknown: a sampled token has probability 0 under the rollout's log-probs (k1 = -inf)",
            )
            return inp
        # D_KL^seq: the rollouts' k1 sums (= -log prod rho) have the unbiased mean; a bound takes only upper-valid
        # inputs, so it gets that mean's upper 95% confidence value (a small mismatch's noisy mean dips below 0,
        # where the true value cannot go, and B* would drop to 0 with it)
        sums = -seq_lr  # +inf where the trainer gives a sampled token probability 0: KL is infinite
        total = float(np.sum(sums))
        with np.errstate(over="ignore", invalid="ignore"):
            upper = upper_mean(n_seq, total, float(np.sum(sums * sums)))
        inp.kl_seq_mean = total / n_seq
        why = f"under another sampler: {sampler_note}" if sampler_note else "unbiased under any truncation"
        inp.source["delta"] = "heuristic (k2 max; exact KL needs full logits)"
        if math.isnan(upper):  # one rollout: no spread to bound its sum by
            inp.source["kl_seq"] = f"unknown: one rollout's k1 sum {total:.4g} has no spread to bound the mean by"
            return inp
        inp.kl_seq = max(0.0, upper)
        inp.kl_rate = inp.kl_seq * n_seq / n_tok
        inp.source["kl_seq"] = (
            f"estimate (upper one-sided 95% Student-t value of the k1 mean {inp.kl_seq_mean:.4g} over {n_seq:,} "
            f"rollouts; the mean is {why}{under}"
            + ("; clamped at 0: the value was negative, below the estimate's noise)" if upper < 0 else ")")
        )
    return inp
