"""Per-sequence statistics and masks against naive per-sequence loops (docs/design.md s.2 and s.4)."""

from __future__ import annotations

import math

import numpy as np

from trm_diag.config import Thresholds
from trm_diag.math.sequences import sequence_stats


def make_tokens(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    lr = rng.normal(0, 0.05, n)
    lp_roll = -rng.exponential(1.0, n)
    lp_train = lp_roll + lr
    kl = rng.exponential(1e-3, n)
    tv = np.sqrt(kl / 2) * rng.uniform(0.2, 1.0, n)
    return {
        "log_ratio": lr, "k1": -lr, "k2": lr**2 / 2, "k3": np.expm1(lr) - lr, "abs_rho_m1": np.abs(np.expm1(lr)),
        "lp_roll": lp_roll, "lp_train": lp_train, "kl": kl, "tv": tv, "kl_rev": kl * 1.1,
        "tv_bin": rng.uniform(0, 0.3, n), "kl_bin": rng.uniform(0, 0.1, n),
    }  # fmt: skip


def naive(tok, lengths, th: Thresholds):
    rows, s = [], 0
    for T in lengths:
        sl = slice(s, s + T)
        s += T
        if T == 0:
            rows.append(None)
            continue
        kl, lr = tok["kl"][sl], tok["log_ratio"][sl]
        a = [2.0 * v for v in tok["tv"][sl]]  # exact tier: SER and LN-TRM average 2 tv, what |rho - 1| estimates
        w = [min(1.0, math.sqrt((T - t) * th.ln_delta / 2)) for t in range(1, T + 1)]
        W = sum(ai * wi for ai, wi in zip(a, w))
        Z = sum(w)
        rows.append(
            {
                "kl_max": max(kl), "kl_mean": sum(kl) / T, "kl_sum": sum(kl), "worst_pos": int(np.argmax(kl)),
                "k2_max": max(tok["k2"][sl]), "k3_mean": sum(tok["k3"][sl]) / T, "log_seq_ratio": sum(lr),
                "geo_mean_ratio": math.exp(sum(lr) / T), "ppl_gap": abs(sum(lr) / T), "ser": sum(a) / T,
                "abs_rho_m1_mean": sum(abs(math.exp(v) - 1.0) for v in lr) / T, "k1_mean": -sum(lr) / T,
                "ln_trm": W / Z if Z > 0 else 0.0,
                "accept_trm_max": max(kl) <= th.trm_max, "accept_trm_avg": sum(kl) / T <= th.trm_avg,
                "accept_ser": sum(a) / T <= th.ser,
            }
        )  # fmt: skip
    return rows


def test_sequence_stats_match_naive_loops():
    lengths = np.array([5, 1, 0, 17, 3, 40])
    th = Thresholds(trm_max=0.004, trm_avg=0.001, ln_trm=0.03, ser=0.04)
    tok = make_tokens(lengths)
    got = sequence_stats(tok, lengths, th)
    for i, ref in enumerate(naive(tok, lengths, th)):
        if ref is None:
            assert got["length"][i] == 0 and math.isnan(got["kl_max"][i])
            assert got["accept_trm_max"][i] and got["accept_combined"][i]
            continue
        for k, v in ref.items():
            if isinstance(v, bool):
                assert bool(got[k][i]) == v, (i, k)
            else:
                assert math.isclose(got[k][i], v, rel_tol=1e-9, abs_tol=1e-12), (i, k, got[k][i], v)
        assert got["accept_combined"][i] == (ref["accept_trm_max"] and ref["accept_trm_avg"])


def test_sampled_tier_masks_use_k2_max_k1_mean_and_the_unbiased_tv_term():
    lengths = np.array([4, 6])
    tok = make_tokens(lengths, seed=3)
    for k in ("kl", "tv", "kl_rev"):
        del tok[k]
    th = Thresholds(trm_max=1e-3, trm_avg=5e-3, ser=0.072)  # between k1 and k3, 2 (1 - rho)^+ and |rho - 1|
    got = sequence_stats(tok, lengths, th)
    lr = tok["log_ratio"]
    ser = [
        sum(2.0 * max(0.0, 1.0 - math.exp(v)) for v in lr[:4]) / 4,
        sum(2.0 * max(0.0, 1.0 - math.exp(v)) for v in lr[4:]) / 6,
    ]
    for i in range(2):
        assert math.isclose(got["ser"][i], ser[i], rel_tol=1e-12)
        assert math.isclose(got["k1_mean"][i], -lr[sum(lengths[:i]) : sum(lengths[: i + 1])].mean(), rel_tol=1e-12)
    assert list(got["accept_trm_max"]) == [got["k2_max"][i] <= 1e-3 for i in range(2)]
    assert list(got["accept_trm_avg"]) == [False, True]  # k3 means (3.5e-3) would accept both
    assert list(got["accept_ser"]) == [False, True] == [ser[i] <= 0.072 for i in range(2)]  # |rho - 1|: both


def test_a_nan_token_fails_every_mask_of_its_sequence():
    # [NaN, 1e-4]: skipping the NaN gave kl_max = 1e-4 and accepted a sequence nobody could fully score
    lengths = np.array([2, 2])
    tok = make_tokens(lengths, seed=5)
    tok["kl"] = np.array([np.nan, 1e-4, 1e-5, 1e-4])
    tok["tv"] = np.array([np.nan, 1e-3, 1e-3, 1e-3])
    got = sequence_stats(tok, lengths, Thresholds(trm_max=0.05, trm_avg=0.01, ln_trm=1.0, ser=1.0))
    assert math.isnan(got["kl_max"][0]) and math.isnan(got["kl_mean"][0]) and math.isnan(got["ser"][0])
    for name in ("trm_max", "trm_avg", "combined", "ln_trm", "ser"):
        assert not got[f"accept_{name}"][0], name
        assert got[f"accept_{name}"][1], name
    assert got["worst_pos"][0] == 0  # the unscored token is the sequence's worst


def test_trm_max_rejects_long_sequences_more():
    # i.i.d. spikes with rate p per token: acceptance of TRM-Max is about (1 - p)^T
    rng = np.random.default_rng(0)
    p, T, n = 0.01, 100, 4000
    lengths = np.full(n, T)
    tok = make_tokens(lengths, seed=1)
    tok["kl"] = np.where(rng.random(n * T) < p, 1.0, 0.0)
    got = sequence_stats(tok, lengths, Thresholds(trm_max=0.5))
    assert abs(got["accept_trm_max"].mean() - (1 - p) ** T) < 0.03
