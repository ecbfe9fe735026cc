"""masking.py against direct recomputation, including the (1-p)^T length bias of TRM-Max."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.math.test_sequences import make_tokens
from trm_diag.config import Thresholds
from trm_diag.math.masking import acceptance_by_length, length_buckets, threshold_sweep, token_violation_rate
from trm_diag.math.sequences import sequence_stats


def frames(lengths, spike_rate, seed=0):
    rng = np.random.default_rng(seed)
    tok = make_tokens(lengths, seed)
    tok["kl"] = np.where(rng.random(len(tok["kl"])) < spike_rate, 1.0, 1e-6)
    th = Thresholds(trm_max=0.5)
    seqs = pd.DataFrame(sequence_stats(tok, np.asarray(lengths), th))
    return pd.DataFrame(tok), seqs, th


def test_sweep_matches_direct_counts():
    tokens, seqs, th = frames(np.full(300, 20), 0.02)
    rows = threshold_sweep(seqs, th, "exact")
    for r in rows:
        col = {"trm_max": "kl_max", "trm_avg": "kl_mean", "ln_trm": "ln_trm", "ser": "ser"}[r["criterion"]]
        assert r["acceptance"] == float((seqs[col] <= r["threshold"]).mean())
    # acceptance never decreases as the threshold grows
    for name in ("trm_max", "trm_avg", "ln_trm", "ser"):
        acc = [r["acceptance"] for r in rows if r["criterion"] == name]
        assert acc == sorted(acc)


def test_length_bias_follows_one_minus_p_to_the_T():
    rng = np.random.default_rng(1)
    lengths = rng.choice([10, 40, 160], size=3000)
    tokens, seqs, th = frames(lengths, 0.01, seed=2)
    p = token_violation_rate(tokens, th, "exact")
    assert abs(p - 0.01) < 0.002
    rows = acceptance_by_length(tokens, seqs, th, "exact")
    assert [r["trm_max"] for r in rows] == sorted((r["trm_max"] for r in rows), reverse=True)
    for r in rows:
        assert abs(r["trm_max"] - r["trm_max_predicted"]) < 0.05, r
    assert sum(r["n"] for r in rows) == len(seqs)


def test_buckets_cover_all_lengths():
    lengths = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55])
    b = length_buckets(lengths)
    covered = [any(lo <= x <= hi for lo, hi in b) for x in lengths]
    assert all(covered) and all(lo <= hi for lo, hi in b)
