"""The sampling distribution as a pure tensor function of the logits.

A sampler draws from :func:`processed_logprobs` (vLLM's order: temperature -> min_p -> top_k ->
top_p -> renormalise). Scoring rows are the untruncated tempered distribution
(:func:`tempered_scores`); the truncated views are computed from them by views.py (docs/design.md
section 7).
"""

from __future__ import annotations

import torch

from trm_diag.config import SamplingConfig


def _tempered(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Logits in float32 (float64 ones stay float64: a sweep's reference) divided by the temperature
    (greedy: untempered)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return x / sampling.temperature if not sampling.greedy and sampling.temperature != 1.0 else x


def truncate(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Tempered logits x [N, V] (float32) with the tokens the sampler drops set to -inf, step by step as
    vLLM's PyTorch sampler does it, so the kept set (ties included) is the engine's: min_p on float32
    probabilities, then one ascending sort serving top-k (ties with the k-th stay) and top-p (the most
    likely token always stays); top-k alone uses a top-k threshold. Greedy or untruncated: x unchanged."""
    if sampling.greedy or not sampling.truncated:
        return x
    neg_inf = float("-inf")
    if sampling.min_p > 0:
        p = torch.softmax(x, dim=-1)
        x = x.masked_fill(p < p.amax(dim=-1, keepdim=True) * sampling.min_p, neg_inf)
    top_k = sampling.top_k if 0 < sampling.top_k < x.shape[-1] else 0
    if sampling.top_p < 1:
        xs, order = x.sort(dim=-1, descending=False)  # (N, V) ascending
        if top_k:
            xs = xs.masked_fill(xs < xs[..., -top_k:].min(dim=-1, keepdim=True).values, neg_inf)
        drop = torch.softmax(xs, dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[..., -1] = False
        x = x.scatter(-1, order, xs.masked_fill(drop, neg_inf))
    elif top_k:
        x = x.masked_fill(x < torch.topk(x, top_k, dim=-1).values[..., -1:], neg_inf)
    return x


def processed_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the distribution sampled from, given raw logits [N, V]: tempered,
    truncated (:func:`truncate`; dropped tokens -inf) and renormalised. Greedy decoding compares the
    untempered distribution."""
    return torch.log_softmax(truncate(_tempered(logits, sampling), sampling), dim=-1)


def tempered_scores(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Scores [N, V] (float32) of the untruncated tempered distribution, up to an additive constant per
    row: what the scoring side of every tier compares. Truncation (top-k / top-p / min-p) is applied
    by views.py, in float64, from the rollout's rows."""
    return _tempered(logits, sampling)


def tempered_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the untruncated tempered distribution."""
    return torch.log_softmax(_tempered(logits, sampling), dim=-1)
