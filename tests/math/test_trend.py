"""The trend rules (math/trend.py) and a step's length buckets (math/step_metrics.py) against float64
references written with plain Python loops; seeded inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trm_diag.config import Thresholds
from trm_diag.math.step_metrics import LENGTH_EDGES, step_metrics
from trm_diag.math.trend import TrendConfig, drift_at, first_below, robust_z, theil_sen, trend_flags


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_z_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    v = 0.01 + 0.002 * rng.standard_normal(60)
    cfg = TrendConfig(scale_rel=0.0)
    for i in range(60):
        prev = [float(x) for x in v[max(0, i - cfg.window) : i]]
        z, med = robust_z(v, i, cfg)
        if len(prev) < cfg.min_window:
            assert math.isnan(z)
            continue
        m = _median(prev)
        mad = _median([abs(x - m) for x in prev])
        assert med == pytest.approx(m, rel=1e-15)
        assert z == pytest.approx((v[i] - m) / max(1.4826 * mad, cfg.scale_floor), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_theil_sen_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    x = np.arange(30, dtype=np.float64)
    y = 0.5 + 0.01 * x + 0.05 * rng.standard_normal(30)
    y[7] = 40.0  # a spike does not move it
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(30) for j in range(i + 1, 30)]
    b = _median(slopes)
    a = _median([float(yy - b * xx) for xx, yy in zip(x, y)])
    got = theil_sen(x, y)
    assert got[0] == pytest.approx(b, rel=1e-12) and got[1] == pytest.approx(a, rel=1e-12)
    assert got[0] == pytest.approx(0.01, abs=0.004)


def test_drift_rate_and_its_absence():
    rng = np.random.default_rng(3)
    steps = np.arange(100)
    noise = 0.0005 * rng.standard_normal(100)
    rising = 0.002 + 1e-4 * steps + noise  # +0.01 per 100 steps: +70% over the last 50
    d = drift_at(steps, rising, 99, TrendConfig())
    assert d is not None and d["per_100_steps"] == pytest.approx(0.01, rel=0.1)
    assert d["relative_per_100_steps"] == pytest.approx(100 * d["per_100_steps"] / d["start_level"], rel=1e-12)
    assert drift_at(steps, 0.01 + noise, 99, TrendConfig()) is None  # flat: no drift
    assert drift_at(steps[:15], rising[:15], 14, TrendConfig()) is None  # too few steps to judge


def test_flags_over_a_series():
    rng = np.random.default_rng(4)
    n = 300
    v = 0.008 * (1 + 0.1 * rng.standard_normal(n))
    v[150] = 0.08  # a stale step
    acc = np.ones(n)
    acc[200:] = 0.6
    acc[250] = 0.9
    flags = trend_flags({"step": np.arange(n) * 2, "abs_log_ratio_mean": v, "accept_trm_max": acc})
    assert [(f.kind, f.step) for f in flags] == [("spike", 300), ("acceptance", 400)]
    assert flags[1].detail["steps_below"] == 99 and flags[1].last_step == 598
    assert first_below(np.arange(5), np.array([0.9, np.nan, 0.8, 0.5, 0.4]), 0.7) == 3


def test_noise_alone_raises_no_spike():
    """A false-alarm check: 2,000 steps of noise whose level varies 10% from step to step, seeded."""
    rng = np.random.default_rng(5)
    v = 0.01 * np.exp(0.1 * rng.standard_normal(2000))
    assert [f for f in trend_flags({"step": np.arange(2000), "abs_log_ratio_mean": v}) if f.kind == "spike"] == []


def test_length_buckets_match_a_loop():
    rng = np.random.default_rng(6)
    lengths = np.array([1, 5, 63, 64, 100, 255, 256, 300, 1100], dtype=np.int64)
    n = int(lengths.sum())
    lp_roll = -rng.random(n) * 3
    lp_train = lp_roll + 0.05 * rng.standard_normal(n)
    _, _, _, buckets = step_metrics(lp_roll, lp_train, lengths, Thresholds(), (1024,))
    got = {b["bucket"]: b for b in buckets}
    edges = list(LENGTH_EDGES) + [10**9]
    want: dict[str, list] = {}
    offset = 0
    for L in lengths:
        k1 = [float(lp_roll[offset + t] - lp_train[offset + t]) for t in range(L)]
        offset += L
        for lo, hi in zip(edges[:-1], edges[1:]):
            if lo <= L < hi:
                want.setdefault(f"{lo}-{hi - 1}", []).append(k1)
    assert set(got) == set(want)
    for name, seqs in want.items():
        tokens = [x for s in seqs for x in s]
        assert got[name]["n_sequences"] == len(seqs) and got[name]["n_tokens"] == len(tokens)
        assert got[name]["kl"] == pytest.approx(sum(tokens) / len(tokens), rel=1e-9)
        assert got[name]["abs_log_ratio_max"] == pytest.approx(max(abs(x) for x in tokens), rel=1e-12)
        keep = [max(x * x / 2 for x in s) <= Thresholds().trm_max for s in seqs]
        assert got[name]["accept_trm_max"] == pytest.approx(sum(keep) / len(keep))
