"""Reports say which estimator each criterion used, label numbers drawn under another sampler as
estimates, and tell users of k3 masks how far off they are under truncation (docs/design.md section 9).
Real transformers models on both sides (the bundled tiny Llama)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import main_exit, run_cli, t95_reference
from trm_diag.report.verdict import verdict


@pytest.fixture(scope="module")
def reports(dense_model, tmp_path_factory):
    """The same truncated run (T 0.8, top-p 0.9) read in the pipeline view and in the full view."""
    out = {}
    for view in ("pipeline", "full"):
        path = tmp_path_factory.mktemp("est") / view
        argv = ["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out", str(path),
                "--num-prompts", "6", "--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.9",
                "--view", view, "-q"]  # fmt: skip
        assert main_exit(argv) == 0, view
        out[view] = path
    return out


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_pipeline_view_is_measured_under_its_own_sampler(reports):
    s = _summary(reports["pipeline"])
    est = s["estimators"]
    assert est["sampler_matches_view"] is True
    assert set(est) >= {"trm_max", "trm_avg", "ser", "ln_trm", "delta", "kl_seq", "sampler"}
    src = s["bound_inputs"]["source"]
    assert src["kl_seq"].startswith("measured") and src["tv_seq"].startswith("measured")
    # SER is the exact 2 tv mean per sequence in the exact tier (what mean |rho - 1| estimates untruncated)
    tok = pd.read_parquet(reports["pipeline"] / "tokens.parquet")
    seqs = pd.read_parquet(reports["pipeline"] / "sequences.parquet")
    first = seqs.iloc[0]
    mine = tok[tok["seq_id"] == first["seq_id"]]
    assert first["ser"] == pytest.approx(float(2.0 * mine["tv"].astype(np.float64).mean()), rel=1e-12)


def test_full_view_labels_its_monte_carlo_inputs_estimates(reports):
    s = _summary(reports["full"])
    assert s["estimators"]["sampler_matches_view"] is False
    src = s["bound_inputs"]["source"]
    for key in ("kl_seq", "tv_seq", "dbar"):
        assert src[key].startswith("estimate") and "untruncated p" in src[key], (key, src[key])
    v = s["verdict"]
    assert any(f["id"] == "other_sampler" for f in v["findings"])
    if v["status"] != "unknown":
        assert "estimate" in v["headline"]


def test_truncated_report_tells_k3_users_how_far_off_they_are(reports):
    s = _summary(reports["pipeline"])
    m = s["metrics"]
    tok = pd.read_parquet(reports["pipeline"] / "tokens.parquet")
    lr = tok["log_ratio"].to_numpy(np.float64)
    # the two numbers the finding compares, recomputed from the tokens: verl's k1 mean and k3 mean
    assert m["kl"] == pytest.approx(float(np.mean(-lr)), rel=1e-12)
    assert m["k3_kl"] == pytest.approx(float(np.mean(np.expm1(lr) - lr)), rel=1e-12)
    assert m["tv_mc_mean"] == pytest.approx(float(np.mean(np.maximum(0.0, -np.expm1(lr)))), rel=1e-12)
    found = [f for f in s["verdict"]["findings"] if f["id"] == "k3_truncation"]
    assert found and "k3_kl" in found[0]["finding"] and "k1 mean" in found[0]["finding"]
    # an untruncated summary has no such finding
    s2 = dict(s, views={"truncated": False, "view": "pipeline", "note": "x"})
    assert not [f for f in verdict(s2)["findings"] if f["id"] == "k3_truncation"]


def test_a_nan_token_makes_the_verdict_unknown_and_says_how_many(reports):
    s = _summary(reports["pipeline"])
    s = dict(s, hygiene={"nonfinite_tokens": 3, "zero_prob_tokens": 0})
    v = verdict(s)
    assert v["status"] == "unknown" and "3 scored token(s) are NaN" in v["headline"]


def test_score_of_a_truncated_file_uses_k1_and_says_so(reports, dense_model, tmp_path, capsys):
    # the sampled tier of the same rollouts, as an RL dump would give them
    rollouts = tmp_path / "r.jsonl"
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out",
                            str(tmp_path / "c"), "--num-prompts", "4", "--max-new-tokens", "16", "--temperature",
                            "0.8", "--top-p", "0.9", "--save-rollouts", str(rollouts), "-q"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["score", str(rollouts), "--model", str(dense_model), "--fidelity", "sampled",
                            "--out", str(tmp_path / "s"), "-q"], capsys)  # fmt: skip
    assert code == 0, err
    s = _summary(tmp_path / "s")
    assert s["estimators"]["trm_avg"].startswith("unbiased estimate: mean_t k1")
    assert s["bound_inputs"]["source"]["kl_seq"].startswith("estimate (upper one-sided 95% Student-t value")
    tokens = pd.read_parquet(tmp_path / "s" / "tokens.parquet")
    k1_sums = (tokens["lp_roll"] - tokens["lp_train"]).groupby(tokens["seq_id"]).sum()  # k1 = -log rho
    assert s["bound_inputs"]["kl_seq_mean"] == pytest.approx(k1_sums.mean(), rel=1e-9, abs=1e-12)
    se = k1_sums.std(ddof=1) / np.sqrt(len(k1_sums))
    upper = max(0.0, k1_sums.mean() + t95_reference(len(k1_sums) - 1) * se)
    assert abs(s["bound_inputs"]["kl_seq"] - upper) <= 5e-5 * se + 1e-12  # t95's table: 4 decimals
    seqs = pd.read_parquet(tmp_path / "s" / "sequences.parquet")
    th = s["thresholds"]["trm_avg"]
    assert list(seqs["accept_trm_avg"]) == [bool(x <= th) for x in seqs["k1_mean"]]


def test_greedy_decoding_is_not_a_monte_carlo_sample():
    from trm_diag.config import SamplingConfig, sampler_differs

    assert "greedy" in sampler_differs("pipeline", SamplingConfig(temperature=0))
    assert sampler_differs("pipeline", SamplingConfig(temperature=0.8, top_p=0.9)) is None
    assert sampler_differs("replay", SamplingConfig(temperature=0.8, top_p=0.9)) is None


def test_greedy_advice_asks_for_sampling_not_for_the_view_in_use(reports):
    """Greedy rollouts are no draws under any view: the advice is to sample, not to pick the pipeline view."""
    from trm_diag.config import SamplingConfig, sampler_differs

    s = _summary(reports["pipeline"])
    est = {**s["estimators"], "sampler_matches_view": False}
    greedy = dict(s, estimators={**est, "sampler": sampler_differs("pipeline", SamplingConfig(temperature=0))})
    (f,) = [f for f in verdict(greedy)["findings"] if f["id"] == "other_sampler"]
    assert "--temperature > 0" in f["action"] and "--view pipeline" not in f["action"]
    (g,) = [f for f in verdict(dict(s, estimators=est))["findings"] if f["id"] == "other_sampler"]
    assert "--view pipeline" in g["action"]


def test_k3_finding_only_where_k1_is_unbiased_and_k3_is_not(reports):
    s = _summary(reports["pipeline"])
    assert [f for f in verdict(s)["findings"] if f["id"] == "k3_truncation"]
    # replay renormalises q on the kept set (E[rho] = 1: k3 unbiased); another sampler: k1 is no unbiased yardstick
    for other in (dict(s, view="replay"), dict(s, estimators={**s["estimators"], "sampler_matches_view": False})):
        assert not [f for f in verdict(other)["findings"] if f["id"] == "k3_truncation"]
    full = _summary(reports["full"])
    assert full["estimators"]["trm_avg"].startswith("exact")  # exact tier: nothing to relabel
    assert "sampler" in full["estimators"] and full["estimators"]["sampler"].startswith("estimate under another")
