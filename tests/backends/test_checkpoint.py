"""Checkpoint folder checks (trm_diag/backends/checkpoint.py): broken or partial downloads are named before
an engine loads them; sound checkpoints, sharded ones included, pass."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import run_cli
from trm_diag.backends.checkpoint import check_checkpoint
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


def _rewrite(d, change):
    """Rewrite model.safetensors after change(tensors) (a dict it may edit)."""
    from safetensors.torch import load_file, save_file

    w = load_file(d / "model.safetensors")
    change(w)
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


def _config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _overflow_header(d):
    """A header whose shape does not fit its byte range (2^40 x 2^40 elements in a few bytes)."""
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)  # room for the longer shape
    header["model.norm.weight"]["shape"] = [2**40, 2**40]
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    body = body.ljust(n)
    (d / "model.safetensors").write_bytes(raw[:8] + body + raw[8 + n :])


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda d: _rewrite(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")), "layer 1 lacks 1 tensor(s)"),
        (lambda d: _rewrite(d, lambda w: w.pop("model.norm.weight")), "lacks the tensor(s) model.norm.weight"),
        (
            lambda d: _config(
                d, num_hidden_layers=json.loads((d / "config.json").read_text())["num_hidden_layers"] + 1
            ),
            "no tensors for layer",
        ),  # fmt: skip
        (lambda d: _config(d, num_hidden_layers=1), "beyond the 1 layers"),
        (_overflow_header, "has shape [1099511627776, 1099511627776]"),
    ],
)
def test_missing_or_unexpected_tensors_are_refused(dense_model, tmp_path, damage, needle):
    """An engine would fill a missing tensor at random (transformers) or leave it uninitialised (vLLM)."""
    d = _copy(dense_model, tmp_path / "ck")
    damage(d)
    with pytest.raises(ModelError) as e:
        check_checkpoint(d, trust_remote_code=False, allow_pickle=False)
    assert needle in e.value.one_line(), e.value.one_line()


def test_a_missing_tensor_stops_compare_on_both_backends(dense_model, tmp_path, capsys):
    d = _copy(dense_model, tmp_path / "ck")
    _rewrite(d, lambda w: w.pop("model.layers.0.self_attn.q_proj.weight"))
    for rollout in ("hf", "vllm"):
        code, _, err = run_cli(
            ["compare", "--model", str(d), "--rollout", rollout, "--out", str(tmp_path / "o")], capsys
        )
        assert code == 2 and "layer 0 lacks" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()


def test_transformers_loading_report_is_checked_too():
    from trm_diag.backends.hf import _check_loading_info

    _check_loading_info("ck", {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()})
    with pytest.raises(ModelError, match="lacks tensor.*model.norm.weight.*at random"):
        _check_loading_info("ck", {"missing_keys": {"model.norm.weight"}})


def test_mixtral_passes(mixtral_model):
    check_checkpoint(mixtral_model, trust_remote_code=False, allow_pickle=False)


def test_tokenizer_code_and_symlink_loops_are_named(dense_model, tmp_path, capsys):
    d = _copy(dense_model, tmp_path / "ck")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["tokenization_my.MyTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ModelError, match="own tokenizer code.*--trust-remote-code"):
        check_checkpoint(d, trust_remote_code=False, allow_pickle=False)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run_cli(["compare", "--model", str(loop), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "symlink loop" in err
    code, _, err = run_cli(["compare", "--prompts", str(loop), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "symlink loop" in err
