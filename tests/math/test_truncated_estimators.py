"""The sampled and top-K tiers' criteria and bound inputs under truncated sampling, against a float64
Monte-Carlo reference (docs/design.md section 9).

A small autoregressive pair with fixed contexts (position t's distributions do not depend on earlier
tokens, so every expectation is exact to compute): the rollout samples from p~ = softmax(z / tau)
truncated by top-p and renormalised, the trainer scores with its full tempered softmax q. Rollouts are
drawn with numpy; the exact values (KL(p~||q), TV, the trajectory TV by enumeration) are computed here
from the definitions, independently of trm_diag's code. Each stand-in's mean must fall within four
standard errors of the exact value; k3 and |rho - 1|, which miss the trainer's mass outside the kept
set, must not (so the test can tell an unbiased estimator from a biased one).
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch

from tests.helpers import t95_reference
from trm_diag.config import Thresholds
from trm_diag.criteria import CRITERIA, SCORED
from trm_diag.math.divergence import sampled_token_metrics, topk_intervals
from trm_diag.math.metrics import bound_inputs
from trm_diag.math.sequences import sequence_stats
from trm_diag.tiers import TIERS

V, T, N = 6, 3, 40_000
TAU, TOP_P = 0.8, 0.9
LN_DELTA = 0.05


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _top_p_keep(p: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus in float64, written from its definition: walk tokens from most to least likely and keep
    each one while the mass strictly before it is below top_p (so at least one token stays)."""
    keep = np.zeros(len(p), dtype=bool)
    before = 0.0
    for v in sorted(range(len(p)), key=lambda i: -p[i]):
        if before >= top_p:
            break
        keep[v] = True
        before += p[v]
    return keep


@pytest.fixture(scope="module")
def pair():
    """Per position: truncated rollout distribution p~, trainer's q, kept set, and the exact divergences."""
    rng = np.random.default_rng(20261206)
    out = []
    for _ in range(T):
        z_roll = rng.normal(0.0, 2.0, V)
        z_train = z_roll + rng.normal(0.0, 0.3, V)
        p, q = _softmax(z_roll / TAU), _softmax(z_train / TAU)
        keep = _top_p_keep(p, TOP_P)
        assert not keep.all()  # the test is about truncation: some of q's mass lies outside the kept set
        pt = np.where(keep, p, 0.0) / p[keep].sum()
        kl = sum(pt[v] * math.log(pt[v] / q[v]) for v in range(V) if pt[v] > 0)
        tv = 0.5 * sum(abs(pt[v] - q[v]) for v in range(V))
        out.append({"pt": pt, "q": q, "keep": keep, "kl": kl, "tv": tv, "Q": q[keep].sum()})
    return out


@pytest.fixture(scope="module")
def rollouts(pair):
    """N rollouts of length T drawn from p~ (numpy, seeded), as the flat token columns of the sampled tier."""
    rng = np.random.default_rng(7)
    y = np.stack([rng.choice(V, size=N, p=pos["pt"]) for pos in pair], axis=1)  # (N, T)
    lp_roll = np.stack([np.log(pair[t]["pt"][y[:, t]]) for t in range(T)], axis=1).reshape(-1)
    lp_train = np.stack([np.log(pair[t]["q"][y[:, t]]) for t in range(T)], axis=1).reshape(-1)
    tok = {k: v.numpy() for k, v in sampled_token_metrics(torch.tensor(lp_roll), torch.tensor(lp_train)).items()}
    tok.update(lp_roll=lp_roll, lp_train=lp_train, pos=np.tile(np.arange(T), N))
    return y, tok


def _within(samples: np.ndarray, exact: float, k: float = 4.0) -> tuple[bool, float, float]:
    mean, se = float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
    return abs(mean - exact) <= k * se, mean, se


def test_sampled_tier_criteria_are_unbiased_under_top_p(pair, rollouts):
    _, tok = rollouts
    lengths = np.full(N, T)
    th = Thresholds(ln_trm=LN_DELTA)
    seqs = sequence_stats(tok, lengths, th, basis="sampled")
    kl_mean = sum(p["kl"] for p in pair) / T
    two_tv_mean = sum(2 * p["tv"] for p in pair) / T
    w = [min(1.0, math.sqrt((T - t) * LN_DELTA / 2)) for t in range(1, T + 1)]
    ln_exact = sum(wi * 2 * p["tv"] for wi, p in zip(w, pair)) / sum(w)
    # every criterion's score in the sampled tier, as the masks read it (criteria.py x tiers.py): TRM-Avg's
    # mean KL, SER's and LN-TRM's 2 TV are each unbiased; TRM-Max's k2 max is labelled a heuristic instead
    exact = {"trm_avg": kl_mean, "ser": two_tv_mean, "ln_trm": ln_exact}
    for name in SCORED:
        column = CRITERIA[name].score(TIERS["sampled"])
        if name == "trm_max":
            assert TIERS["sampled"].estimators[name].startswith("heuristic")
            continue
        ok, mean, se = _within(seqs[column], exact[name])
        assert ok, (name, column, mean, exact[name], se)
        assert TIERS["sampled"].estimators[name].startswith("unbiased")
    # what they replace: k3 and |rho - 1| are low by the trainer's mass outside the kept set
    ok, mean, se = _within(seqs["k3_mean"], kl_mean)
    assert not ok and mean < kl_mean
    assert math.isclose(mean, kl_mean - sum(1 - p["Q"] for p in pair) / T, abs_tol=4 * se)
    ok, mean, _ = _within(seqs["abs_rho_m1_mean"], two_tv_mean)
    assert not ok and mean < two_tv_mean


