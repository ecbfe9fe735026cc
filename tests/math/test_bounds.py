"""bounds.py: the paper's table (T = 4096), brute-force sums, and the paper's stated identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trm_diag.math import bounds as B

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


def brute_unified_for_threshold(T, delta, rate):
    """B*(T) when TRM-Max masks at delta, straight from docs/design.md section 3 with Python loops:
    eps = min(1, sqrt(delta/2)), D_KL^seq = T min(rate, delta) (T delta without a rate), Pinsker D_TV^seq,
    Dbar_t = min(1, eps, sqrt(delta/2))."""
    e = min(1.0, math.sqrt(delta / 2))
    kl_seq = T * (delta if rate is None else min(rate, delta))
    tv_seq = min(1.0, math.sqrt(kl_seq / 2))
    d = min(1.0, e, math.sqrt(delta / 2))
    ts = range(1, T + 1)
    coupling = 4 * min(1, e) * sum(min(1, (t - 1) * e) for t in ts)
    pm_kl = 4 * min(1, math.sqrt(delta / 2)) * sum(min(1, math.sqrt((t - 1) * delta / 2)) for t in ts)
    pm_tv = 4 * min(1, e) * sum(min(1, math.sqrt((t - 1) * delta / 2)) for t in ts)
    mix_kl = 4 * T * min(1, math.sqrt(delta / 2)) * min(1, math.sqrt(kl_seq / 2))
    mix_tv = 4 * T * min(1, e) * min(1, tv_seq)
    hybrid = 4 * sum(d * min(1, (T - t) * e, math.sqrt((T - t) * delta / 2)) for t in ts)
    return min(coupling, pm_kl, pm_tv, mix_kl, mix_tv, hybrid)


def test_vacuous_at_paper_threshold():
    d = 0.05
    b, _ = B.all_bounds(4096, B.BoundInputs(delta=d, eps=math.sqrt(d / 2)))
    assert b["unified"] > 100  # the paper's own threshold is far outside the guarantee at T = 4096


def test_inverse_view_is_the_largest_delta_within_the_budget():
    """delta_for_budget against a loop-by-loop B*: within the budget at its answer, above it 1e-6 further."""
    rng = np.random.default_rng(4)
    for _ in range(60):
        T, budget = int(rng.integers(2, 400)), 10 ** rng.uniform(-2, 1)
        rate = None if rng.random() < 0.3 else 10 ** rng.uniform(-7, 0)
        got = B.delta_for_budget(T, budget, rate)
        if got.delta is None:  # any delta: even a saturated delta keeps B* within the budget
            assert brute_unified_for_threshold(T, 1e6, rate) <= budget * (1 + 1e-12)
            continue
        assert brute_unified_for_threshold(T, got.delta, rate) <= budget * (1 + 1e-12), (T, budget, rate)
        assert brute_unified_for_threshold(T, got.delta * (1 + 1e-6), rate) > budget, (T, budget, rate)
        assert got.eps == pytest.approx(min(1.0, math.sqrt(got.delta / 2)), rel=1e-15)


def test_unified_for_threshold_matches_all_bounds():
    """The inverse view's O(1) B* equals all_bounds on the same inputs (adaptive hybrid summed over arrays)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        T, d = int(rng.integers(1, 3000)), 10 ** rng.uniform(-9, 1.5)
        rate = None if rng.random() < 0.3 else 10 ** rng.uniform(-9, 1)
        inp = B.BoundInputs(delta=d, eps=min(1, math.sqrt(d / 2)), kl_rate=d if rate is None else min(rate, d))
        ref = B.all_bounds(T, inp)[0]["unified"]
        assert B.unified_for_threshold(T, d, rate) == pytest.approx(ref, rel=1e-12, abs=1e-300)


def test_adaptive_hybrid_flat_against_a_loop():
    rng = np.random.default_rng(6)
    cases = [(int(rng.integers(1, 300)), rng.uniform(0, 1), 10 ** rng.uniform(-5, 0.5), 10 ** rng.uniform(-7, 1))
             for _ in range(300)]  # fmt: skip
    cases += [(50, 0.3, 0.1, 0.02), (50, 0.3, 0.1, 0.0), (50, 0.3, 0.0, 0.2), (1, 1, 1, 1), (9, 1, math.inf, 0.5)]
    cases += [(10, 1, 1e-200, 1e-3)]  # eps^2 underflows
    for T, w, e, d in cases:
        ref = 4 * sum(w * min(1, (T - t) * e, math.sqrt((T - t) * d / 2)) for t in range(1, T))  # t = T adds 0
        assert B.adaptive_hybrid_flat(T, w, e, d) == pytest.approx(ref, rel=1e-12, abs=1e-15), (T, w, e, d)


