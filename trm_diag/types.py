"""The data every stage exchanges: rollouts, a backend's rows of log-probs, and scored chunks.

Backends produce Rollout and TokenRows (backends/base.py holds the Backend contract), scoring
turns them into token columns, and assemble / partial / merge pass Scored chunks along.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch


@dataclass
class RoutingComparison:
    """Per (layer, token) routing of both sides for one response."""

    experts_roll: torch.Tensor  # (layers, T, k)
    experts_train: torch.Tensor  # (layers, T, k)
    margin_roll: torch.Tensor  # (layers, T)
    margin_train: torch.Tensor  # (layers, T)
    flip: torch.Tensor  # (layers, T) bool

    def subset(self, keep: torch.Tensor) -> RoutingComparison:
        """The comparison at the response positions where ``keep`` [T] (bool) is set."""
        return RoutingComparison(
            self.experts_roll[:, keep], self.experts_train[:, keep], self.margin_roll[:, keep],
            self.margin_train[:, keep], self.flip[:, keep],
        )  # fmt: skip

    @property
    def route_flips(self) -> np.ndarray:
        """Number of layers whose expert set differs, per token [T]."""
        return self.flip.sum(dim=0).numpy().astype(np.int64)

    @property
    def route_margin(self) -> np.ndarray:
        """Rollout-side margin at the flipping layer closest to the boundary [T]; NaN without a flip."""
        m = torch.where(self.flip, self.margin_roll, torch.full_like(self.margin_roll, float("inf"))).min(dim=0).values
        return torch.where(torch.isinf(m), torch.full_like(m, float("nan")), m).double().numpy()


Progress = Callable[[int], None]  # called with the number of items just finished


def no_progress(_: int) -> None:
    """Default progress hook: does nothing."""


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
    # scores of row ranges of several responses of this type in one call ([(rows, start, stop)] -> [n, V]),
    # or None: lets the transformers backend apply its head once to joined hidden states
    joint_scores: ClassVar[Callable[[list[tuple[Any, int, int]]], torch.Tensor] | None]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Log-probs [stop - start, V] (float32) predicting response tokens start..stop-1."""
        ...

    def scores(self, start: int, stop: int) -> torch.Tensor:
        """rows(start, stop) up to an additive constant per row: may skip the normalisation."""
        ...


@dataclass
class TensorRows:
    """TokenRows over an already materialised [T, V] tensor of log-probs."""

    logp: torch.Tensor  # (T, V) log-probs, or scores (log-probs up to a constant per row) when not normalized
    routing: torch.Tensor | None = None  # (moe layers, T, E) router logits, MoE models only
    normalized: bool = True
    joint_scores: ClassVar[None] = None

    @property
    def length(self) -> int:
        return int(self.logp.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        x = self.logp[start:stop].float()
        return x if self.normalized else torch.log_softmax(x, dim=-1)

    def scores(self, start: int, stop: int) -> torch.Tensor:
        return self.logp[start:stop].float()


@dataclass
class Scored:
    """What scoring produced: one dict of token columns per rollout, MoE comparisons, and the
    exact-tier kernels that ran."""

    rollouts: list[Rollout]
    columns: list[dict[str, np.ndarray]]
    routing: list[tuple[int, RoutingComparison]]
    kernels: set[str] = field(default_factory=set)
