"""The contract every backend implements (Backend), and helpers they share.

A backend generates rollouts (token ids plus the log-prob of each sampled token under
the distribution it was sampled from) and scores given token ids teacher-forced,
returning the processed next-token log-probs row by row on demand (types.TokenRows), so the
pipeline can reduce them to divergences chunk by chunk without holding [T, V] of both sides.
Backends are registered by name in backends/__init__.py (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

from trm_diag.config import BackendSpec, SamplingConfig
from trm_diag.types import Progress, Rollout, TokenRows, no_progress

T = TypeVar("T")


def seed_for(seed: int, index: int) -> int:
    """A per-prompt (or per-batch) seed derived from the run's seed and a global index."""
    return (seed * 1_000_003 + index) % (2**63)


def run_seed(spec: BackendSpec, sampling: SamplingConfig) -> int:
    """The seed a backend samples with: the spec's seed=N when given, else the run's --seed."""
    return spec.get_int("seed", sampling.seed)


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for s in range(0, len(items), size):
        yield items[s : s + size]


def first_line(e: BaseException) -> str:
    """The first line of an engine's error message (engines raise multi-line messages), else its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Backend(Protocol):
    """What the pipeline needs from an engine (see backends/hf.py for the reference)."""

    name: str
    description: str  # canonical spec text, recorded in reports
    tokenizer: Any
    vocab_width: int  # number of logit columns compared (config.vocab_size)
    model_path: str
    max_model_len: int | None  # longest prompt + response the engine takes (None: no known limit)
    batch_size: int  # sequences per scoring call
    moe: tuple[int, int] | None  # (num_experts, experts_per_token) of an MoE model, else None
    routing_note: str | None  # why router logits are missing, when they are

    def generate(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        progress: Progress = no_progress,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[Rollout]:
        """Sample ``sampling.samples_per_prompt`` responses per prompt; prompt i has global index
        ``prompt_indices[i]`` (default i), which decides its seeds and the rollouts' prompt_idx."""
        ...

    def score(self, seqs: Sequence[tuple[list[int], list[int]]], sampling: SamplingConfig) -> list[TokenRows]:
        """Teacher-forced next-token distributions for each (prompt_ids, response_ids)."""
        ...

    def capture_layers(self, ids: list[int], positions: list[int]) -> Any:
        """Teacher-forced pass over ids keeping, at ``positions`` only, each decoder layer's attention, MLP and
        output states, the final norm and router logits (a backends.capture.LayerCapture): `locate`."""
        ...

    def close(self) -> None:
        """Release the engine's memory."""
        ...