def test_sampled_tier_bound_inputs_are_unbiased_under_top_p(pair, rollouts):
    y, tok = rollouts
    lengths = np.full(N, T)
    seqs = sequence_stats(tok, lengths, Thresholds(), basis="sampled")
    inp = bound_inputs(tok, seqs, "sampled")
    # D_KL^seq = E sum_t KL_t; its per-rollout terms are the k1 sums
    k1_sums = tok["k1"].reshape(N, T).sum(1)
    true_kl_seq = sum(p["kl"] for p in pair)
    ok, _, se = _within(k1_sums, true_kl_seq)
    assert ok and math.isclose(inp.kl_seq_mean, float(k1_sums.mean()), rel_tol=1e-12)
    # the bounds take the mean's upper one-sided 95% value: mean + t_{N-1} s / sqrt(N), s the sample deviation
    # (statistics computes it in exact fractions, unlike the code's sums of squares; t by root-finding)
    values = [float(v) for v in k1_sums]
    se = statistics.stdev(values) / math.sqrt(len(values))
    upper = statistics.fmean(values) + t95_reference(len(values) - 1) * se
    assert abs(inp.kl_seq - upper) <= 5e-5 * se and inp.kl_seq > inp.kl_seq_mean  # t95's 4 decimals
    assert inp.kl_seq >= true_kl_seq  # an upper value, as a bound's input must be (this seed: it covers)
    assert math.isclose(inp.kl_rate, upper / T, rel_tol=1e-9)
    assert "estimate (upper" in inp.source["kl_seq"] and "heuristic" in inp.source["delta"]
    # D_TV^seq: the trajectory TV by enumeration of all V^T responses, against mean_i (1 - prod_t rho_t)^+
    tv_seq = 0.5 * sum(
        abs(
            math.prod(pair[t]["pt"][v] for t, v in enumerate(ys)) - math.prod(pair[t]["q"][v] for t, v in enumerate(ys))
        )
        for ys in itertools.product(range(V), repeat=T)
    )
    terms = np.maximum(0.0, 1.0 - np.exp(tok["log_ratio"].reshape(N, T).sum(1)))
    ok, mean, se = _within(terms, tv_seq)
    assert ok, (mean, tv_seq, se)
    assert math.isclose(inp.tv_seq, mean, rel_tol=1e-12)
    assert inp.eps is None and inp.dbar is None  # no upper-valid TV in the sampled tier


def test_top_k_tier_upper_ends_hold_for_the_truncated_sampler(pair):
    # the top-K tier reads the engine's processed top-K (-inf outside the kept set): its upper ends bound
    # KL(p~||q) and TV(p~, q) at every position, so masks and bound inputs built on them stay upper-valid
    for k in (1, 2, 3):
        for pos in pair:
            order = np.argsort(-pos["pt"], kind="stable")[:k]
            lp_top = torch.tensor(np.log(pos["pt"][order]))[None]  # (1, k); p~ = 0 gives -inf
            iv = topk_intervals(
                lp_top,
                torch.tensor(order)[None],
                torch.ones(1, k, dtype=torch.bool),
                torch.tensor(np.log(pos["q"]))[None],
            )
            kl_tol, tv_tol = 1e-12 * pos["kl"] + 1e-15, 1e-12 * pos["tv"] + 1e-15  # float64 rounding of sums of V terms
            assert float(iv["kl_lo"][0]) <= pos["kl"] + kl_tol and pos["kl"] <= float(iv["kl_hi"][0]) + kl_tol
            assert float(iv["tv_lo"][0]) <= pos["tv"] + tv_tol and pos["tv"] <= float(iv["tv_hi"][0]) + tv_tol


def test_sequences_with_a_nan_token_make_every_bound_input_unknown(rollouts):
    _, tok = rollouts
    tok = {k: v[: 4 * T].copy() for k, v in tok.items()}
    for key in ("log_ratio", "k1", "k2", "k3"):
        tok[key][1] = np.nan
    lengths = np.full(4, T)
    seqs = sequence_stats(tok, lengths, Thresholds(), basis="sampled")
    inp = bound_inputs(tok, seqs, "sampled")
    assert inp.delta is None and inp.kl_seq is None and inp.tv_seq is None
    assert inp.samples["nan_tokens"] == 1 and inp.source["delta"].startswith("unknown: 1 scored token")
    assert not any(seqs[f"accept_{c}"][0] for c in ("trm_max", "trm_avg", "ser", "ln_trm"))


