"""Batch shape end to end on the bundled model: `sweep --arms batch` (the trainer against itself at batch size 1) and
`compare` of two specs that differ only in batch size (one model, sampled once, both sides scoring passes)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from tests.helpers import run_cli

FAST = ["--num-prompts", "3", "--max-new-tokens", "6"]
ARMS = ["batch-b1", "batch-b8", "batch-b32", "batch-padding-left", "batch-padding-right", "batch-regrouped"]


def test_sweep_batch_preset_compares_the_trainer_with_itself(tmp_path, dense_model, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        ["sweep", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--train", "hf:dtype=bfloat16",
         "--arms", "batch", "--reference", "none", "--out", str(out), *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(out / "sweep.parquet")
    batch = table[table["arm"].str.startswith("batch-")]
    assert list(batch["arm"]) == ARMS and (batch["status"] == "done").all()
    assert (batch["against"] == "hf:dtype=bfloat16,batch_size=1").all()
    for name in ARMS:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["lp_roll_source"].startswith("the rollout spec's own scoring pass")
        assert summary["rollout"]["spec"].endswith("dtype=bfloat16,batch_size=1")
        tokens = pd.read_parquet(out / name / "tokens.parquet")
        assert (tokens["lp_roll"] == tokens["lp_roll_prefill"]).all()  # no decode step on either side
        m = summary["metrics"]
        assert 0 <= m["frac_ratio_outside_10pct"] <= 1 and "ppo_clip_flip_pos" in m
        row = batch[batch["arm"] == name].iloc[0]
        assert row["outside_band"] == m["frac_ratio_outside_10pct"]
        assert row["abs_log_ratio_max"] == m["abs_log_ratio_max"]
    b1 = pd.read_parquet(out / "batch-b1" / "tokens.parquet")
    assert (b1["log_ratio"] == 0).all()  # batch 1 against itself: bit for bit
    assert "Batch shape: the trainer against itself at batch size 1" in stdout
    assert "the trainer against itself (hf:dtype=bfloat16,batch_size=1)" in stdout


def test_compare_of_two_batch_sizes_shares_the_weights_and_scores_both_sides(tmp_path, dense_model, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(
        ["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16,batch_size=1",
         "--train", "hf:dtype=bfloat16,batch_size=8", "--out", str(out), *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "the trainer against itself: lp_roll is the rollout spec's scoring pass" in " ".join(stdout.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_weights"] is True and summary["same_backend_instance"] is False
    assert summary["lp_roll_source"].startswith("the rollout spec's own scoring pass")
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert (tokens["lp_roll"] == tokens["lp_roll_prefill"]).all()
    lr = tokens["lp_train"].to_numpy() - tokens["lp_roll"].to_numpy()
    assert np.array_equal(tokens["log_ratio"].to_numpy(), lr)
    assert summary["metrics"]["frac_ratio_outside_10pct"] == float(np.mean(np.abs(np.exp(lr) - 1) > 0.1))
