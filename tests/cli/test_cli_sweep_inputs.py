"""`trm-diag sweep` with transformers on every side, as users run it: presets in either order on an hf rollout
(the engine and trainer presets then plan the same specs), a folder of their own named like an arm, a file of
their own left in an earlier sweep's arm folder, --out inside the model folder."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli
from trm_diag.backends import parse_spec
from trm_diag.run.arms import plan_arms

MODEL = "/models/m"
SMALL = ["--num-prompts", "2", "--max-new-tokens", "4", "--reference", "none", "-q"]


def _names(presets, rollout="hf:dtype=bfloat16", train="hf:dtype=float32"):
    roll, tr = parse_spec(rollout).with_model(MODEL), parse_spec(train).with_model(MODEL)
    return {a.name: a.spec.describe() for a in plan_arms([], presets, roll, tr, False, MODEL)}


def test_each_preset_keeps_its_arms_when_another_preset_planned_the_same_spec():
    """On an hf rollout, engine-dtype-float32 is the spec trainer-baseline is: the arm planned second was dropped,
    so `--arms trainer,engine` said 'no arm is closer to the reference than the rollout side' (its engine group had
    only batch-1 left) and `--arms engine,trainer` lost trainer-baseline, the arm the gap is measured to."""
    for order in (["trainer", "engine"], ["engine", "trainer"]):
        plan = _names(order)
        assert plan["engine-dtype-float32"] == plan["trainer-baseline"]
        assert plan["engine-baseline"] == plan["trainer-dtype-bfloat16"]
        assert "engine-batch-1" in plan and "trainer-batch-1" in plan
    assert set(_names(["trainer", "engine"])) == set(_names(["engine", "trainer"]))
    # within one preset, and against an explicit --arm, a repeated spec is still planned once
    assert list(_names(["trainer", "trainer"])) == list(_names(["trainer"]))
    roll, tr = parse_spec("hf:dtype=bfloat16").with_model(MODEL), parse_spec("hf:dtype=float32").with_model(MODEL)
    explicit = [a.name for a in plan_arms(["hf:dtype=float32"], ["trainer"], roll, tr, False, MODEL)]
    assert "hf-dtype-float32" in explicit and "trainer-baseline" not in explicit


def _sweep(out, model, capsys, *argv):
    code, _, err = run_cli(["sweep", "--model", str(model), "--rollout", "hf:dtype=bfloat16", "--arm",
                            "hf:dtype=float32", "--out", str(out), *SMALL, *argv], capsys)  # fmt: skip
    assert "Traceback" not in err
    return code, err


def test_a_users_folder_named_like_an_arm_is_never_replaced(dense_model, tmp_path, capsys):
    """An arm's folder was removed whole before the arm wrote its report: a folder of the user's that happened to
    bear the arm's name lost its files, and so did a file left in an earlier sweep's arm folder under --overwrite."""
    out = tmp_path / "sweep"
    mine = out / "hf-dtype-float32"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    code, err = _sweep(out, dense_model, capsys)
    assert code == 2 and "is not an arm folder of a sweep" in err
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.rglob("*")) == [
        "hf-dtype-float32", "notes.txt"]  # fmt: skip

    (mine / "notes.txt").unlink()
    mine.rmdir()
    assert _sweep(out, dense_model, capsys)[0] == 0
    (mine / "notes.txt").write_text("mine")  # a file of the user's inside the arm folder of a finished sweep
    code, err = _sweep(out, dense_model, capsys, "--overwrite")
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "mine"
    assert (mine / "summary.json").is_file() and (out / "summary.json").is_file()


def test_out_inside_the_model_folder_is_refused(dense_model, tmp_path, capsys):
    import shutil

    model = tmp_path / "ckpt"
    shutil.copytree(dense_model, model)
    names = sorted(p.name for p in model.iterdir())
    code, err = _sweep(model / "sweep", model, capsys)
    assert code == 2 and "lies in the model folder" in err
    assert sorted(p.name for p in model.iterdir()) == names


@pytest.mark.parametrize("key", ["device=gpu", "seed=x"])
def test_a_bad_hf_device_or_seed_on_any_side_is_refused_before_sampling(key, dense_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = run_cli(["sweep", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--arm",
                            f"hf:dtype=float32,{key}", "--out", str(out), *SMALL], capsys)  # fmt: skip
    assert code == 2 and key in err and "Traceback" not in err
    assert not out.exists()
