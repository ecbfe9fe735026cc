"""Own errors against a reference and their decomposition, against independent float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import torch

from trm_diag.math.attribution import decompose, error_stats, reference_errors, rms


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_reference_errors_match_a_float64_reference_on_random_rows():
    rng = np.random.default_rng(0)
    n, v = 17, 3001
    ref = rng.normal(0, 3, (n, v))  # float64 logits of the reference
    for scale in (1e-1, 1e-4, 1e-7):  # large, small and fp32-sized perturbations
        x = (ref + rng.normal(0, scale, (n, v)) + rng.normal(0, 5, (n, 1))).astype(np.float32)  # any row offset
        y = rng.integers(0, v, n)
        kl, err = reference_errors(torch.from_numpy(ref), torch.from_numpy(x), torch.from_numpy(y))
        lr, lx = _log_softmax(ref), _log_softmax(x.astype(np.float64))
        want_kl = (np.exp(lr) * (lr - lx)).sum(-1)
        want_err = lx[np.arange(n), y] - lr[np.arange(n), y]
        np.testing.assert_allclose(err, want_err, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(kl, want_kl, rtol=1e-6, atol=1e-15)
        assert (kl >= 0).all()


def test_identical_sides_have_zero_error_and_tiny_kl_is_not_lost():
    rng = np.random.default_rng(1)
    ref = torch.from_numpy(rng.normal(0, 2, (5, 500)))
    kl, err = reference_errors(ref, ref.clone(), torch.zeros(5, dtype=torch.long))
    assert (kl == 0).all() and (err == 0).all()
    # a relative perturbation of 1e-8: KL ~ 1e-17, still resolved (the terms are all >= 0)
    eps = torch.from_numpy(rng.normal(0, 1e-8, (5, 500)))
    kl, _ = reference_errors(ref, ref + eps, torch.zeros(5, dtype=torch.long))
    lr = torch.log_softmax(ref, -1)
    lx = torch.log_softmax(ref + eps, -1)
    d = (lr - lx).numpy()
    p = lr.exp().numpy()
    want = (p * d**2 / 2).sum(-1) - (p * d).sum(-1) ** 2 / 2  # second-order KL: variance of d under p, halved
    np.testing.assert_allclose(kl, want, rtol=1e-3)
    assert (kl > 0).all()


def test_decompose_against_direct_formulas():
    rng = np.random.default_rng(2)
    e_roll, e_arm = rng.normal(0, 0.03, 20000), rng.normal(0, 0.01, 20000)
    d = decompose(e_roll, e_arm)
    assert math.isclose(d["gap_lp_rms"], float(np.sqrt(np.mean((e_arm - e_roll) ** 2))), rel_tol=1e-12)
    indep = math.sqrt(np.mean(e_roll**2) + np.mean(e_arm**2))
    assert math.isclose(d["indep_lp_rms"], indep, rel_tol=1e-12)
    assert math.isclose(d["gap_share_roll"], np.mean(e_roll**2) / indep**2, rel_tol=1e-12)
    assert abs(d["err_corr"]) < 0.03  # independent errors
    assert abs(d["gap_lp_rms"] / d["indep_lp_rms"] - 1) < 0.02
    shared = decompose(e_roll, 2 * e_roll)  # one cause: the gap is the difference, not the sum of powers
    assert math.isclose(shared["err_corr"], 1.0, rel_tol=1e-12)
    assert math.isclose(shared["gap_lp_rms"], rms(e_roll), rel_tol=1e-12)
    assert math.isnan(decompose(np.zeros(3), np.zeros(3))["err_corr"])


def test_error_stats_ignore_nonfinite_and_read_quantiles():
    kl = np.array([0.0, 1e-6, 2e-6, np.nan, 4e-6])
    s = error_stats(kl, np.array([0.1, -0.1, 0.1, -0.1, np.inf]))
    assert math.isclose(s["ref_kl_mean"], 7e-6 / 4)
    assert math.isclose(s["ref_kl_p99"], float(np.quantile(kl[np.isfinite(kl)], 0.99)))
    assert math.isclose(s["ref_lp_err_rms"], 0.1)
