"""Where two sides part inside the network (docs/design.md section 8): pure functions over arrays.

r_l = ||h_l^roll - h_l^train|| / ||h_l^train|| per layer l. The divergence *enters* at the first layer
whose error jumps to at least JUMP times the largest error of the layers before it (and above FLOOR,
the float32 rounding floor): error that only accumulates grows by small factors per layer, a layer
that computes something different multiplies it. The component that carries the jump is the one
(attention or MLP) whose output error grew most against the layer's input error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

JUMP = 4.0  # an entry: r_l >= JUMP x max(r_0..r_{l-1}, FLOOR)
FLOOR = 1e-6  # below this an error is float32 rounding (two fp32 sides of one model sit at ~1e-7)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0, inf when only b is)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def growth(errors: Sequence[float]) -> list[float]:
    """r_l / r_{l-1} per layer (the first layer against FLOOR)."""
    out, prev = [], FLOOR
    for r in errors:
        out.append(r / max(prev, FLOOR))
        prev = r
    return out


def entry_layer(errors: Sequence[float], jump: float = JUMP, floor: float = FLOOR) -> int | None:
    """The first layer where the error jumps above the trend before it; None when none does."""
    worst = floor
    for i, r in enumerate(errors):
        if r >= floor and r >= jump * worst:
            return i
        worst = max(worst, r)
    return None


def carrier(attn: float, mlp: float, before: float) -> str:
    """Which component of a layer carries its jump: the one whose output error grew most against the
    error of the layer's input (``before``)."""
    base = max(before, FLOOR)
    a, m = attn / base, mlp / base
    if not (math.isfinite(a) or math.isfinite(m)):
        return "attention" if attn >= mlp else "MLP"
    return "attention" if a >= m else "MLP"


def expert_flip(router_roll: np.ndarray, router_train: np.ndarray, k: int) -> bool:
    """Whether the top-k expert sets of two router-logit vectors [E] differ."""
    top = lambda x: set(np.argsort(-np.asarray(x, dtype=np.float64), kind="stable")[:k].tolist())  # noqa: E731
    return top(router_roll) != top(router_train)


# what each captured output is, in words (locate --bitwise names the first that differs by any bit)
MODULE_WORDS = {
    "attn": "attention (with its input norm)", "router": "router", "mlp": "MLP / MoE (with its input norm)",
    "layer": "residual stream", "final_norm": "final norm", "logits": "head (logits)",
}  # fmt: skip


def bits_differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two captured outputs differ by any bit (both widened exactly to float64 by the capture)."""
    a, b = np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64)
    return a.shape != b.shape or bool((a.view(np.uint64) != b.view(np.uint64)).any())


def first_bit_difference(steps: Sequence[tuple[int, str, np.ndarray, np.ndarray]]) -> tuple[int, str] | None:
    """(layer, component) of the first step, in computation order, whose two outputs are not bit-equal."""
    return next(((layer, comp) for layer, comp, a, b in steps if bits_differ(a, b)), None)
