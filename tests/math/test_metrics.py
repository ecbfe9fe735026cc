"""Batch metrics and bound inputs against direct numpy recomputations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.math.test_sequences import make_tokens
from trm_diag.config import Thresholds
from trm_diag.math.metrics import METRICS, batch_metrics, bound_inputs
from trm_diag.math.sequences import sequence_stats


def frames(lengths, seed=0):
    tok = make_tokens(lengths, seed)
    th = Thresholds()
    seq = sequence_stats(tok, np.asarray(lengths), th)
    tokens = pd.DataFrame(tok)
    tokens["seq_id"] = np.repeat(np.arange(len(lengths)), lengths)
    tokens["pos"] = np.concatenate([np.arange(n) for n in lengths])
    return tokens, pd.DataFrame(seq), th


def _verl_reference(lp_train: np.ndarray, lp_roll: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """verl's compute_offpolicy_metrics / compute_is_metrics definitions, written out in float64 over
    padded [B, T] arrays and a response mask (an independent re-statement, not trm-diag's code)."""

    def masked_mean(x, m, axis=None):
        return (x * m).sum(axis) / (m.sum(axis) + 1e-8) if axis is not None else (x * m).sum() / m.sum()

    out = {}
    mean_lpt = masked_mean(lp_train, mask, -1)
    mean_lpr = masked_mean(lp_roll, mask, -1)
    out["training_ppl"] = np.exp(-mean_lpt).mean()
    out["training_log_ppl"] = (-mean_lpt).mean()
    out["kl"] = masked_mean(lp_roll - lp_train, mask)
    lr = lp_train - lp_roll
    out["k3_kl"] = masked_mean(np.exp(lr) - lr - 1, mask)
    out["rollout_ppl"] = np.exp(-mean_lpr).mean()
    out["rollout_log_ppl"] = (-mean_lpr).mean()
    d = mean_lpr - mean_lpt
    out.update(log_ppl_diff=d.mean(), log_ppl_abs_diff=np.abs(d).mean(), log_ppl_diff_max=d.max(),
               log_ppl_diff_min=d.min(), ppl_ratio=np.exp(d).mean())  # fmt: skip
    out["chi2_token"] = masked_mean(np.exp(np.clip(lr, -20, 20)) ** 2, mask) - 1
    seq = (lr * mask).sum(-1)
    out["chi2_seq"] = np.exp(2 * np.clip(seq, -20, 20)).mean() - 1
    for name, w in (("token", np.exp(np.clip(lr, -20, 20))), ("seq", np.exp(np.clip(seq, -20, 20))[:, None] + 0 * lr)):
        w = np.clip(w * mask, 0.5, 2.0)
        mean = masked_mean(w, mask)
        out[f"rollout_is_eff_sample_size_{name}"] = 1.0 / masked_mean((w / (mean + 1e-8)) ** 2, mask)
    return {k: float(v) for k, v in out.items()}


def test_metrics_named_as_verl_match_verls_definitions():
    """Every metric with verl's name has verl's definition, to float64 rounding (padded arrays, masks)."""
    lengths = [3, 9, 4, 12, 1]
    tokens, seqs, th = frames(lengths, seed=5)
    tokens["log_ratio"] *= 8  # ratios spread beyond verl's IS clamp [1/2, 2] and its +-20 log clamp
    tokens.loc[3, "log_ratio"] = 25.0
    tokens["k3"] = np.expm1(tokens["log_ratio"]) - tokens["log_ratio"]
    tokens["lp_train"] = tokens["lp_roll"] + tokens["log_ratio"]
    seqs = pd.DataFrame(sequence_stats({c: tokens[c].to_numpy() for c in tokens}, np.asarray(lengths), th))
    m = batch_metrics(tokens, seqs, fidelity="exact", thresholds=th)
    B, T = len(lengths), max(lengths)
    pad = {c: np.zeros((B, T)) for c in ("lp_train", "lp_roll")}
    mask = np.zeros((B, T))
    for i, (sid, pos) in enumerate(zip(tokens["seq_id"], tokens["pos"])):
        for c in pad:
            pad[c][sid, pos] = tokens[c].iloc[i]
        mask[sid, pos] = 1
    ref = _verl_reference(pad["lp_train"], pad["lp_roll"], mask)
    verl_names = {k for k, (_, who) in METRICS.items() if who == "verl"}
    assert verl_names == set(ref)
    for k, v in ref.items():
        assert math.isclose(m[k], v, rel_tol=1e-7, abs_tol=1e-12), (k, m[k], v)


def test_batch_metrics_reference():
    lengths = [3, 9, 4, 12]
    tokens, seqs, th = frames(lengths)
    m = batch_metrics(tokens, seqs, fidelity="exact", thresholds=th)
    lr = tokens["log_ratio"].to_numpy()
    rho = np.exp(lr)
    seq_w = np.array([np.prod(rho[tokens["seq_id"] == i]) for i in range(len(lengths))])
    assert math.isclose(m["ess_seq"], float(seq_w.sum() ** 2 / (len(seq_w) * (seq_w**2).sum())), rel_tol=1e-9)
    assert math.isclose(m["ess_token"], float(rho.sum() ** 2 / (len(rho) * (rho**2).sum())), rel_tol=1e-9)
    assert math.isclose(m["frac_ratio_outside_2"], float(np.mean((rho > 2) | (rho < 0.5))))
    # clip bands counted by hand: PPO [0.8, 1.2], DAPO [0.8, 1.28]
    assert m["ppo_clip_frac"] == pytest.approx(sum(1 for r in rho.tolist() if not 0.8 <= r <= 1.2) / len(rho))
    assert m["dapo_clip_frac"] == pytest.approx(sum(1 for r in rho.tolist() if not 0.8 <= r <= 1.28) / len(rho))
    assert math.isclose(m["token_kl_max"], tokens["kl"].max())
    assert math.isclose(m["token_kl_p99"], float(np.quantile(tokens["kl"], 0.99)))
    assert m["token_kl_n_inf"] == 0 and m["token_kl_n_nan"] == 0
    assert math.isclose(m["dppo_tv_token_frac"], float(np.mean(tokens["tv_bin"] > th.dppo_tv)))


def test_every_metric_is_documented():
    """docs/metrics.md lists every metric of METRICS, and METRICS names every key batch_metrics writes."""
    tokens, seqs, th = frames([3, 5])
    keys = set(batch_metrics(tokens, seqs, fidelity="exact", thresholds=th))
    patterns = [k.replace("<column>", "[a-z0-9_]+").replace("<stat>", "[a-z0-9]+").replace("<criterion>", "[a-z_]+")
                for k in METRICS]  # fmt: skip
    import re

    assert all(any(re.fullmatch(p, k) for p in patterns) for k in keys), keys
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    assert all(f"`{k}`" in doc for k in METRICS), [k for k in METRICS if f"`{k}`" not in doc]


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
