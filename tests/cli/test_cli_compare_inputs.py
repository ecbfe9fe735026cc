"""`trm-diag compare` with transformers on both sides, given what users type: a device torch does not know or
cannot reach, a seed that is no number, --out pointing into the model's own folder. Each is one line, exit 2,
before any weights load, and nothing in --out or the model folder changes."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_cli

SMALL = ["--num-prompts", "2", "--max-new-tokens", "4", "-q"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("device=gpu", "device=gpu is unknown"),
        ("device=cuda:99", "device=cuda:99, but torch sees"),
        ("seed=abc", "seed=abc is not an integer"),
    ],
)
def test_a_bad_hf_device_or_seed_is_refused_before_the_output_is_touched(key, needle, dense_model, tmp_path, capsys):
    """device=gpu used to escape as torch's RuntimeError (exit 1, a traceback) and seed=abc failed only at the first
    sampling step, after --overwrite had already cleared the old report in --out."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text('{"command": "compare"}')
    (out / "tokens.parquet").write_bytes(b"an earlier report's table")
    before = _snapshot(out)
    code, _, err = run_cli(
        ["compare", "--model", str(dense_model), "--rollout", f"hf:dtype=bfloat16,{key}", "--out", str(out),
         "--overwrite", *SMALL], capsys,
    )  # fmt: skip
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert _snapshot(out) == before  # the earlier report is intact, and no .trm-partial was left
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "tokens.parquet"]


@pytest.mark.parametrize("inside", ["", "reports/run1"])
def test_out_inside_the_model_folder_is_refused(inside, dense_model, tmp_path, capsys):
    """--out at the checkpoint folder wrote the report among the model's files (its summary.json even changed the
    model's fingerprint); at the folder or below it, either side's model, it is refused before anything loads."""
    model = tmp_path / "ckpt"
    shutil.copytree(dense_model, model)
    before = _snapshot(model)
    out = model / inside if inside else model
    for argv in (["--model", str(model)], ["--rollout", f"hf:model={model},dtype=bfloat16",
                                           "--train", f"hf:model={dense_model},dtype=float32"]):  # fmt: skip
        code, _, err = run_cli(["compare", *argv, "--out", str(out), *SMALL], capsys)
        assert code == 2, err
        assert "lies in the model folder" in err and "Traceback" not in err
        assert _snapshot(model) == before
        assert sorted(p.name for p in model.iterdir()) == sorted(str(p) for p in before)
