"""`trm-diag merge` on inputs a fan-out leaves behind: a moved model, a partial merge merged again."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import main_exit, run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dense_model):
    d = tmp_path_factory.mktemp("merge-inputs")
    out = []
    for i in range(3):
        assert main_exit(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts",
                          "3", "--max-new-tokens", "4", "--shard", f"{i}/3", "--out", str(d / f"s{i}"), "-q"]) == 0  # fmt: skip
        out.append(d / f"s{i}")
    return out


def test_a_model_merge_cannot_load_is_an_input_error(shards, tmp_path, capsys):
    """The shards record the model path compare was given; where merge cannot load its tokenizer (moved,
    or a relative path read from another folder) that is a bad input (exit 2) naming the path, not an
    I/O failure of the environment (exit 3)."""
    moved = []
    for s in shards:
        m = tmp_path / s.name
        shutil.copytree(s, m)
        summary = json.loads((m / "summary.json").read_text())
        summary["train"]["model"] = "/nonexistent-trm-diag/tiny-llama"
        (m / "summary.json").write_text(json.dumps(summary))
        moved.append(m)
    code, _, err = run_cli(["merge", *map(str, moved), "--out", str(tmp_path / "m"), "-q"], capsys)
    assert code == 2, err
    assert "cannot load the tokenizer of the shards' model '/nonexistent-trm-diag/tiny-llama'" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_a_partial_merge_merged_with_the_missing_shard_is_named_as_a_merge(shards, tmp_path, capsys):
    """A partial merge has no --shard of its own: the refusal says it is a merge and of which reports
    (it was 'run without --shard', which it was not)."""
    part = tmp_path / "part"
    code, _, err = run_cli(["merge", str(shards[0]), str(shards[1]), "--partial", "--out", str(part), "-q"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", str(part), str(shards[2]), "--out", str(tmp_path / "all"), "-q"], capsys)
    assert code == 2 and f"'{part}' is a merged report (of {shards[0]}, {shards[1]})" in err
    assert "run without --shard" not in err and not (tmp_path / "all").exists()
    code, _, err = run_cli(["merge", *map(str, shards), "--out", str(tmp_path / "all"), "-q"], capsys)
    assert code == 0, err
