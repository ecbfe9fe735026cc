"""bounds.py: the paper's table (T = 4096), brute-force sums, and the paper's stated identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trm_diag import bounds as B

T = 4096


def rel(a, b):
    return abs(a - b) / abs(b)


def test_paper_table_kl_and_tv_column():
    b, _ = B.all_bounds(T, B.BoundInputs(delta=1e-4, eps=5e-3, kl_seq=0.01, tv_seq=0.05))
    expected = {"classical": 839, "classical_kl": 1677, "coupling": 79.9, "pm_kl": 35.0, "pm_tv": 24.7,
                "mix_kl": 8.2, "mix_tv": 4.1, "unified": 4.1}  # fmt: skip
    for k, v in expected.items():
        assert rel(b[k], v) < 0.005 or abs(b[k] - v) < 0.05, (k, b[k], v)
    assert rel(b["pm_kl"], 34.94) < 5e-4  # the exact sum (closed form 4/3 T^1.5 delta = 34.95)
    assert rel(b["pm_kl"], 4 / 3 * T**1.5 * 1e-4) < 0.005


def test_paper_table_kl_only_column():
    d = 1e-4
    b, _ = B.all_bounds(T, B.BoundInputs(delta=d, eps=math.sqrt(d / 2), kl_seq=0.01, tv_seq=math.sqrt(0.01 / 2)))
    for k, v in {"coupling": 113.8, "pm_tv": 35.0, "mix_tv": 8.2, "pm_kl": 35.0, "mix_kl": 8.2}.items():
        assert rel(b[k], v) < 0.005, (k, b[k], v)


def brute(T, f):
    return sum(f(t) for t in range(1, T + 1))


@pytest.mark.parametrize("T", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("c", [1e-6, 1e-3, 0.01, 0.1, 0.25, 1 / 3, 0.5, 1.0, 3.0])
def test_sums_against_brute_force(T, c):
    assert math.isclose(B.sum_min1_linear(T, c), brute(T, lambda t: min(1, (t - 1) * c)), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(
        B.sum_min1_sqrt(T, c), brute(T, lambda t: min(1, math.sqrt((t - 1) * c))), rel_tol=1e-12, abs_tol=1e-12
    )


def test_euler_maclaurin_tail():
    m = B.EXACT_SUM_LIMIT + 12345
    exact = float(np.sqrt(np.arange(1, m + 1, dtype=np.float64)).sum())
    assert rel(B._sum_sqrt(m), exact) < 1e-12


def test_bounds_against_direct_definitions():
    rng = np.random.default_rng(0)
    for _ in range(30):
        Tn = int(rng.integers(1, 300))
        d, e = 10 ** rng.uniform(-6, 0), 10 ** rng.uniform(-4, 0)
        dbar = rng.uniform(0, e, Tn)
        assert math.isclose(
            B.coupling(Tn, e),
            4 * min(1, e) * brute(Tn, lambda t, e=e: min(1, (t - 1) * e)),
            rel_tol=1e-9,
            abs_tol=1e-12,
        )
        assert math.isclose(
            B.pm_kl(Tn, d),
            4 * min(1, math.sqrt(d / 2)) * brute(Tn, lambda t, d=d: min(1, math.sqrt((t - 1) * d / 2))),
            rel_tol=1e-9,
            abs_tol=1e-12,
        )
        assert math.isclose(
            B.adaptive_hybrid(dbar, e, d),
            4 * sum(dbar[t - 1] * min(1, (Tn - t) * e, math.sqrt((Tn - t) * d / 2)) for t in range(1, Tn + 1)),
            rel_tol=1e-9,
            abs_tol=1e-12,
        )


def random_inputs(rng):
    d = 10 ** rng.uniform(-7, 0.5)
    return B.BoundInputs(
        delta=d, eps=min(1.0, 10 ** rng.uniform(-4, 0)), kl_seq=10 ** rng.uniform(-5, 1), tv_seq=rng.uniform(0, 1)
    )


def test_unified_is_below_each_member():
    rng = np.random.default_rng(1)
    for _ in range(200):
        b, _ = B.all_bounds(int(rng.integers(1, 5000)), random_inputs(rng))
        for k in B.UNIFIED_MEMBERS:
            assert b["unified"] <= b[k]


def test_paper_identities():
    rng = np.random.default_rng(2)
    for _ in range(50):
        Tn, d, e = int(rng.integers(1, 3000)), 10 ** rng.uniform(-7, 0.5), 10 ** rng.uniform(-4, 0)
        dbar_kl = np.full(Tn, min(1.0, math.sqrt(d / 2)))
        assert math.isclose(B.adaptive_kl(dbar_kl, d), B.pm_kl(Tn, d), rel_tol=1e-9, abs_tol=1e-12)
        dbar_tv = np.full(Tn, e)
        assert math.isclose(B.adaptive_tv(dbar_tv, e), B.coupling(Tn, e), rel_tol=1e-9, abs_tol=1e-12)


def test_monotone_in_T_and_divergences():
    rng = np.random.default_rng(3)
    for _ in range(60):
        inp = random_inputs(rng)
        Ts = sorted(set(int(x) for x in rng.integers(1, 20000, 6)))
        prev = None
        for Tn in Ts:
            b, _ = B.all_bounds(Tn, inp)
            if prev:
                for k in B.BOUND_NAMES:
                    assert b[k] >= prev[k] * (1 - 1e-12), (k, Tn)
            prev = b
        base, _ = B.all_bounds(Ts[-1], inp)
        for field in ("delta", "eps", "kl_seq", "tv_seq"):
            bigger = B.BoundInputs(**{**inp.__dict__, field: getattr(inp, field) * 1.5, "source": {}, "samples": {}})
            if field == "tv_seq":
                bigger.tv_seq = min(1.0, bigger.tv_seq)
            up, _ = B.all_bounds(Ts[-1], bigger)
            for k in B.BOUND_NAMES:
                assert up[k] >= base[k] * (1 - 1e-12), (field, k)


def test_vacuous_at_paper_threshold_and_inverse_view():
    d = 0.05
    b, _ = B.all_bounds(4096, B.BoundInputs(delta=d, eps=math.sqrt(d / 2)))
    assert b["unified"] > 100  # the paper's own threshold is far outside the guarantee at T = 4096
    for Tn in (256, 4096):
        dmax = B.max_delta_for_budget(Tn, 1.0)
        at = B.all_bounds(Tn, B.BoundInputs(delta=dmax, eps=math.sqrt(dmax / 2), kl_rate=dmax))[0]["unified"]
        above = B.all_bounds(Tn, B.BoundInputs(delta=dmax * 1.01, eps=math.sqrt(dmax * 1.01 / 2), kl_rate=dmax * 1.01))[
            0
        ]["unified"]
        assert at <= 1.0 < above


def test_horizon_model_marks_inputs():
    inp = B.BoundInputs(
        delta=1e-3, eps=0.02, kl_seq=0.05, tv_seq=0.1, kl_rate=1e-4, seq_T=100, dbar=np.full(100, 0.01), tv_rate=0.01
    )
    x, src = B.inputs_at(100, inp)
    assert x["kl_seq"] == 0.05 and src["tv_seq"] == "given"
    x, src = B.inputs_at(1000, inp)
    assert math.isclose(x["kl_seq"], 0.1) and "modelled" in src["kl_seq"] and "Pinsker" in src["tv_seq"]
    assert len(x["dbar"]) == 1000 and "beyond" in src["dbar"]


def test_adaptive_bounds_with_infinite_delta_stay_finite():
    """A zero-probability token makes delta infinite: min(1, sqrt((T-t) delta/2)) is then 1 for t < T and 0
    at t = T (nothing follows the last token), never NaN."""
    import warnings

    from trm_diag.bounds import adaptive_hybrid, adaptive_kl

    dbar = np.array([0.1, 0.2, 0.05, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert adaptive_kl(dbar, math.inf) == pytest.approx(4 * dbar[:-1].sum())
        assert adaptive_hybrid(dbar, 0.01, math.inf) == pytest.approx(
            4 * np.sum(dbar[:-1] * np.minimum(1, [0.03, 0.02, 0.01]))
        )
    assert B.sum_min1_sqrt(10, math.inf) == 9 and B.sum_min1_linear(10, math.inf) == 9
    assert B.pm_kl(10, math.inf) == 36 and B.pm_tv(10, 0.5, math.inf) == 18
