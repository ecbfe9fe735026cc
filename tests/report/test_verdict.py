"""The verdict rules (docs/decisions.md, 'Verdict and advice') on constructed report summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trm_diag.math.bounds import BoundInputs, all_bounds
from trm_diag.math.masking import thresholds_for_target
from trm_diag.report.verdict import verdict


def summary(delta=1e-6, eps=1e-4, T=64, accept=0.95, fidelity="exact", **metrics):
    inp = BoundInputs(delta=delta, eps=eps, kl_seq=T * delta, tv_seq=min(1, T * eps), dbar=np.full(T, eps),
                      kl_rate=delta, tv_rate=eps, seq_T=T)  # fmt: skip
    return {
        "fidelity": fidelity,
        "horizons": [1024, 16384],
        "thresholds": {"trm_max": 0.05, "trm_avg": 0.001},
        "metrics": {"accept_combined": accept, "accept_trm_max": accept, **metrics},
        "bound_inputs": {**inp.as_dict(), "observed_T": T},
        "bounds_at_observed_T": all_bounds(T, inp)[0],
        "hygiene": {"zero_prob_tokens": 0, "nonfinite_tokens": 0},
        "masking": {"thresholds_for_target": {"trm_max": 0.2, "trm_avg": 0.004}},
    }


def test_inside():
    v = verdict(summary())
    assert v["status"] == "inside" and v["headline"].startswith("INSIDE") and not v["findings"]
    assert [h["T"] for h in v["horizons"]] == [64, 1024, 16384] and v["horizons"][0]["inside"]


def test_outside_with_a_vacuous_bound_names_the_delta_that_would_do():
    v = verdict(summary(delta=0.05, eps=0.15))
    assert v["status"] == "outside" and "vacuous" in v["headline"]
    f = v["findings"][0]
    assert f["id"] == "vacuous_bound" and "TRM-Max at delta <=" in f["action"]
    assert not v["horizons"][-1]["inside"]


def test_low_acceptance_gives_the_thresholds_that_keep_70_percent():
    v = verdict(summary(accept=0.4))
    assert v["status"] == "inside, masking too much"
    f = next(f for f in v["findings"] if f["id"] == "low_acceptance")
    assert "trm_max <= 0.2" in f["action"] and "trm_avg <= 0.004" in f["action"]


def test_wide_top_k_intervals_and_other_findings():
    v = verdict(summary(fidelity="topk", token_kl_lo_mean=1e-6, token_kl_hi_mean=1e-3, kl_share_low_prob=0.8))
    ids = [f["id"] for f in v["findings"]]
    assert "wide_intervals" in ids and "low_probability_tokens" in ids
    v = verdict(summary(fidelity="exact", prefill_gap_abs_max=0.02))
    assert [f["id"] for f in v["findings"]] == ["prefill_gap"]
    assert verdict(summary(fidelity="sampled"))["headline"].endswith("(heuristic: sampled tier)")
    assert verdict({"metrics": {}})["status"] == "unknown"


def test_thresholds_for_target_keep_exactly_enough_sequences():
    rng = np.random.default_rng(0)
    seqs = pd.DataFrame({"length": rng.integers(0, 5, 50), "kl_max": rng.lognormal(-5, 1, 50),
                         "kl_mean": rng.lognormal(-7, 1, 50), "ln_trm": rng.random(50), "ser": rng.random(50)})  # fmt: skip
    seqs.loc[3, "kl_max"] = np.nan
    got = thresholds_for_target(seqs, "exact", 0.7)
    for name, col in (("trm_max", "kl_max"), ("trm_avg", "kl_mean"), ("ser", "ser")):
        keep = (seqs["length"] == 0) | (seqs[col] <= got[name])
        assert keep.mean() >= 0.7, name
        tighter = (seqs["length"] == 0) | (seqs[col] < got[name])
        assert tighter.mean() < 0.7, name  # the smallest such threshold


def _views(pipeline, replay, full):
    return {"view": "pipeline", "by_view": {v: {"kl_mean": k} for v, k in zip(("pipeline", "replay", "full"), (pipeline, replay, full))}}  # fmt: skip


def test_the_sampler_side_of_the_mismatch_is_named_with_its_fix():
    s = {**summary(), "sampling": {"temperature": 0.8, "logprobs": "processed"}, "views": _views(0.02, 5e-5, 6e-5)}
    f = [f for f in verdict(s)["findings"] if f["id"] == "truncation"]
    assert len(f) == 1 and "0.02" in f[0]["finding"] and "6.00e-05" in f[0]["finding"] and "replay" in f[0]["action"]
    s["views"] = _views(5e-4, 5e-5, 6e-5)  # under 10x the numerics: the sampler is not the cause
    assert not [f for f in verdict(s)["findings"] if f["id"] == "truncation"]
    s = {**summary(), "sampling": {"temperature": 0.8, "logprobs": "raw"}, "views": _views(0.3, 5e-5, 6e-5)}
    f = [f for f in verdict(s)["findings"] if f["id"] in ("raw_logprobs", "truncation")]
    assert [x["id"] for x in f] == ["raw_logprobs"] and "logprobs=processed" in f[0]["action"]
    s["sampling"]["temperature"] = 1.0  # raw and processed agree at temperature 1 without truncation
    assert not [f for f in verdict(s)["findings"] if f["id"] == "raw_logprobs"]


def _cert(n_tok=0, n_rows=0, first=None, gap=0.0, n=120):
    return {"n_tokens": n, "n_tokens_differing": n_tok, "max_abs_log_ratio": gap, "first_token_differing": first,
            "n_rows_differing": n_rows, "first_row_differing": first}  # fmt: skip


def test_bitwise_line_certifies_or_names_the_first_differing_token():
    v = verdict({**summary(), "certification": _cert()})
    assert v["bitwise"] == "BITWISE EQUAL on 120 tokens (their full rows too)"
    v = verdict({**summary(), "certification": _cert(7, 9, {"seq_id": 3, "pos": 11}, 0.02)})
    assert v["bitwise"].startswith("differs on 7 of 120 tokens, first at sequence 3, position 11")
    assert "full rows differ at 9 tokens" in v["bitwise"] and v["status"] == "inside"  # drift is judged as before
    # rows that differ while every sampled log-prob is equal: not certified
    v = verdict({**summary(), "certification": _cert(0, 2, {"seq_id": 0, "pos": 4})})
    assert not v["bitwise"].startswith("BITWISE") and "sequence 0, position 4" in v["bitwise"]
    assert verdict(summary())["bitwise"] is None  # a report written before certification
    damaged = {**_cert(), "n_tokens_differing": None}  # a damaged summary.json: never "differs on 0 tokens"
    line = verdict({**summary(), "certification": damaged})["bitwise"]
    assert line.startswith("not certified") and "differs on 0" not in line


def test_not_comparable_replaces_the_drift_verdict():
    s = {**summary(delta=0.05, eps=0.15), "comparable": {"ok": False, "differs": ["the weights differ"]}}
    v = verdict(s)
    assert v["status"] == "not comparable" and v["headline"] == "NOT COMPARABLE: the weights differ"
    assert verdict({**summary(), "comparable": {"ok": True}})["status"] == "inside"


def test_inside_from_few_rollouts_is_said_so():
    """B* < 1 from a handful of rollouts: the Monte-Carlo inputs can read low by chance (D_TV^seq 0 when every
    rollout has prod rho >= 1), so the headline and a finding say how many; 30 or more: nothing added."""
    from trm_diag.report.verdict import FEW_ROLLOUTS

    def with_samples(**samples):
        s = summary()
        s["bound_inputs"]["samples"] = samples
        return verdict(s)

    v = with_samples(sequences=4, tokens=256)
    assert v["status"] == "inside" and "(from 4 rollouts only: see findings)" in v["headline"]
    (f,) = [f for f in v["findings"] if f["id"] == "few_rollouts"]
    assert "averaged over 4 rollout(s)" in f["finding"] and f"at least {FEW_ROLLOUTS} rollouts" in f["action"]
    v = with_samples(sequences=40, empty_sequences=12)  # 28 with a scored token
    assert "from 28 rollouts only" in v["headline"] and [f for f in v["findings"] if f["id"] == "few_rollouts"]
    v = with_samples(sequences=FEW_ROLLOUTS)
    assert "rollouts only" not in v["headline"] and not v["findings"]
    v = verdict({**summary(delta=0.05, eps=0.15), "bound_inputs": {**summary(delta=0.05, eps=0.15)["bound_inputs"],
                                                                   "samples": {"sequences": 2}}})  # fmt: skip
    assert v["status"] == "outside" and not [f for f in v["findings"] if f["id"] == "few_rollouts"]
