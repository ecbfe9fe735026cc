"""Breakdowns, position profile and histogram against an independent float64 reference (plain loops)."""

from __future__ import annotations

import math

import numpy as np

from trm_diag.math.breakdowns import AXIS, RATIO_BAND, breakdown, histogram, position_profile


def _reference(values, edges, transform, kl, lr):
    v = [math.exp(x) if transform == "exp" else x for x in values]
    rows = []
    total = sum(k for k in kl if not math.isnan(k))
    n_all = sum(1 for x in v if not math.isnan(x))
    for b in range(len(edges)):
        lo, hi = edges[b], edges[b + 1] if b + 1 < len(edges) else math.inf
        idx = [i for i, x in enumerate(v) if lo <= x < hi]
        if not idx:
            continue
        ks = sorted(kl[i] for i in idx if not math.isnan(kl[i]))
        pos = 0.99 * (len(ks) - 1)
        p99 = ks[int(pos)] + (ks[min(int(pos) + 1, len(ks) - 1)] - ks[int(pos)]) * (pos - int(pos))
        ratios = [math.exp(lr[i]) for i in idx]
        rows.append({
            "n": len(idx), "token_share": len(idx) / n_all, "kl_mean": sum(ks) / len(ks), "kl_p99": p99,
            "kl_share": sum(ks) / total, "abs_log_ratio_mean": sum(abs(lr[i]) for i in idx) / len(idx),
            "outside_band": sum(1 for r in ratios if r < RATIO_BAND[0] or r > RATIO_BAND[1]) / len(idx),
        })  # fmt: skip
    return rows


def test_breakdowns_match_a_float64_reference():
    rng = np.random.default_rng(0)
    n = 3000
    lp = np.log(rng.uniform(1e-4, 1.0, n))
    ent = 10 ** rng.uniform(-4, 1, n)
    pos = rng.integers(0, 400, n).astype(np.float64)
    kl = rng.exponential(1e-3, n) * (1 + 20 * (np.exp(lp) < 0.01))
    kl[::97] = np.nan  # a non-finite row: skipped in KL statistics, still counted as a token
    lr = rng.normal(0, 0.15, n)
    for axis, values in (("prob", lp), ("entropy", ent), ("position", pos)):
        a = AXIS[axis]
        got = breakdown(values, a, kl, lr)
        want = _reference(values.tolist(), a.edges, a.transform, kl.tolist(), lr.tolist())
        assert len(got) == len(want) > 2
        for g, w in zip(got, want):
            for k, v in w.items():
                assert math.isclose(g[k], v, rel_tol=1e-9, abs_tol=1e-15), (axis, g["bucket"], k, g[k], v)
    assert sum(r["kl_share"] for r in breakdown(lp, AXIS["prob"], kl, lr)) == pytest_approx(1.0)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-12)


def _reference_bins(top: int, max_bins: int) -> list[tuple[int, int]]:
    """Equal-width bins over positions 0..top-1: the narrowest integer width giving at most max_bins bins,
    found by trying widths 1, 2, ... (the last bin ends at top - 1)."""
    width = 1
    while len(range(0, top, width)) > max_bins:
        width += 1
    return [(lo, min(lo + width, top) - 1) for lo in range(0, top, width)]


def test_position_profile_and_histogram_match_loops():
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 130, 2000)
    assert pos.max() == 129 and len(set(pos.tolist())) == 130  # every position occurs: no empty bin
    x = rng.exponential(1.0, 2000)
    prof = position_profile(pos, {"x": x}, max_bins=10)
    # 130 positions in at most 10 bins: width 13, ten bins 0-12, 13-25, ..., 117-129
    assert list(zip(prof["pos_lo"], prof["pos_hi"])) == [(13 * i, 13 * i + 12) for i in range(10)]
    for lo, hi, n, mean in zip(prof["pos_lo"], prof["pos_hi"], prof["n"], prof["x_mean"]):
        sel = [v for p, v in zip(pos, x) if lo <= p <= hi]
        assert n == len(sel) and math.isclose(mean, sum(sel) / len(sel), rel_tol=1e-12)
    assert sum(prof["n"]) == 2000
    for top, max_bins in ((101, 48), (48, 48), (49, 48), (5, 48), (1000, 7), (1, 3)):
        every = np.arange(top)  # each position once: every bin is present
        got = position_profile(every, {"x": np.ones(top)}, max_bins=max_bins)
        want = _reference_bins(top, max_bins)
        assert list(zip(got["pos_lo"], got["pos_hi"])) == want, (top, max_bins)
        assert got["n"] == [hi - lo + 1 for lo, hi in want] and len(want) <= max_bins
    lr = np.concatenate([rng.normal(0.01, 0.05, 5000), [np.inf, np.nan, 40.0]])
    h = histogram(lr, bins=20)
    assert h["nonfinite"] == 2 and h["above"] == 1 and sum(h["counts"]) + h["below"] + h["above"] == 5001
    e = h["edges"]
    assert math.isclose(e[0], -e[-1]) and len(e) == 21
    inner = [v for v in lr[np.isfinite(lr)] if e[0] <= v <= e[-1]]
    for b in range(20):  # half-open bins, the last one closed
        want = sum(1 for v in inner if e[b] <= v < e[b + 1] or (b == 19 and v == e[-1]))
        assert h["counts"][b] == want, b
