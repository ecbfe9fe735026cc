"""Readers of RL frameworks' own training-run dumps (slime, SkyRL, prime-rl), each yielding rows of the
rollout schema (report/rollouts_io.py) that `trm-diag score` scores like a rollout file.

A reader module ``trm_diag.report.dumps.<name>`` defines:
- ``detect(path: Path) -> bool``: cheap check of the layout (folder structure, file name, magic bytes);
- ``rows(path: Path, allow_pickle: bool) -> Iterator[tuple[str, dict]]``: ``(where, row)`` pairs, ``where``
  naming file, step and sample for messages; ``row`` holds the schema's fields (prompt_ids,
  response_ids, rollout_logprobs, prompt_idx, sample_idx, reward, temperature, ...) plus what the dump
  adds: ``step`` (int), ``train_logprobs`` (the trainer's recorded log-probs, per response token),
  ``kept_ids`` (the engine's kept set per response token), ``routed_experts`` ([T, layers, k]).
Readers raise trm_diag.errors types with one-line messages and never import the framework itself.
Pickled dumps are read only with allow_pickle (and then with a restricted unpickler).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

# format name -> module (imported only when a file is read or detected in that format)
DUMP_FORMATS: dict[str, str] = {
    "slime": "trm_diag.report.dumps.slime",
    "skyrl": "trm_diag.report.dumps.skyrl",
    "prime-rl": "trm_diag.report.dumps.prime_rl",
}
# what frameworks that keep only decoded text write, and why score cannot read it
TEXT_ONLY = {
    "verl": "verl's rollout_data_dir holds decoded text only",
    "trl": "TRL's log_completions holds decoded text only",
}


def reader(name: str) -> Any:
    """The reader module of a dump format."""
    return import_module(DUMP_FORMATS[name])


def _available(name: str) -> bool:
    try:
        reader(name)
    except ModuleNotFoundError as e:
        if e.name != DUMP_FORMATS[name]:  # a dependency of the reader is missing: say so when it is used
            return True
        return False
    return True


def detect(path: Path) -> str | None:
    """The dump format a path is in, or None (a plain rollout file, or nothing trm-diag knows)."""
    for name in DUMP_FORMATS:
        if _available(name) and reader(name).detect(path):
            return name
    return None


def dump_rows(path: Path, name: str, allow_pickle: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a dump in format ``name``."""
    yield from reader(name).rows(path, allow_pickle)
