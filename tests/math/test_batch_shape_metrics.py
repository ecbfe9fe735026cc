"""The batch-shape numbers: the share of ratios outside [0.9, 1.1], PPO/DAPO clip-status flips, and the rollout side's
log-probs taken from its scoring pass (the trainer against itself), each against a float64 loop written apart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.math.test_metrics import frames
from trm_diag.math.batch_shape import from_scoring_pass
from trm_diag.math.metrics import batch_metrics


def _loop_reference(log_ratio: list[float]) -> dict[str, float]:
    """Token by token in float64: the clipped objective's status per sign of the advantage, and the band."""
    counts = dict.fromkeys(("band", "ppo_pos", "ppo_neg", "dapo_pos", "dapo_neg"), 0)
    n = 0
    for lr in log_ratio:
        if math.isnan(lr):
            continue
        n += 1
        r = math.exp(lr)
        counts["band"] += not (0.9 <= r <= 1.1)
        for name, (eps_low, eps_high) in (("ppo", (0.2, 0.2)), ("dapo", (0.2, 0.28))):
            # PPO: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) has zero gradient when the clip is the min
            clipped_pos = min(r * 1.0, min(max(r, 1 - eps_low), 1 + eps_high) * 1.0) != r * 1.0
            clipped_neg = min(r * -1.0, min(max(r, 1 - eps_low), 1 + eps_high) * -1.0) != r * -1.0
            counts[f"{name}_pos"] += clipped_pos  # in exact arithmetic r = 1: never clipped, so a clip is a flip
            counts[f"{name}_neg"] += clipped_neg
    return {k: v / n for k, v in counts.items()}


@pytest.mark.parametrize("seed,scale", [(0, 0.05), (1, 0.2), (2, 1.0)])
def test_band_share_and_clip_flips_match_a_token_loop(seed, scale):
    tokens, seqs, th = frames([7, 12, 5, 30], seed=seed)
    rng = np.random.default_rng(100 + seed)
    lr = rng.normal(0.0, scale, len(tokens))
    lr[3] = math.nan  # a token nobody could score: skipped
    lr[5] = -math.inf  # probability 0 on the training side: rho = 0, outside every band
    tokens["log_ratio"] = lr
    m = batch_metrics(tokens, seqs, fidelity="exact", thresholds=th)
    ref = _loop_reference(list(lr))
    assert m["frac_ratio_outside_10pct"] == pytest.approx(ref["band"], abs=1e-15)
    for name in ("ppo", "dapo"):
        assert m[f"{name}_clip_flip_pos"] == pytest.approx(ref[f"{name}_pos"], abs=1e-15)
        assert m[f"{name}_clip_flip_neg"] == pytest.approx(ref[f"{name}_neg"], abs=1e-15)
    # the flips split the clip fraction in two
    assert m["ppo_clip_flip_pos"] + m["ppo_clip_flip_neg"] == pytest.approx(m["ppo_clip_frac"], abs=1e-15)
    assert m["dapo_clip_flip_pos"] <= m["ppo_clip_flip_pos"]  # clip-higher: fewer flips for A > 0


def test_the_band_is_asymmetric_in_log_ratio():
    """rho = 1.105 is outside, rho = 0.905 inside: [0.9, 1.1] is a band in rho, not in log rho."""
    tokens, seqs, th = frames([2])
    tokens["log_ratio"] = np.log([1.105, 0.905])
    m = batch_metrics(tokens, seqs, fidelity="exact", thresholds=th)
    assert m["frac_ratio_outside_10pct"] == 0.5


def test_scoring_pass_replaces_the_decode_log_probs_and_every_column_that_follows():
    rng = np.random.default_rng(7)
    n = 9
    lp_train = -rng.exponential(1.0, n)
    lp_prefill = lp_train + rng.normal(0, 0.01, n)
    lp_prefill[2] = lp_train[2]  # bit-equal passes: a log ratio of exactly 0
    cols = {
        "lp_roll": lp_prefill + 0.3,  # decode steps: far off
        "lp_roll_prefill": lp_prefill, "lp_train": lp_train, "log_ratio": lp_train - (lp_prefill + 0.3),
        "k1": np.zeros(n), "k2": np.zeros(n), "k3": np.zeros(n), "abs_rho_m1": np.zeros(n), "tv_bin": np.zeros(n),
        "kl_bin": np.zeros(n), "prefill_gap": np.full(n, -0.3), "zero_prob": np.zeros(n, bool), "kl": np.ones(n),
    }  # fmt: skip
    decode = cols["lp_roll"].copy()
    out = from_scoring_pass(cols)
    for i in range(n):
        a, b = float(lp_prefill[i]), float(lp_train[i])
        lr = b - a
        assert out["lp_roll"][i] == a and out["log_ratio"][i] == lr and out["prefill_gap"][i] == 0
        assert out["k1"][i] == -lr and out["k2"][i] == pytest.approx(lr * lr / 2, rel=1e-15)
        k3 = sum(lr**k / math.factorial(k) for k in range(2, 30))  # rho - 1 - log rho as its series: no cancellation
        assert out["k3"][i] == pytest.approx(k3, rel=1e-12, abs=1e-300)
        pa, pb = math.exp(a), math.exp(b)
        assert out["tv_bin"][i] == pytest.approx(abs(pa - pb), rel=1e-12, abs=1e-18)
        kl_bin = pa * math.log(pa / pb) + (1 - pa) * math.log((1 - pa) / (1 - pb))
        assert out["kl_bin"][i] == pytest.approx(max(kl_bin, 0.0), rel=1e-6, abs=1e-15)
    assert out["log_ratio"][2] == 0.0 and out["kl"] is cols["kl"]  # full-row columns are left as they were
    assert (cols["lp_roll"] == decode).all() and (cols["prefill_gap"] == -0.3).all()  # the caller's are kept
