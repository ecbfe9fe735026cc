"""`locate --bitwise`: the first module whose output differs by any bit, on a checkpoint pair that differs in
one tensor of one layer (built here from the bundled model), on an identical pair, and NOT COMPARABLE when a
checkpoint changed after its report (transformers only: no vLLM engine starts here)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import run_cli
from trm_diag.math.locate_math import bits_differ, first_bit_difference


class _Cap:
    def readouterr(self):
        return type("C", (), {"out": "", "err": ""})()


def _changed(dense_model, path, key):
    from safetensors.torch import load_file, save_file

    shutil.copytree(dense_model, path)
    sd = load_file(dense_model / "model.safetensors")
    sd[key] = sd[key].clone()
    sd[key][0, 0] += 0.01
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, dense_model):
    """A compare report of the bundled model against a copy whose layer-2 attention (q_proj) moved one weight."""
    root = tmp_path_factory.mktemp("locate-bits")
    other = _changed(dense_model, root / "changed", "model.layers.2.self_attn.q_proj.weight")
    out = root / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRM_DIAG_KERNEL", "native")
        code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=float32", "--train",
                                f"hf:dtype=float32,model={other}", "--num-prompts", "2", "--max-new-tokens", "6",
                                "--out", str(out), "-q"], _Cap())  # fmt: skip
    assert code == 0, err
    return out, other


def test_bitwise_names_the_first_module_that_differs(pair, capsys):
    out, _ = pair
    code, text, err = run_cli(["locate", str(out), "--seq", "0", "--pos", "2", "--bitwise", "-q"], capsys)
    assert code == 0, err
    tok = json.loads((out / "locate.json").read_text())["tokens"][0]
    assert tok["bitwise"]["first_differing"] == {"layer": 2, "component": "attn"}
    assert "first differs by a bit at layer 2, attention" in text


def test_an_identical_pair_is_bitwise_equal_through_every_module(pair, capsys):
    out, _ = pair
    summary = json.loads((out / "summary.json").read_text())
    same = out.parent / "same"
    shutil.copytree(out, same)
    summary["train"]["spec"] = summary["rollout"]["spec"]  # both sides: the bundled model, one spec
    summary["train"]["weights_fingerprint"] = summary["rollout"]["weights_fingerprint"]
    (same / "summary.json").write_text(json.dumps(summary))
    code, text, err = run_cli(["locate", str(same), "--seq", "1", "--pos", "0", "--bitwise", "-q"], capsys)
    assert code == 0, err
    tok = json.loads((same / "locate.json").read_text())["tokens"][0]
    assert tok["bitwise"]["first_differing"] is None and "BITWISE EQUAL" in text


def test_a_checkpoint_changed_since_the_report_is_not_comparable(pair, dense_model, tmp_path, capsys):
    out, other = pair
    moved = tmp_path / "report"
    shutil.copytree(out, moved)
    (moved / "locate.json").unlink(missing_ok=True)  # an earlier test's
    shutil.rmtree(other)
    _changed(dense_model, other, "model.layers.0.mlp.up_proj.weight")  # same path, other weights
    code, _, err = run_cli(["locate", str(moved), "--seq", "0", "--bitwise", "-q"], capsys)
    assert code == 2 and "NOT COMPARABLE" in err and "changed since the report" in err
    assert not (moved / "locate.json").exists()


def test_first_bit_difference_against_a_byte_reference():
    rng = np.random.default_rng(5)
    steps = []
    for layer in range(4):
        for comp in ("attn", "mlp", "layer"):
            a = rng.normal(size=16)
            steps.append((layer, comp, a, a.copy()))
    b = steps[7][3]
    b[3] = np.nextafter(b[3], np.inf)  # one ulp at layer 2, MLP
    steps[9] = (3, "attn", steps[9][2], -steps[9][2])  # later, larger
    ref = next((la, c) for la, c, x, y in steps if x.tobytes() != y.tobytes())
    assert first_bit_difference(steps) == ref == (2, "mlp")
    assert not bits_differ(np.array([np.nan]), np.array([np.nan])) and bits_differ(np.array([0.0]), np.array([-0.0]))
    assert first_bit_difference([(0, "attn", np.ones(3), np.ones(3))]) is None
