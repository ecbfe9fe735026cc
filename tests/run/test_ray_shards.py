"""compare --ray N on a real local Ray instance (CPU): the merged report equals --shard I/N + merge, an
interrupted shard is resumed alone, and a missing cluster is one line."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.helpers import run_cli

BASE = ["--rollout", "hf:dtype=float32,batch_size=1", "--train", "hf:dtype=float32,batch_size=1", "--num-prompts",
        "6", "--max-new-tokens", "16", "--temperature", "0.8", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _same(a, b):
    for table in ("tokens", "sequences", "bounds"):
        x, y = pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet")
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["metrics"].keys() == sb["metrics"].keys()
    for k, v in sa["metrics"].items():
        assert v == sb["metrics"][k] or (v != v and sb["metrics"][k] != sb["metrics"][k]), k


def test_ray_shards_equal_shard_and_merge_and_resume(local_ray, dense_model, tmp_path, capsys):
    model = ["compare", "--model", str(dense_model), *BASE]
    code, _, err = run_cli([*model, "--ray", "2", "--out", str(tmp_path / "ray")], capsys)
    assert code == 0, err
    shards = tmp_path / "ray.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task with one CPU runs: float32 sums then add up in the same order
    try:
        for i in range(2):
            assert run_cli([*model, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    code, _, err = run_cli(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    _same(tmp_path / "ray", tmp_path / "m")
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert [m["shard"] for m in summary["merged_from"]] == ["0/2", "1/2"]

    # an interrupted run: shard 1 lost; --resume runs it alone and the report is the same
    import shutil

    kept = (shards / "shard-0-of-2" / "summary.json").stat().st_mtime_ns
    shutil.rmtree(shards / "shard-1-of-2")
    code, _, err = run_cli([*model, "--ray", "2", "--resume", "--out", str(tmp_path / "ray")], capsys)
    assert code == 0, err
    assert (shards / "shard-0-of-2" / "summary.json").stat().st_mtime_ns == kept
    _same(tmp_path / "ray", tmp_path / "m")


def test_ray_misuse_is_one_line(dense_model, tmp_path, capsys):
    model = ["compare", "--model", str(dense_model), *BASE]
    code, _, err = run_cli([*model, "--ray", "1", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--ray 1 needs at least 2 shards" in err and "Traceback" not in err
    code, _, err = run_cli([*model, "--ray", "2", "--shard", "0/2", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--ray and --shard" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # inputs are checked once, before any task starts (no cluster needed to say so)
    code, _, err = run_cli(["compare", "--model", str(tmp_path / "nowhere"), *BASE, "--ray", "2",
                            "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*model, "--ray", "50", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "holds no prompts" in err
    code, _, err = run_cli([*model, "--ray", "2", "--save-rollouts", str(tmp_path / "r.jsonl"),
                            "--out", str(tmp_path / "e")], capsys)  # fmt: skip
    assert code == 2 and "--save-rollouts with --ray" in err
    assert not any((tmp_path / x).exists() for x in ("c", "d", "e", "c.shards", "d.shards"))
