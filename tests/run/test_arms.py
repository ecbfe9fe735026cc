"""The sweep's arm plan: presets as data, readable names, duplicates dropped, skips with reasons."""

from __future__ import annotations

import pytest

from trm_diag.backends import parse_spec
from trm_diag.errors import UsageError
from trm_diag.run.arms import ARM_PRESETS, plan_arms, slug

MODEL = "/models/m"


def _plan(arms=(), presets=(), rollout="vllm:dtype=bfloat16", train="hf:dtype=float32", cuda=False):
    return plan_arms(
        list(arms), list(presets), parse_spec(rollout).with_model(MODEL), parse_spec(train).with_model(MODEL),
        cuda, MODEL,
    )  # fmt: skip


def test_trainer_preset_changes_one_knob_of_the_training_spec():
    plan = {a.name: a for a in _plan(presets=["trainer"])}
    assert "trainer-baseline" in plan and "trainer-dtype-float32" not in plan  # the base already is float32
    assert plan["trainer-dtype-bfloat16"].spec.options == {"model": MODEL, "dtype": "bfloat16"}
    assert plan["trainer-lm-head-fp32"].spec.options["lm_head_dtype"] == "float32"
    assert plan["trainer-batch-1"].spec.options["batch_size"] == "1"
    assert all(a.spec.name == "hf" for a in plan.values())


def test_engine_preset_on_cpu_lists_what_cannot_run_with_the_reason():
    plan = {a.name: a for a in _plan(presets=["engine"])}
    assert plan["engine-baseline"].spec.describe() == parse_spec("vllm:dtype=bfloat16").with_model(MODEL).describe()
    assert "CUDA" in plan["engine-batch-invariant"].skip
    assert "prefix cache" in plan["engine-prefix-caching-on"].skip
    assert "eagerly" in plan["engine-eager"].skip
    assert plan["engine-kv-cache-fp8"].skip is None and plan["engine-dtype-float32"].skip is None
    assert list(plan)[-1] == "engine-batch-invariant"  # a process-wide mode runs last
    on_gpu = {a.name: a for a in _plan(presets=["engine"], cuda=True)}
    assert on_gpu["engine-batch-invariant"].skip is None and on_gpu["engine-eager"].skip is None


def test_engine_preset_on_an_hf_rollout_keeps_only_hf_knobs():
    names = {a.name for a in _plan(presets=["engine"], rollout="hf:dtype=bfloat16")}
    vllm_only = {f"engine-{k.slug}" for k in ARM_PRESETS["engine"] if k.backends == ("vllm",)}
    assert names and not names & vllm_only


def test_explicit_arms_are_named_from_their_spec_and_duplicates_dropped():
    plan = _plan(arms=["hf:dtype=float32", "hf:attn=eager,dtype=fp16"], presets=["trainer"])
    names = [a.name for a in plan]
    assert names[:2] == ["hf-dtype-float32", "hf-attn-eager-dtype-float16"]
    assert "trainer-baseline" not in names  # the same spec as hf:dtype=float32
    assert slug("vllm:dtype=bfloat16,engine.enable_chunked_prefill=false") == (
        "vllm-dtype-bfloat16-engine.enable-chunked-prefill-false"
    )


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"presets": ["nope"]}, "not a preset"), ({}, "no arms"), ({"arms": ["hf:colour=red"]}, "unknown key")],
)
def test_bad_plans_are_one_line_errors(kw, needle):
    with pytest.raises(UsageError, match=needle):
        _plan(**kw)


def test_batch_preset_compares_the_training_spec_with_itself_at_batch_size_1():
    plan = {a.name: a for a in _plan(presets=["batch"], train="hf:dtype=bfloat16,batch_size=8,padding_side=left")}
    assert list(plan) == ["batch-b1", "batch-b8", "batch-b32", "batch-padding-left", "batch-padding-right",
                          "batch-regrouped"]  # fmt: skip
    b1 = parse_spec("hf:dtype=bfloat16,batch_size=1").with_model(MODEL).describe()
    assert {a.against.describe() for a in plan.values()} == {b1}  # the base's own batch keys are dropped
    opts = {name: {k: v for k, v in a.spec.options.items() if k != "model"} for name, a in plan.items()}
    assert opts["batch-b8"] == {"dtype": "bfloat16", "batch_size": "8"}  # kept although the base has batch 8
    assert opts["batch-b32"] == {"dtype": "bfloat16", "batch_size": "32"}
    assert opts["batch-padding-left"] == {"dtype": "bfloat16", "batch_size": "8", "padding_side": "left"}
    assert opts["batch-padding-right"] == {"dtype": "bfloat16", "batch_size": "8", "padding_side": "right"}
    assert opts["batch-regrouped"] == {"dtype": "bfloat16", "batch_size": "8", "regroup_seed": "1"}
    assert all(a.skip is None for a in plan.values())


def test_batch_preset_beside_the_trainer_preset_keeps_both_batch_1_arms():
    """trainer-batch-1 (against the rollout side) and batch-b1 (against itself) share a spec, not a comparison."""
    plan = {a.name: a for a in _plan(presets=["trainer", "batch"], train="hf:dtype=float32")}
    assert plan["trainer-batch-1"].against is None and plan["batch-b1"].against is not None
    assert plan["trainer-batch-1"].spec.describe() == plan["batch-b1"].spec.describe()


def test_batch_preset_on_a_vllm_trainer_has_no_arms():
    with pytest.raises(UsageError) as e:
        _plan(presets=["batch"], train="vllm:dtype=bfloat16")
    assert "batch: an hf --train" in e.value.fix
