"""The arms of a sweep: backend specs with one setting changed, presets as data, readable names.

An arm is a backend spec that re-scores the sweep's rollouts. `--arm SPEC` names one; `--arms PRESET`
expands a preset (ARM_PRESETS) on a base spec: `engine` on the rollout spec, `trainer` on the training
spec. Knobs a machine cannot honour are kept in the plan as skipped, with the reason (never a crash).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from trm_diag.config import BackendSpec
from trm_diag.errors import UsageError

DEFAULT_REFERENCE = "hf:dtype=float64"  # what every side's own error is measured against (`sweep --reference`)


@dataclass(frozen=True)
class Knob:
    """One setting of a preset: spec keys to set on the base, and the backends it applies to."""

    slug: str  # the arm's name after the preset, e.g. "dtype-float32"
    options: dict[str, str]
    what: str  # what changed, in words
    backends: tuple[str, ...] = ("hf", "vllm")


DTYPE_KNOBS = tuple(Knob(f"dtype-{d}", {"dtype": d}, f"dtype {d}") for d in ("float32", "bfloat16", "float16"))
ARM_PRESETS: dict[str, tuple[Knob, ...]] = {
    # the rollout engine, one knob at a time
    "engine": (
        Knob("baseline", {}, "nothing (the rollout spec re-scored)"),
        *DTYPE_KNOBS,
        Knob("eager", {"enforce_eager": "true"}, "eager mode (no CUDA graphs / compilation)", ("vllm",)),
        Knob("batch-1", {"batch_size": "1"}, "batch size 1 (batch invariance)"),
        Knob("no-chunked-prefill", {"engine.enable_chunked_prefill": "false"}, "chunked prefill off", ("vllm",)),
        Knob("prefix-caching-on", {"engine.enable_prefix_caching": "true"}, "prefix caching on", ("vllm",)),
        Knob("kv-cache-fp8", {"kv_cache_dtype": "fp8"}, "KV cache in fp8", ("vllm",)),
        Knob("batch-invariant", {"batch_invariant": "true"}, "vLLM's batch-invariant mode", ("vllm",)),
    ),
    # the training side's knobs
    "trainer": (
        Knob("baseline", {}, "nothing (the training spec)"),
        *DTYPE_KNOBS,
        Knob("attn-eager", {"attn": "eager"}, "attention: eager", ("hf",)),
        Knob("attn-sdpa", {"attn": "sdpa"}, "attention: sdpa", ("hf",)),
        Knob("batch-1", {"batch_size": "1"}, "batch size 1"),
        Knob("lm-head-fp32", {"dtype": "bfloat16", "lm_head_dtype": "float32"}, "fp32 LM head on a bf16 body", ("hf",)),
    ),
}


@dataclass(frozen=True)
class Arm:
    """One arm of the plan: its name, its full spec, what changed, and why it is skipped (None: it runs)."""

    name: str
    spec: BackendSpec
    changed: str
    skip: str | None = None


def slug(text: str) -> str:
    """A short folder-safe name from a spec's text: 'hf:dtype=float32,attn=eager' -> 'hf-dtype-float32-attn-eager'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "arm"


def _with(base: BackendSpec, options: dict[str, str]) -> BackendSpec:
    opts = {**base.options, **options}
    spec = BackendSpec(base.name, opts, "")
    return BackendSpec(base.name, opts, spec.describe())


def skip_reason(spec: BackendSpec, cuda: bool) -> str | None:
    """Why this machine cannot run the spec as an arm, known before loading it; None: it can."""
    from trm_diag.backends import REGISTRY

    entry = REGISTRY[spec.name]
    if importlib.util.find_spec(entry.requires) is None:
        return f"the {spec.name} backend needs '{entry.requires}', which is not installed"
    o = spec.options
    if spec.name == "vllm":
        if o.get("batch_invariant", "false").lower() == "true" and not cuda:
            return "vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT) needs a CUDA GPU"
        if o.get("enforce_eager", "").lower() == "true" and not cuda:
            return "on CPU vLLM always runs eagerly: the same as the baseline"
        if o.get("engine.enable_prefix_caching", "").lower() == "true":
            return ("re-scoring is one prefill with prompt log-probs, which vLLM never serves from its prefix cache: "
                    "this knob acts on decoding only (the rollout side's own log-probs carry it)")  # fmt: skip
    if spec.name == "hf":
        attn = o.get("attn", "")
        if attn.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
            return f"attn={attn} needs the package 'flash_attn' and a CUDA GPU"
        if o.get("device", "").startswith("cuda") and not cuda:
            return "device=cuda but this machine has no CUDA GPU"
    return None


def plan_arms(
    arms: list[str], presets: list[str], rollout: BackendSpec, train: BackendSpec, cuda: bool, model: str
) -> list[Arm]:
    """The arms of a sweep, in run order: explicit specs first (``model`` filled in), then presets; a spec
    already planned is dropped; arms that switch process-wide modes (batch-invariant) go last."""
    from trm_diag.backends import parse_spec

    plan: list[Arm] = []
    seen: dict[str, str] = {}

    def add(name: str, spec: BackendSpec, changed: str) -> None:
        key = f"{spec.name}:{sorted(spec.options.items())}"
        if key in seen:
            return
        if any(a.name == name for a in plan):
            raise UsageError(f"two arms are named '{name}'", "give the arms specs that differ")
        seen[key] = name
        plan.append(Arm(name, spec, changed, skip_reason(spec, cuda)))

    for text in arms:
        spec = parse_spec(text)
        add(slug(spec.describe()), spec.with_model(model), f"the spec {spec.describe()}")
    for preset in presets:
        if preset not in ARM_PRESETS:
            raise UsageError(f"--arms {preset} is not a preset", f"use one of: {', '.join(ARM_PRESETS)}")
        base = rollout if preset == "engine" else train
        for knob in ARM_PRESETS[preset]:
            if base.name not in knob.backends:
                continue
            spec = _with(base, knob.options)
            if knob.options and spec.describe() == base.describe():
                continue  # the base already has this setting: the baseline arm covers it
            add(f"{preset}-{knob.slug}", spec, knob.what)
    if not plan:
        raise UsageError("the sweep has no arms", "pass --arm SPEC (repeatable) or --arms engine,trainer")
    return sorted(plan, key=lambda a: a.spec.options.get("batch_invariant", "false").lower() == "true")
