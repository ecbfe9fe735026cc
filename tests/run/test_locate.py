"""`trm-diag locate` on real engines: a checkpoint changed in one layer is found there, on both backends."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli
from trm_diag.run.locate import LocateConfig, run_locate

CHANGED_LAYER = 2  # of the sample's 4 decoder layers


@pytest.fixture(scope="module")
def one_layer_changed(tmp_path_factory, dense_model):
    """The sample model with layer 2's MLP output projection scaled by 1.05: nothing else differs."""
    out = tmp_path_factory.mktemp("changed") / "tiny-llama-l2"
    shutil.copytree(dense_model, out)
    weights = load_file(out / "model.safetensors")
    name = f"model.layers.{CHANGED_LAYER}.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.05
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _report(tmp_path, model, rollout, train, capsys, name="r"):
    out = tmp_path / name
    argv = ["compare", "--model", str(model), "--rollout", rollout, "--train", train, "--num-prompts", "3",
            "--max-new-tokens", "16", "--out", str(out), "-q"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    return out


def test_hf_against_hf_names_the_changed_layer(tmp_path, dense_model, one_layer_changed, capsys):
    report = _report(tmp_path, dense_model, f"hf:dtype=float32,model={one_layer_changed}", "hf:dtype=float32", capsys)
    summary = run_locate(LocateConfig(str(report), top=4)).summary
    assert len(summary["tokens"]) == 4
    for t in summary["tokens"]:
        assert t["enters"] == CHANGED_LAYER and t["component"] == "MLP", t["text"]
        assert t["text"].startswith(f"enters at layer {CHANGED_LAYER}, MLP")
    df = pd.read_parquet(report / "locate.parquet")
    before = df[(df["component"] == "layer") & (df["layer"] < CHANGED_LAYER)]["rel_err"]
    assert (before == 0).all()  # the same fp32 computation up to the changed layer
    code, text, _ = run_cli(["show", str(report)], capsys)  # the report itself is untouched and still reads
    assert code == 0


def test_identical_fp32_sides_stay_at_the_float32_floor(tmp_path, dense_model, capsys):
    report = _report(tmp_path, dense_model, "hf:dtype=float32,batch_size=1", "hf:dtype=float32", capsys)
    summary = run_locate(LocateConfig(str(report), top=2)).summary
    df = pd.read_parquet(report / "locate.parquet")
    assert df["rel_err"].max() < 1e-6
    assert all(t["enters"] is None for t in summary["tokens"])


def test_vllm_against_hf_finds_the_layer_and_agrees_in_fp32(tmp_path, dense_model, one_layer_changed, capsys):
    same = _report(tmp_path, dense_model, "vllm:dtype=float32", "hf:dtype=float32", capsys, "same")
    run_locate(LocateConfig(str(same), seq=0))
    df = pd.read_parquet(same / "locate.parquet")
    assert df["rel_err"].max() < 1e-4  # vLLM's and transformers' kernels on one fp32 model
    assert df[df["component"] == "layer"]["rel_err"].median() < 2e-5
    changed = _report(tmp_path, dense_model, f"vllm:dtype=float32,model={one_layer_changed}", "hf:dtype=float32",
                      capsys, "changed")  # fmt: skip
    summary = run_locate(LocateConfig(str(changed), top=3)).summary
    assert all(t["enters"] == CHANGED_LAYER and t["component"] == "MLP" for t in summary["tokens"]), summary["tokens"]


def test_bad_input_is_one_line(tmp_path, dense_model, capsys):
    report = _report(tmp_path, dense_model, "hf:dtype=bfloat16", "hf:dtype=float32", capsys)
    for argv, needle in (
        (["locate", str(report), "--seq", "99"], "no such sequence"),
        (["locate", str(report), "--seq", "0", "--pos", "999"], "response tokens"),
        (["locate", str(report), "--pos", "3"], "--pos needs --seq"),
        (["locate", str(tmp_path / "nothing")], "does not exist"),
    ):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err
    moved = tmp_path / "moved-model"
    shutil.copytree(dense_model, moved)
    other = _report(tmp_path, dense_model, f"hf:dtype=bfloat16,model={moved}", "hf:dtype=float32", capsys, "moved")
    shutil.rmtree(moved)
    code, _, err = run_cli(["locate", str(other)], capsys)
    assert code == 2 and "no longer at its path" in err
    rollouts = tmp_path / "r.jsonl"
    code, _, _ = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "2",
                          "--max-new-tokens", "8", "--out", str(tmp_path / "x"), "--save-rollouts", str(rollouts), "-q"],
                         capsys)  # fmt: skip
    code, _, _ = run_cli(
        ["score", str(rollouts), "--model", str(dense_model), "--out", str(tmp_path / "sc"), "-q"], capsys
    )
    assert code == 0
    code, _, err = run_cli(["locate", str(tmp_path / "sc")], capsys)
    assert code == 2 and "no rollout backend to re-run" in err


@pytest.mark.parametrize("fidelity", ["topk", "sampled"])
def test_compare_locate_on_topk_and_sampled_reports_ranks_by_the_tiers_column(tmp_path, dense_model, fidelity, capsys):
    """The top-K and sampled tiers have no exact kl: locate ranks their tokens by kl_hi and k2 (tiers.Tier.locate)."""
    import numpy as np

    out = tmp_path / fidelity
    argv = ["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--train", "hf:dtype=float32",
            "--num-prompts", "3", "--max-new-tokens", "12", "--fidelity", fidelity, "--topk", "5", "--locate", "3",
            "--out", str(out), "-q"]  # fmt: skip
    code, text, err = run_cli(argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    located = pd.read_json(out / "locate.json", typ="series")
    tok = pd.read_parquet(out / "tokens.parquet")
    # the expected worst tokens, computed here from their definitions: kl_hi as stored (the certified upper end),
    # k2 = (log q(y) - log p(y))^2 / 2 from the two sampled-token log-probs
    score = tok["kl_hi"].to_numpy() if fidelity == "topk" else 0.5 * (tok["lp_train"] - tok["lp_roll"]).to_numpy() ** 2
    order = np.argsort(-score, kind="stable")[:3]
    want = sorted(zip(tok["seq_id"].to_numpy()[order].tolist(), tok["pos"].to_numpy()[order].tolist()))
    assert sorted((t["seq_id"], t["pos"]) for t in located["tokens"]) == want
    assert located["ranked_by"] == ("kl_hi" if fidelity == "topk" else "k2") and f"by {located['ranked_by']}" in text
    code, _, err = run_cli(["locate", str(out), "--top", "2", "--json"], capsys)  # and locate on its own
    assert code == 0, err