def test_a_token_the_rollout_gave_probability_zero_leaves_no_kl_estimate(rollouts):
    # k1 = -inf (lp_roll = -inf: a broken export): max(0, -inf) gave a silent 0 before
    _, tok = rollouts
    tok = {k: v[: 4 * T].copy() for k, v in tok.items()}
    tok["lp_roll"][2] = -np.inf
    fixed = sampled_token_metrics(torch.tensor(tok["lp_roll"]), torch.tensor(tok["lp_train"]))
    tok.update({k: v.numpy() for k, v in fixed.items()})
    seqs = sequence_stats(tok, np.full(4, T), Thresholds(trm_avg=1.0), basis="sampled")
    inp = bound_inputs(tok, seqs, "sampled")
    assert inp.kl_seq is None and inp.source["kl_seq"].startswith("unknown: a sampled token has probability 0")
    assert np.isnan(seqs["k1_mean"][0]) and not seqs["accept_trm_avg"][0] and seqs["accept_trm_avg"][1]


def test_rollouts_with_no_token_are_left_out_and_one_rollout_has_no_upper_value():
    """Sampled tier, lengths 3, 0, 5, 2 (an all-masked row second): D_KL^seq's mean and upper value over the
    three rollouts with tokens, the rate per token, D_TV^seq known; a single rollout leaves D_KL^seq unknown."""
    rng = np.random.default_rng(7)
    lengths = np.array([3, 0, 5, 2])
    lp_roll = -rng.uniform(0.05, 3.0, lengths.sum())
    lp_train = lp_roll + rng.normal(0.0, 0.2, lengths.sum())
    tok = {k: v.numpy() for k, v in sampled_token_metrics(torch.tensor(lp_roll), torch.tensor(lp_train)).items()}
    tok.update(lp_roll=lp_roll, lp_train=lp_train)
    inp = bound_inputs(tok, sequence_stats(tok, lengths, Thresholds(), basis="sampled"), "sampled")
    k1 = lp_roll - lp_train
    sums = [math.fsum(k1[0:3]), math.fsum(k1[3:8]), math.fsum(k1[8:10])]  # the three rollouts with tokens
    se = statistics.stdev(sums) / math.sqrt(3)
    assert math.isclose(inp.kl_seq_mean, statistics.fmean(sums), rel_tol=1e-12)
    assert abs(inp.kl_seq - max(0.0, statistics.fmean(sums) + t95_reference(2) * se)) <= 5e-5 * se
    assert math.isclose(inp.kl_rate, inp.kl_seq * 3 / 10, rel_tol=1e-12)  # per token: 10 tokens in 3 rollouts
    tv = statistics.fmean([max(0.0, 1 - math.exp(-s)) for s in sums])
    assert math.isclose(inp.tv_seq, tv, rel_tol=1e-12) and inp.samples["empty_sequences"] == 1
    assert "1 rollout(s) with no token left out" in inp.source["kl_seq"]
    one = {k: v[:3] for k, v in tok.items()}
    inp1 = bound_inputs(one, sequence_stats(one, lengths[:1], Thresholds(), basis="sampled"), "sampled")
    assert inp1.kl_seq is None and inp1.kl_rate is None and inp1.source["kl_seq"].startswith("unknown: one rollout")


def test_a_negative_k1_mean_is_clamped_and_says_it_is_below_noise(rollouts):
    """The true D_KL^seq is >= 0; a negative k1 mean is noise: 0, and the source says so (B* is then small)."""
    _, tok = rollouts
    tok = {k: v[: 4 * T].copy() for k, v in tok.items()}
    lp_train = tok["lp_roll"] + 1e-3  # the trainer a hair above the engine everywhere: every k1 = -1e-3
    fixed = sampled_token_metrics(torch.tensor(tok["lp_roll"]), torch.tensor(lp_train))
    tok.update({k: v.numpy() for k, v in fixed.items()}, lp_train=lp_train)
    seqs = sequence_stats(tok, np.full(4, T), Thresholds(), basis="sampled")
    inp = bound_inputs(tok, seqs, "sampled")
    assert inp.kl_seq == 0.0 and "below the estimate's noise" in inp.source["kl_seq"]
    tok2 = {k: v.copy() for k, v in tok.items()}
    fixed = sampled_token_metrics(torch.tensor(tok2["lp_roll"]), torch.tensor(tok2["lp_roll"] - 1e-3))
    tok2.update({k: v.numpy() for k, v in fixed.items()})
    inp2 = bound_inputs(tok2, sequence_stats(tok2, np.full(4, T), Thresholds(), basis="sampled"), "sampled")
    assert inp2.kl_seq > 0 and "below" not in inp2.source["kl_seq"]
