"""Checkpoint folder checks (trm_diag/checkpoint.py): broken or partial downloads are named before
an engine loads them; sound checkpoints, sharded ones included, pass."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import run_cli
from trm_diag.checkpoint import check_checkpoint
from trm_diag.errors import ModelError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _cut(f, keep):
    """Keep the first `keep` bytes (negative: drop that many from the end), as a cut-off download does."""
    f.write_bytes(f.read_bytes()[:keep])


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda d: _cut(d / "model.safetensors", -100), "is truncated"),
        (lambda d: _cut(d / "model.safetensors", 1000), "not a complete safetensors file"),
        (lambda d: _cut(d / "model.safetensors", 5), "bad header"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}!!!!!!"), "unreadable"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"[]"), "unreadable"),
        (lambda d: (d / "config.json").write_text("[]"), "is not a JSON object"),
        (lambda d: (d / "config.json").write_bytes(b"\xff\xfe"), "cannot read"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
            ),
            "lacks 1 weight shard(s)",
        ),
        (lambda d: (d / "model.safetensors.index.json").write_text("{"), "cannot read"),
    ],
)
def test_damaged_checkpoints_are_named(dense_model, tmp_path, damage, needle):
    d = _copy(dense_model, tmp_path / "ck")
    damage(d)
    with pytest.raises(ModelError) as e:
        check_checkpoint(d, trust_remote_code=False, allow_pickle=False)
    assert needle in e.value.one_line() and "\n" not in e.value.one_line()


def test_sound_checkpoints_pass(dense_model, moe_model, tmp_path):
    """The bundled models and a sharded save (index + several files) pass the checks."""
    from transformers import AutoModelForCausalLM

    for m in (dense_model, moe_model):
        assert check_checkpoint(m, trust_remote_code=False, allow_pickle=False)["model_type"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(dense_model).save_pretrained(sharded, max_shard_size="1MB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    check_checkpoint(sharded, trust_remote_code=False, allow_pickle=False)


def test_truncated_weights_stop_compare_before_any_engine(dense_model, tmp_path, capsys):
    d = _copy(dense_model, tmp_path / "ck")
    _cut(d / "model.safetensors", -4096)
    code, _, err = run_cli(["compare", "--model", str(d), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is truncated" in err and "re-download" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before the output folder is made