def test_inverse_view_says_any_delta_and_caps_eps():
    """T = 1 has nothing to bound and B* never exceeds 4 (T - 1): any delta (None), never the search's cap;
    eps is at most 1 (a TV)."""
    for T, budget in ((1, 1.0), (64, 1e9), (64, 4 * 63)):
        got = B.delta_for_budget(T, budget)
        assert got.delta is None and got.eps is None, (T, budget)
    got = B.delta_for_budget(64, 4 * 63 * 0.99)  # just below B*'s ceiling, reached at delta = 2 (eps = 1)
    assert 1.9 < got.delta < 2 and 0.98 < got.eps < 1
    assert B.delta_for_budget(2, 1.0, 1e-5).delta is None  # Mixed KL with a tiny rate stays below 1 at T = 2


def test_inverse_view_uses_the_per_token_rate():
    """A measured rate below the answer loosens it (T * rate instead of T * delta); a rate above it or an
    unusable one (NaN, negative) gives the worst case, and the assumption says which."""
    worst = B.delta_for_budget(4096, 1.0)
    assert "worst case" in worst.assumption and worst.kl_rate is None
    low = B.delta_for_budget(40, 1.0, 1e-5)
    assert low.delta > 10 * B.delta_for_budget(40, 1.0).delta and "1e-05" in low.assumption
    assert B.delta_for_budget(4096, 1.0, 1.0).delta == worst.delta  # min(rate, delta) = delta
    for bad in (math.nan, -1.0):
        got = B.delta_for_budget(4096, 1.0, bad)
        assert got.delta == worst.delta and got.kl_rate is None


def test_inverse_view_is_fast_at_the_longest_horizon():
    import time

    t0 = time.perf_counter()
    got = B.delta_for_budget(10_000_000, 1.0, 1e-5)
    assert time.perf_counter() - t0 < 5 and 0 < got.delta < 1e-9  # an array-summed B* took ~50 s here


def test_pinsker_conflicts():
    assert B.pinsker_conflicts(1e-4, 5e-3, 0.01, 0.05) == []  # the paper's table
    assert B.pinsker_conflicts(1e-4, math.sqrt(1e-4 / 2), None, None) == []  # equality is fine
    w = B.pinsker_conflicts(1e-4, 0.0, None, None)
    assert len(w) == 1 and "--eps 0" in w[0]
    w = B.pinsker_conflicts(1e-4, 0.01, 0.01, 0.5)
    assert len(w) == 2 and "--eps 0.01 exceeds" in w[0] and "--tv-seq 0.5 exceeds" in w[1]


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

    from trm_diag.math.bounds import adaptive_hybrid, adaptive_kl

    dbar = np.array([0.1, 0.2, 0.05, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert adaptive_kl(dbar, math.inf) == pytest.approx(4 * dbar[:-1].sum())
        assert adaptive_hybrid(dbar, 0.01, math.inf) == pytest.approx(
            4 * np.sum(dbar[:-1] * np.minimum(1, [0.03, 0.02, 0.01]))
        )
    assert B.sum_min1_sqrt(10, math.inf) == 9 and B.sum_min1_linear(10, math.inf) == 9
    assert B.pm_kl(10, math.inf) == 36 and B.pm_tv(10, 0.5, math.inf) == 18


def test_saved_inputs_out_of_range_count_as_damaged():
    """summary.json's bound_inputs with a negative divergence or an odd seq_T are damaged (None: the caller
    recomputes them from the tables), never a math domain error further on."""
    good = B.BoundInputs(delta=1e-3, eps=0.02, kl_seq=0.05, tv_seq=0.1, kl_rate=1e-4, tv_rate=0.01, seq_T=16,
                         dbar=np.full(16, 0.01)).as_dict()  # fmt: skip
    assert B.BoundInputs.from_dict(good).kl_rate == 1e-4
    assert B.BoundInputs.from_dict({**good, "delta": math.inf}).delta == math.inf  # a zero-probability token
    for key, bad in (("kl_rate", -1.0), ("kl_seq", -0.1), ("delta", math.nan), ("seq_T", 0), ("seq_T", 16.0),
                     ("seq_T", True), ("dbar", [0.1, -0.2])):  # fmt: skip
        assert B.BoundInputs.from_dict({**good, key: bad}) is None, (key, bad)
    assert B.BoundInputs.from_dict({**good, "source": [1, 2]}).source == {}


def test_sources_name_the_value_each_model_filled_in():
    """Beyond the observed positions Dbar_t is the mean token TV when measured, else the worst case: the
    source says which, with the value (it used to say 'mean token TV' for both)."""
    inp = B.BoundInputs(delta=2e-4, eps=0.01, dbar=np.full(10, 0.003), seq_T=10, kl_rate=1e-5)
    x, src = B.inputs_at(100, inp)
    assert (x["dbar"][10:] == 0.01).all() and "worst case" in src["dbar"] and "0.01" in src["dbar"]
    assert "1e-05" in src["kl_seq"] and x["kl_seq"] == pytest.approx(100 * 1e-5, rel=1e-15)
    inp.tv_rate = 0.002
    x, src = B.inputs_at(100, inp)
    assert (x["dbar"][10:] == 0.002).all() and "mean token TV 0.002" in src["dbar"]
