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

from trm_diag.errors import UsageError

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
    """The reader module of a dump format; a one-line error when it (or a package it needs) is missing."""
    try:
        return import_module(DUMP_FORMATS[name])
    except ModuleNotFoundError as e:
        if e.name == DUMP_FORMATS[name]:
            raise UsageError(
                f"this trm-diag cannot read {name} dumps yet", "convert the dump to the rollout schema"
            ) from None
        raise UsageError(
            f"reading {name} dumps needs the package '{e.name}', which is not installed", f"pip install {e.name}"
        ) from None


def detect(path: Path) -> str | None:
    """The dump format a path is in, or None (a plain rollout file, or nothing trm-diag knows)."""
    for name in DUMP_FORMATS:
        try:
            found = reader(name).detect(path)
        except UsageError:  # a reader this installation cannot run: it detects nothing
            continue
        if found:
            return name
    return None


def dump_rows(path: Path, name: str, allow_pickle: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a dump in format ``name``."""
    yield from reader(name).rows(path, allow_pickle)
