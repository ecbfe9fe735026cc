"""The small interface every backend implements, and the data it exchanges.

A backend generates rollouts (token ids plus the log-prob of each sampled token under
the distribution it was sampled from) and scores given token ids teacher-forced,
returning the processed next-token log-probs row by row on demand, so the pipeline
can reduce them to divergences chunk by chunk without holding [T, V] of both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trm_diag.config import SamplingConfig

Progress = Callable[[int], None]  # called with the number of items just finished


def no_progress(_: int) -> None:
    """Default progress hook: does nothing."""


def seed_for(seed: int, index: int) -> int:
    """A per-prompt (or per-batch) seed derived from the run's seed and a global index."""
    return (seed * 1_000_003 + index) % (2**63)


@dataclass
class Rollout:
    """One sampled response. lp_roll[t] = log p(y_t) at the decode step that produced y_t."""

    seq_id: int
    prompt_idx: int
    sample_idx: int
    prompt_ids: list[int]
    response_ids: list[int]
    lp_roll: list[float]
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    extra: dict[str, Any] = field(default_factory=dict)


class TokenRows(Protocol):
    """Processed next-token log-probs of one scored response, computed on demand."""

    length: int
    routing: torch.Tensor | None  # (moe layers, T, E) router logits at the response positions
    normalized: bool  # scores() are the engine's own log-probs: sampled-token values are read, not recomputed

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Log-probs [stop - start, V] (float32) predicting response tokens start..stop-1."""
        ...

    def scores(self, start: int, stop: int) -> torch.Tensor:
        """rows(start, stop) up to an additive constant per row: may skip the normalisation."""
        ...


@dataclass
class TensorRows:
    """TokenRows over an already materialised [T, V] tensor of log-probs."""

    logp: torch.Tensor  # (T, V)
    routing: torch.Tensor | None = None  # (moe layers, T, E) router logits, MoE models only
    normalized: bool = True

    @property
    def length(self) -> int:
        return int(self.logp.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.logp[start:stop].float()

    def scores(self, start: int, stop: int) -> torch.Tensor:
        return self.rows(start, stop)


class Backend(Protocol):
    """What the pipeline needs from an engine (see backends/hf.py for the reference)."""

    name: str
    description: str  # canonical spec text, recorded in reports
    tokenizer: Any
    vocab_width: int  # number of logit columns compared (config.vocab_size)
    model_path: str
    max_model_len: int | None  # longest prompt + response the engine takes (None: no known limit)

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

    def close(self) -> None:
        """Release the engine's memory."""
        ...
