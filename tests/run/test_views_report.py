"""The three views in a real report (transformers and vLLM rollouts): every view's columns equal a float64
recomputation from the two backends' own rows; the identities hold row by row; --view picks the driver."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import run_cli
from tests.math.test_views import _kl, _softmax, reference_kept_set
from trm_diag.config import SamplingConfig
from trm_diag.math.views import kept_set

SETTINGS = {
    "top_p": (["--top-p", "0.9"], SamplingConfig(temperature=0.8, top_p=0.9)),
    "top_k": (["--top-k", "5"], SamplingConfig(temperature=0.8, top_k=5)),
    "min_p": (["--min-p", "0.1"], SamplingConfig(temperature=0.8, min_p=0.1)),
}
KV = "kv_cache_memory_bytes=268435456"


def _compare(tmp_path, model, rollout, flags, view="pipeline", capsys=None, prompts="5"):
    out = tmp_path / f"r-{view}"
    code, _, err = run_cli(["compare", "--model", str(model), "--rollout", rollout, "--out", str(out),
                            "--num-prompts", prompts, "--max-new-tokens", "20", "--temperature", "0.8", *flags,
                            "--view", view, "-q"], capsys)  # fmt: skip
    assert code == 0, err
    return out


def _recompute(out, model, rollout_spec, sampling):
    """Each token's views from the two backends' own rows (same batches as the run), in numpy float64."""
    from trm_diag.backends import load_backend, parse_spec

    seqs = pd.read_parquet(out / "sequences.parquet")
    pairs = [(list(p), list(r)) for p, r in zip(seqs["prompt_token_ids"], seqs["response_token_ids"])]
    rows = {}
    for side, spec in (("roll", rollout_spec), ("train", "hf:dtype=float32")):
        b = load_backend(parse_spec(f"{spec},model={model}"))
        rows[side] = [r.scores(0, r.length).double().numpy() for r in b.score(pairs, sampling)]
        b.close()
    ref = []
    for (_, resp), a_rows, b_rows in zip(pairs, rows["roll"], rows["train"]):
        for t, y in enumerate(resp):
            p, q = _softmax(a_rows[t]), _softmax(b_rows[t])
            keep, tied, count, _ = reference_kept_set(a_rows[t], sampling)
            if tied.size:  # equal bf16 logits straddle the top-p cut: the rule fixes how many stay, the
                # engine's sort which ones; take its members once they are `count` of the tied block
                engine = kept_set(torch.from_numpy(a_rows[t][None]), sampling)[0].numpy()
                assert int(engine[tied].sum()) == count, (t, tied, count)
                keep[tied] = engine[tied]
            keep[y] = True
            m, qm = p[keep].sum(), q[keep].sum()
            pt, qt = np.where(keep, p / m, 0.0), np.where(keep, q / qm, 0.0)
            roll = _softmax(a_rows[t] * sampling.temperature) if sampling.logprobs == "raw" else pt  # reported
            ref.append({
                "kept_mass": m, "kept_count": int(keep.sum()), "train_kept_mass": qm,
                "kl_pipeline": _kl(roll, q), "kl_replay": _kl(pt, qt), "kl_full": _kl(p, q),
                "tv_pipeline": 0.5 * np.abs(roll - q).sum(), "tv_replay": 0.5 * np.abs(pt - qt).sum(),
                "tv_full": 0.5 * np.abs(p - q).sum(), "kl_rev_replay": _kl(qt, pt), "kl_rev_full": _kl(q, p),
                "lr_full": math.log(q[y] / p[y]), "lr_pipeline": math.log(q[y] / roll[y]),
                "lr_replay": math.log(qt[y] / pt[y]), "lp_processed": math.log(pt[y]), "lp_raw": math.log(roll[y]),
            })  # fmt: skip
    return pd.DataFrame(ref)


def _check(tok, ref, view, raw=False):
    for c in (
        "kept_mass",
        "train_kept_mass",
        "kl_pipeline",
        "kl_replay",
        "kl_full",
        "lr_full",
        "lr_pipeline",
        "lr_replay",
    ):
        np.testing.assert_allclose(tok[c], ref[c], rtol=1e-6, atol=1e-12, err_msg=c)
    assert (tok["kept_count"].to_numpy() == ref["kept_count"].to_numpy()).all()
    for c in ("kl", "tv"):  # the chosen view drives kl / tv
        np.testing.assert_allclose(tok[c], ref[f"{c}_{view}"], rtol=1e-6, atol=1e-12, err_msg=c)
    if view != "pipeline":  # KL(q || p~) is infinite in the pipeline view (q > 0 outside the kept set)
        np.testing.assert_allclose(tok["kl_rev"], ref[f"kl_rev_{view}"], rtol=1e-6, atol=1e-12)
    # finite where the issue says so, and the identities between views row by row
    assert np.isfinite(tok[["kl_pipeline", "kl_replay", "lr_pipeline", "lr_replay"]].to_numpy()).all()
    np.testing.assert_allclose(
        tok["lr_replay"], tok["lr_full"] + np.log(tok["kept_mass"]) - np.log(tok["train_kept_mass"]), rtol=0, atol=1e-12
    )
    if not raw:
        np.testing.assert_allclose(tok["lr_pipeline"], tok["lr_full"] + np.log(tok["kept_mass"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_views_in_a_transformers_report_match_float64(name, dense_model, tmp_path, capsys):
    flags, sampling = SETTINGS[name]
    out = _compare(tmp_path, dense_model, "hf:dtype=bfloat16", flags, capsys=capsys)
    tok = pd.read_parquet(out / "tokens.parquet")
    _check(tok, _recompute(out, dense_model, "hf:dtype=bfloat16", sampling), "pipeline")
    s = json.loads((out / "summary.json").read_text())
    assert s["view"] == "pipeline" and s["views"]["truncated"] and set(s["views"]["by_view"]) == {
        "pipeline", "replay", "full"
    }  # fmt: skip
    assert "pipeline view" in s["compared_distribution"]
    # the pipeline view's bias carries log M: below the replay view's by the mean -log kept mass
    bias = {v: s["views"]["by_view"][v]["bias"] for v in ("pipeline", "replay", "full")}
    assert bias["pipeline"] < bias["replay"] and math.isclose(
        bias["pipeline"], float(tok["lr_pipeline"].mean()), rel_tol=1e-9
    )


def test_view_option_drives_the_report(dense_model, tmp_path, capsys):
    flags, sampling = SETTINGS["top_p"]
    out = _compare(tmp_path, dense_model, "hf:dtype=bfloat16", flags, view="replay", capsys=capsys)
    tok = pd.read_parquet(out / "tokens.parquet")
    _check(tok, _recompute(out, dense_model, "hf:dtype=bfloat16", sampling), "replay")
    s = json.loads((out / "summary.json").read_text())
    assert s["view"] == "replay" and s["metrics"]["token_kl_max"] == pytest.approx(tok["kl_replay"].max())
    # the gate reads every view and every breakdown bucket
    from trm_diag.report.gate import ReportMetrics

    g = ReportMetrics(out)
    assert g.value("views.replay.kl_mean") == pytest.approx(s["views"]["by_view"]["replay"]["kl_mean"])
    assert g.value("views.pipeline.accept_trm_max") == s["views"]["by_view"]["pipeline"]["accept_trm_max"]
    assert g.value("breakdown.pos_0_15.kl.mean") == g.value("breakdown.pos_0_15.kl_mean") > 0  # both spellings
    low = int((np.exp(tok["lp_roll"]) < 0.01).sum())
    assert g.value("breakdown.prob_lt_1pct.n") == low or (low == 0 and "breakdown.prob_lt_1pct.n" not in g.names())
    assert "views.full.dapo_clip_frac" in g.names() and "breakdown.pos_0_15.kl_mean" in g.names()
    assert "Three views of the rollout" in (out / "report.html").read_text()
    # breakdowns of every view: breakdowns.parquet, summary.json and the gate agree; counts from the tokens
    brk = pd.read_parquet(out / "breakdowns.parquet")
    assert set(brk["view"]) == {"pipeline", "replay", "full"}
    replay = brk[(brk["view"] == "replay") & (brk["bucket"] == "prob_gt_90pct")].iloc[0]
    assert replay["n"] == int((np.exp(tok["lp_roll"]) >= 0.9).sum())
    sel = np.exp(tok["lp_roll"]) >= 0.9
    assert replay["kl_mean"] == pytest.approx(float(tok.loc[sel, "kl_replay"].mean()), rel=1e-12)
    assert g.value("breakdown.replay.prob_gt_90pct.kl_mean") == pytest.approx(replay["kl_mean"], rel=1e-12)
    assert g.value("breakdown.full.prob_gt_90pct.kl.mean") == pytest.approx(
        float(tok.loc[sel, "kl_full"].mean()), rel=1e-12
    )
    full = _compare(tmp_path, dense_model, "hf:dtype=bfloat16", flags, view="full", capsys=capsys)
    tf = pd.read_parquet(full / "tokens.parquet")
    # untruncated: the engine's processed log-prob plus log M is the raw one
    np.testing.assert_allclose(tf["lp_roll"], tok["lp_roll"] + np.log(tok["kept_mass"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(tf["kl"], tok["kl_full"], rtol=1e-12)


def test_without_truncation_one_line_and_no_view_columns(dense_model, tmp_path, capsys):
    out = tmp_path / "plain"
    code, stdout, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out",
                                 str(out), "--num-prompts", "3", "--max-new-tokens", "8"], capsys)  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert code == 0 and not s["views"]["truncated"] and "coincide" in stdout
    assert "kept_mass" not in pd.read_parquet(out / "tokens.parquet")
    brk = pd.read_parquet(out / "breakdowns.parquet")
    assert set(brk["view"]) == {"pipeline"} and set(brk["axis"]) == {"prob", "entropy", "position"}
    assert "Where the mismatch sits" in stdout


@pytest.mark.parametrize("fidelity", ["topk", "sampled"])
def test_tiers_without_full_rows_give_the_pipeline_view_only(fidelity, dense_model, tmp_path, capsys):
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--top-p", "0.9",
                            "--fidelity", fidelity, "--view", "replay", "--out", str(tmp_path / "x")], capsys)  # fmt: skip
    assert code == 2 and "--view replay needs the rollout's kept set" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "x").exists()


def test_views_with_the_vllm_rollout_backend(dense_model, tmp_path, capsys):
    flags, sampling = SETTINGS["top_k"]
    spec = f"vllm:dtype=bfloat16,{KV}"
    out = _compare(tmp_path, dense_model, spec, flags, capsys=capsys, prompts="4")
    tok = pd.read_parquet(out / "tokens.parquet")
    _check(tok, _recompute(out, dense_model, spec, sampling), "pipeline")


def test_vllm_raw_logprobs_give_the_pipeline_a_raw_rollout_side(dense_model, tmp_path, capsys):
    """vLLM's default raw_logprobs: the engine hands the trainer untempered, untruncated log-probs; the
    pipeline view compares those with the trainer's tempered softmax; replay and full are unchanged."""
    flags, sampling = SETTINGS["top_p"]
    spec = f"vllm:dtype=bfloat16,{KV},logprobs=raw"
    out = _compare(tmp_path, dense_model, spec, flags, capsys=capsys, prompts="3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["logprobs"] == "raw" and "raw log-probs" in summary["compared_distribution"]
    tok = pd.read_parquet(out / "tokens.parquet")
    raw = SamplingConfig(temperature=0.8, top_p=0.9, logprobs="raw")
    ref = _recompute(out, dense_model, spec, raw)
    _check(tok, ref, "pipeline", raw=True)
    # what the engine reported is the raw log-prob (decode vs prefill aside), not the processed one
    to_raw = np.abs(tok["lp_roll"] - ref["lp_raw"]).mean()
    assert to_raw < 1e-2 and to_raw < 0.1 * np.abs(tok["lp_roll"] - ref["lp_processed"]).mean()
    assert np.isfinite(tok["kl"]).all() and (tok["kl"] > tok["kl_full"]).mean() > 0.9


def test_vllm_logprobs_modes_without_log_probs_are_refused(dense_model, tmp_path, capsys):
    """Logit modes report no log-probs: one line before any engine loads."""
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout",
                            f"vllm:dtype=bfloat16,{KV},engine.logprobs_mode=raw_logits", "--top-p", "0.9",
                            "--out", str(tmp_path / "x"), "--num-prompts", "2"], capsys)  # fmt: skip
    assert code == 2 and "engine.logprobs_mode=raw_logits" in err and "logprobs=raw" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
