"""Batch metrics and bound inputs against direct numpy recomputations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tests.test_sequences import make_tokens
from trm_diag.config import Thresholds
from trm_diag.metrics import batch_metrics, bound_inputs
from trm_diag.sequences import sequence_stats


def frames(lengths, seed=0):
    tok = make_tokens(lengths, seed)
    th = Thresholds()
    seq = sequence_stats(tok, np.asarray(lengths), th)
    tokens = pd.DataFrame(tok)
    tokens["seq_id"] = np.repeat(np.arange(len(lengths)), lengths)
    tokens["pos"] = np.concatenate([np.arange(n) for n in lengths])
    return tokens, pd.DataFrame(seq), th


def test_batch_metrics_reference():
    lengths = [3, 9, 4, 12]
    tokens, seqs, th = frames(lengths)
    m = batch_metrics(tokens, seqs, fidelity="exact", thresholds=th)
    lr = tokens["log_ratio"].to_numpy()
    rho = np.exp(lr)
    assert math.isclose(m["k1_mean"], float(np.mean(-lr)), rel_tol=1e-12)
    assert math.isclose(m["chi2_token"], float(np.mean(rho**2) - 1), rel_tol=1e-9)
    seq_w = np.array([np.prod(rho[tokens["seq_id"] == i]) for i in range(len(lengths))])
    assert math.isclose(m["chi2_seq"], float(np.mean(seq_w**2) - 1), rel_tol=1e-9)
    assert math.isclose(m["ess_seq"], float(seq_w.sum() ** 2 / (len(seq_w) * (seq_w**2).sum())), rel_tol=1e-9)
    assert math.isclose(m["frac_ratio_outside_2"], float(np.mean((rho > 2) | (rho < 0.5))))
    assert math.isclose(m["token_kl_max"], tokens["kl"].max())
    assert math.isclose(m["token_kl_p99"], float(np.quantile(tokens["kl"], 0.99)))
    per_seq_gap = [abs(np.mean(lr[tokens["seq_id"] == i])) for i in range(len(lengths))]
    assert math.isclose(m["log_ppl_abs_diff"], float(np.mean(per_seq_gap)), rel_tol=1e-9)
    assert math.isclose(m["dppo_tv_token_frac"], float(np.mean(tokens["tv_bin"] > th.dppo_tv)))


def test_bound_inputs_reference():
    lengths = [3, 9, 4]
    tokens, seqs, _ = frames(lengths, seed=2)
    inp = bound_inputs(tokens, seqs, fidelity="exact")
    assert inp.delta == tokens["kl"].max() and inp.eps == tokens["tv"].max()
    assert math.isclose(inp.kl_seq, tokens["kl"].sum() / 3)
    seq_ratio = [np.exp(tokens["log_ratio"][tokens["seq_id"] == i].sum()) for i in range(3)]
    assert math.isclose(inp.tv_seq, float(np.mean([max(0.0, 1 - r) for r in seq_ratio])))
    # Dbar_t: mean over rollouts of tv at position t, 0 after a response ended
    for t in range(9):
        vals = [tokens["tv"][(tokens["seq_id"] == i) & (tokens["pos"] == t)].sum() for i in range(3)]
        assert math.isclose(inp.dbar[t], float(np.mean(vals)), abs_tol=1e-15)
    heur = bound_inputs(tokens.drop(columns=["kl", "tv"]), seqs, fidelity="sampled")
    assert heur.delta == tokens["k2"].max() and heur.eps is None
    assert "heuristic" in heur.source["delta"]
