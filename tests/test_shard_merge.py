"""--shard I/N and `trm-diag merge`: merging the shards equals one run over the same prompts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.helpers import run_cli


def compare(model, out, capsys, *extra):
    # batch_size=1 on both sides: batch-invariant numerics, so a shard computes exactly what the full run does
    code, _, err = run_cli(["compare", "--model", str(model), "--rollout", "hf:dtype=float32,batch_size=1",
                            "--train", "hf:dtype=float32,batch_size=1", "--num-prompts", "10", "--samples", "2",
                            "--max-new-tokens", "24", "--out", str(out), "-q", *extra], capsys)  # fmt: skip
    assert code == 0, err
    return out


@pytest.mark.parametrize("which", ["dense_model", "moe_model"])
def test_merge_of_shards_equals_a_single_run(request, which, tmp_path, capsys):
    """Equal to the last bit for batch-invariant engines; with batching, the same rollouts differ only
    by the engines' batch non-invariance (itself a mismatch the tool measures)."""
    model = request.getfixturevalue(which)
    full = compare(model, tmp_path / "full", capsys)
    shards = [compare(model, tmp_path / f"s{i}", capsys, "--shard", f"{i}/3") for i in range(3)]
    code, _, err = run_cli(["merge", *map(str, shards), "--out", str(tmp_path / "merged"), "--json"], capsys)
    assert code == 0, err
    merged = tmp_path / "merged"
    for table in ("tokens", "sequences", "bounds") + (("routing",) if which == "moe_model" else ()):
        a, b = pd.read_parquet(full / f"{table}.parquet"), pd.read_parquet(merged / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((merged / "summary.json").read_text())
    for key in ("metrics", "bound_inputs", "bounds_at_observed_T", "masking"):
        assert sa[key] == sb[key], key
    assert [m["shard"] for m in sb["merged_from"]] == ["0/3", "1/3", "2/3"]


def test_merge_refuses_overlapping_or_mismatched_shards(dense_model, tmp_path, capsys):
    s0 = compare(dense_model, tmp_path / "s0", capsys, "--shard", "0/2")
    other = compare(dense_model, tmp_path / "t", capsys, "--shard", "1/2", "--temperature", "0.7")
    code, _, err = run_cli(["merge", str(s0), str(s0), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "appears in two shards" in err
    code, _, err = run_cli(["merge", str(s0), str(other), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "differs" in err and "sampling" in err
    code, _, err = run_cli(["merge", str(s0), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "at least two reports" in err


def test_merge_refuses_damaged_or_incomplete_shards(dense_model, tmp_path, capsys):
    import shutil

    s0 = compare(dense_model, tmp_path / "s0", capsys, "--shard", "0/2")
    s1 = compare(dense_model, tmp_path / "s1", capsys, "--shard", "1/2")
    damaged, missing = tmp_path / "damaged", tmp_path / "missing"
    shutil.copytree(s1, damaged)
    (damaged / "tokens.parquet").write_text("not parquet")
    shutil.copytree(s1, missing)
    (missing / "sequences.parquet").unlink()
    for shard, needle in ((damaged, "cannot read report file"), (missing, "is missing")):
        code, _, err = run_cli(["merge", str(s0), str(shard), "--out", str(tmp_path / "m")], capsys)
        assert code == 2 and needle in err and "Traceback" not in err
        assert not (tmp_path / "m" / "summary.json").exists()


@pytest.mark.parametrize("bad", ["2/2", "x/2", "1", "-1/3"])
def test_bad_shard_spec(bad, tmp_path, capsys):
    code, _, err = run_cli(["compare", "--shard", bad, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--shard" in err
