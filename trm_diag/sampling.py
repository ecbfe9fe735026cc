"""The sampling distribution as a pure tensor function of the logits.

A sampler draws from :func:`processed_logprobs` (vLLM's order: temperature -> min_p -> top_k ->
top_p -> renormalise). Scoring rows are the untruncated tempered distribution
(:func:`tempered_scores`); the truncated views are computed from them by views.py (DESIGN.md
section 7).
"""

from __future__ import annotations

import torch

from trm_diag.config import SamplingConfig


def _tempered(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Logits in float32 divided by the temperature (greedy: untempered)."""
    x = logits.float()
    return x / sampling.temperature if not sampling.greedy and sampling.temperature != 1.0 else x


def processed_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the distribution sampled from, given raw logits [N, V].

    Tokens removed by min_p / top_k / top_p get log-prob -inf; the rest is renormalised.
    Greedy decoding (temperature 0) compares the untempered distribution.
    """
    x = _tempered(logits, sampling)  # (N, V)
    if sampling.greedy or not sampling.truncated:
        return torch.log_softmax(x, dim=-1)
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    if sampling.min_p > 0:
        logp = torch.log_softmax(x, dim=-1)
        # keep p_v >= min_p * max p  <=>  logp_v >= log(min_p) + max logp
        cut = logp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(sampling.min_p))
        x = torch.where(logp < cut, neg_inf, x)
    if sampling.top_k > 0 and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]  # (N, 1)
        x = torch.where(x < kth, neg_inf, x)
    if sampling.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)  # (N, V) ascending
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - sampling.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = torch.where(drop, neg_inf, x)
    return torch.log_softmax(x, dim=-1)


def tempered_scores(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Scores [N, V] (float32) of the untruncated tempered distribution, up to an additive constant per
    row: what the scoring side of every tier compares. Truncation (top-k / top-p / min-p) is applied
    by views.py, in float64, from the rollout's rows."""
    return _tempered(logits, sampling)


def tempered_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the untruncated tempered distribution."""
    return torch.log_softmax(_tempered(logits, sampling), dim=-1)
