"""The arms of a sweep: backend specs with one setting changed, presets as data, readable names.

An arm is a backend spec that re-scores the sweep's rollouts. `--arm SPEC` names one; `--arms PRESET`
expands a preset (ARM_PRESETS) on a base spec: `engine` on the rollout spec, `trainer` and `batch` on the
training spec. An arm's report compares it with the rollout side, except in a SELF_PRESETS preset
(`batch`): there it compares the base spec with itself, each arm against the base at the preset's
reference batch shape (batch size 1), both sides scoring passes. Knobs a machine cannot honour are kept
in the plan as skipped, with the reason (never a crash).
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
    # how the trainer batches (the trainer against itself, SELF_PRESETS): micro-batch size, padding, grouping
    "batch": (
        Knob("b1", {"batch_size": "1"}, "batch size 1 (the reference against itself)", ("hf",)),
        Knob("b8", {"batch_size": "8"}, "batch size 8", ("hf",)),
        Knob("b32", {"batch_size": "32"}, "batch size 32", ("hf",)),
        Knob("padding-left", {"batch_size": "8", "padding_side": "left"}, "batch size 8, left padding", ("hf",)),
        Knob("padding-right", {"batch_size": "8", "padding_side": "right"}, "batch size 8, right padding", ("hf",)),
        Knob(
            "regrouped", {"batch_size": "8", "regroup_seed": "1"}, "batch size 8, sequences regrouped (seed 1)", ("hf",)
        ),  # fmt: skip
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


# presets that compare the base spec with itself: the batch-shape options of the side every arm is compared with
SELF_PRESETS: dict[str, dict[str, str]] = {"batch": {"batch_size": "1"}}
RATIO_BAND = "[0.9, 1.1]"  # the band whose outside share the batch preset reports (metrics.NARROW_BAND)


@dataclass(frozen=True)
class Arm:
    """One arm of the plan: its name, its full spec, what changed, why it is skipped (None: it runs), and the
    spec its report compares it with (None: the sweep's rollout side; else that spec's scoring pass)."""

    name: str
    spec: BackendSpec
    changed: str
    skip: str | None = None
    against: BackendSpec | None = None


def slug(text: str) -> str:
    """A short folder-safe name from a spec's text: 'hf:dtype=float32,attn=eager' -> 'hf-dtype-float32-attn-eager'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "arm"


def _with(base: BackendSpec, options: dict[str, str], drop: tuple[str, ...] = ()) -> BackendSpec:
    opts = {**{k: v for k, v in base.options.items() if k not in drop}, **options}
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
    already planned as an explicit arm or in the same preset is dropped (one planned by another preset is kept:
    the verdict reads each side's preset whole); arms that switch process-wide modes (batch-invariant) go last."""
    from trm_diag.backends import parse_spec

    plan: list[Arm] = []
    seen: dict[str, set[str]] = {}  # spec key -> the presets that planned it ("" for an explicit --arm)

    def add(name: str, spec: BackendSpec, changed: str, against: BackendSpec | None = None, preset: str = "") -> None:
        key = f"{spec.name}:{sorted(spec.options.items())}:{against and against.describe()}"
        if seen.get(key, set()) & {"", preset}:
            return
        if any(a.name == name for a in plan):
            raise UsageError(f"two arms are named '{name}'", "give the arms specs that differ")
        seen.setdefault(key, set()).add(preset)
        plan.append(Arm(name, spec, changed, skip_reason(spec, cuda), against))

    for text in arms:
        spec = parse_spec(text)
        add(slug(spec.describe()), spec.with_model(model), f"the spec {spec.describe()}")
    for preset in presets:
        if preset not in ARM_PRESETS:
            raise UsageError(f"--arms {preset} is not a preset", f"use one of: {', '.join(ARM_PRESETS)}")
        base = rollout if preset == "engine" else train
        from trm_diag.backends import BATCH_KEYS

        self_ref = SELF_PRESETS.get(preset)
        against = _with(base, self_ref, drop=BATCH_KEYS) if self_ref is not None else None
        for knob in ARM_PRESETS[preset]:
            if base.name not in knob.backends:
                continue
            spec = _with(base, knob.options, drop=BATCH_KEYS if self_ref is not None else ())
            if self_ref is None and knob.options and spec.describe() == base.describe():
                continue  # the base already has this setting: the baseline arm covers it
            add(f"{preset}-{knob.slug}", spec, knob.what, against, preset)
    if not plan:
        raise UsageError(
            "the sweep has no arms", "pass --arm SPEC (repeatable) or --arms engine,trainer (batch: an hf --train)"
        )
    return sorted(plan, key=lambda a: a.spec.options.get("batch_invariant", "false").lower() == "true")
