"""Mixture-of-Experts routing: selected experts, routing flips and router margins. Pure torch.

A flip at (token, layer) means the two backends' top-k expert *sets* differ: a tiny
numerical difference crossed a routing boundary, and the token's probability can jump
(the paper names this a main source of mismatch). The margin is the gap between the
k-th and (k+1)-th router probability: how close a token was to flipping.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trm_diag.math.stats import describe
from trm_diag.types import RoutingComparison  # noqa: F401 (defined with the types every stage passes on)


def moe_shape(config: dict | object) -> tuple[int, int] | None:
    """(num_experts, experts_per_token) of a model config (dict or object), None for dense models."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    n = get("num_experts") or get("num_local_experts") or get("n_routed_experts")
    k = get("num_experts_per_tok")
    return (int(n), int(k)) if n and k else None


def select_experts(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted top-k expert ids [..., k] and the router margin [...] (k-th minus (k+1)-th probability)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (..., E)
    top = torch.topk(probs, min(k + 1, probs.shape[-1]), dim=-1)
    experts = top.indices[..., :k].sort(dim=-1).values
    margin = top.values[..., k - 1] - top.values[..., k] if probs.shape[-1] > k else top.values[..., k - 1]
    return experts, margin


def compare_routing(roll_logits: torch.Tensor, train_logits: torch.Tensor, k: int) -> RoutingComparison:
    """Compare router logits [layers, T, E] of the two sides for one response."""
    er, mr = select_experts(roll_logits, k)
    et, mt = select_experts(train_logits, k)
    return RoutingComparison(er, et, mr, mt, (er != et).any(dim=-1))


def compare_routed(roll_experts: torch.Tensor, train_logits: torch.Tensor, k: int) -> RoutingComparison:
    """Compare the experts an engine routed to ([T, layers, k] ids, recorded in a dump) with the trainer's
    router logits [layers, T, E]. The engine's margin is unknown (NaN): its logits were not recorded."""
    er = roll_experts.permute(1, 0, 2).long().sort(dim=-1).values  # (layers, T, k)
    et, mt = select_experts(train_logits, k)
    if er.shape != et.shape:
        raise ValueError(
            f"routed experts of shape {tuple(er.shape)} (layers, T, k) for router logits giving {tuple(et.shape)}"
        )
    n_experts = train_logits.shape[-1]
    if er.numel() and (int(er.max()) >= n_experts or bool((er[..., 1:] == er[..., :-1]).any())):
        raise ValueError(f"routed expert ids outside 0..{n_experts - 1} or repeated within a token's k")
    return RoutingComparison(er, et, torch.full_like(mt, math.nan), mt, (er != et).any(dim=-1))


def routing_summary(route_flips: np.ndarray, per_layer_flips: np.ndarray, kl: np.ndarray, abs_lr: np.ndarray) -> dict:
    """Flip rates and the divergence of flipped versus unflipped tokens (summary.json 'routing').

    route_flips [N]: layers flipped per token; per_layer_flips [layers]: flips per layer
    summed over tokens; kl, abs_lr [N]: token divergences.
    """
    n = len(route_flips)
    flipped = route_flips > 0

    def stats(x: np.ndarray) -> dict:  # the report's one statistics function: NaN skipped, inf kept
        d = describe(x, ("mean", "p99", "max"))
        return {"n": int(x.size) - d["n_nan"], "n_inf": d["n_inf"], **{k: d[k] for k in ("mean", "p99", "max")}}

    layers = len(per_layer_flips)
    return {
        "available": True,
        "n_layers": layers,
        "flip_rate": float(per_layer_flips.sum() / (n * layers)) if n and layers else 0.0,
        "token_any_flip_rate": float(flipped.mean()) if n else 0.0,
        "per_layer_flip_rate": [float(x / n) if n else 0.0 for x in per_layer_flips],
        "kl_flip": stats(kl[flipped]),
        "kl_no_flip": stats(kl[~flipped]),
        "abs_log_ratio_flip": stats(abs_lr[flipped]),
        "abs_log_ratio_no_flip": stats(abs_lr[~flipped]),
    }
