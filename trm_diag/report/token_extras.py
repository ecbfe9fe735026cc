"""Per-response-token fields a rollout row may carry beyond the engine's log-probs, checked and kept on the
Rollout (``Rollout.extra``): the trainer's recorded log-probs, the engine's kept set, the routed experts and a
loss mask. Training-run dumps (report/dumps/) fill them; a rollout file may carry them as columns too.

| field | per response token | used for |
| --- | --- | --- |
| train_logprobs | log pi_train(y_t) the trainer recorded | the sampled tier without a model (``--train recorded``) |
| kept_ids | the token ids the engine's sampler kept (top-k / top-p / min-p) | the replay view in any tier |
| routed_experts | [layers, k] expert ids the engine routed to | router flips against a re-scoring MoE trainer |
| loss_mask | 1 for a token the policy sampled, 0 for context inside the response (a tool's output) | which tokens are scored |
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trm_diag.errors import InputError

TOKEN_EXTRAS = ("train_logprobs", "kept_ids", "routed_experts", "loss_mask")
LOGPROB_SLACK = 1e-4  # engines and trainers report log-probs a hair above 0 for near-certain tokens


def _length(v: Any, n: int, where: str, name: str) -> list:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise InputError(f"{where}: '{name}' must be a list with one entry per response token", "check the column")
    if len(v) != n:
        raise InputError(
            f"{where}: {n} response tokens but {len(v)} '{name}' entries (mismatched lengths)",
            "give one entry per response token",
        )
    return list(v)


def _train_logprobs(v: Any, n: int, where: str) -> list[float]:
    """Floats <= 0; NaN kept (a trainer that produced NaN is a finding: the token fails every mask)."""
    out = _length(v, n, where, "train_logprobs")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in out):
        raise InputError(f"{where}: 'train_logprobs' must be a list of numbers", "one log-prob per response token")
    out = [float(x) for x in out]
    bad = next((x for x in out if x > LOGPROB_SLACK), None)
    if bad is not None:
        raise InputError(
            f"{where}: invalid train log-prob {bad} (log-probs are <= 0)",
            "check the column holds the trainer's log-probs, not probs or logits",
        )
    return out


def _kept_ids(
    v: Any, resp: list[int], where: str, vocab_width: int | None, mask: np.ndarray | None
) -> list[np.ndarray]:
    """Per token, the engine's kept set as sorted unique int64 ids; it must hold the sampled token. A token the
    policy did not sample (loss_mask 0: a tool's output) may have an empty set (slime writes one)."""
    out = []
    for t, ids in enumerate(_length(v, len(resp), where, "kept_ids")):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, (list, tuple)) and not ids and mask is not None and not mask[t]:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        top = vocab_width if vocab_width is not None else 2**62
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids)
        ):
            raise InputError(
                f"{where}: kept_ids of response token {t} is not a non-empty list of token ids",
                "give each token's kept set as a list of ids (the engine's sampling support)",
            )
        bad = next((x for x in ids if not 0 <= x < top), None)  # checked as Python ints: any size is an error
        if bad is not None:
            raise InputError(
                f"{where}: kept_ids of response token {t} hold id {bad}, outside the vocabulary",
                "score with the model the rollouts came from",
            )
        arr = np.unique(np.asarray(ids, dtype=np.int64))
        if not np.isin(resp[t], arr):
            raise InputError(
                f"{where}: response token {t} (id {resp[t]}) is not in its own kept set: the kept sets do not belong "
                "to these tokens",
                "pass the kept sets the engine returned with these tokens, unshifted",
            )
        out.append(arr)
    return out


def _routed_experts(v: Any, n: int, where: str) -> np.ndarray:
    """[T, layers, k] non-negative integer expert ids."""
    try:
        arr = np.asarray(v.tolist() if hasattr(v, "tolist") else v)
    except ValueError:
        arr = np.asarray([], dtype=object)
    if arr.ndim != 3 or arr.shape[0] != n or arr.dtype.kind not in "iu" or (arr.size and arr.min() < 0):
        what = f"shape {list(arr.shape)}" if arr.dtype.kind in "iu" else f"values of type {arr.dtype}"
        raise InputError(
            f"{where}: 'routed_experts' must be non-negative integer expert ids of shape [{n} response tokens, "
            f"layers, k], not {what}",
            "give the experts the engine routed each response token to",
        )
    return arr.astype(np.int64)


def _loss_mask(v: Any, n: int, where: str) -> np.ndarray:
    out = _length(v, n, where, "loss_mask")
    if not all(isinstance(x, (int, float, bool)) and x in (0, 1) for x in out):
        raise InputError(f"{where}: 'loss_mask' must hold 0 or 1 per response token", "check the column")
    return np.asarray(out, dtype=bool)


def token_extras(row: dict[str, Any], resp: list[int], where: str, vocab_width: int | None) -> dict[str, Any]:
    """The TOKEN_EXTRAS a row carries, checked against its response (one entry per token)."""
    n, out = len(resp), {}
    mask = None if row.get("loss_mask") is None else _loss_mask(row["loss_mask"], n, where)
    if mask is not None and not mask.all():  # an all-ones mask says nothing: kept only where it removes a token
        out["loss_mask"] = mask
    if row.get("train_logprobs") is not None:
        out["train_logprobs"] = _train_logprobs(row["train_logprobs"], n, where)
    if row.get("kept_ids") is not None:
        out["kept_ids"] = _kept_ids(row["kept_ids"], resp, where, vocab_width, mask)
    if row.get("routed_experts") is not None:
        out["routed_experts"] = _routed_experts(row["routed_experts"], n, where)
    return out


def cut_extras(extra: dict[str, Any], stop: int) -> None:
    """Keep the first ``stop`` response tokens' entries (a response cut after its first end-of-sequence token)."""
    for key in TOKEN_EXTRAS:
        if key in extra:
            extra[key] = extra[key][:stop]
    if "loss_mask" in extra and extra["loss_mask"].all():
        del extra["loss_mask"]
