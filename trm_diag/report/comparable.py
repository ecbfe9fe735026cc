"""Whether the two sides of a run are comparable before any drift is reported: the same weights (unless two
checkpoints were asked for), the same token ids, the same sampling settings. A failed check is the verdict
'NOT COMPARABLE: <what differs>', exit code 2 (usage or not comparable), never a drift report.

summary.json `comparable` records what was checked: {"ok", "weights": {"rollout", "train", "same",
"two_checkpoints"}, "checks": [...]}.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from trm_diag.errors import ModelError

OTHER_CHECKPOINT_FLAG = "--other-checkpoint"


class NotComparable(ModelError):
    """The two sides differ in what makes their numbers comparable (weights, token ids, sampling)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(f"NOT COMPARABLE: {problem}", fix)


def _short(fp: str | None) -> str:
    return "none" if fp is None else fp[:12]


def weights_record(roll_fp: str | None, train_fp: str | None, two_checkpoints: bool) -> dict[str, Any]:
    """summary.json `comparable.weights`: both fingerprints, whether they are one, whether two were asked for."""
    same = None if roll_fp is None or train_fp is None else roll_fp == train_fp
    return {"rollout": roll_fp, "train": train_fp, "same": same, "two_checkpoints": two_checkpoints}


def check_score_weights(
    file_fps: Iterable[str], train_fp: str | None, model: str, other_checkpoint: bool
) -> str | None:
    """The rollouts' recorded weights fingerprint(s) against the checkpoint the training side loaded. Raises
    NotComparable when they differ and ``other_checkpoint`` (a staleness audit) was not asked for; returns the
    rollouts' fingerprint (None when the file records none)."""
    fps = sorted(set(file_fps))
    if not fps:
        return None
    if other_checkpoint or (len(fps) == 1 and fps[0] == train_fp):
        return fps[0] if len(fps) == 1 else None
    what = (
        f"the rollouts were sampled from {len(fps)} checkpoints ({', '.join(map(_short, fps))})"
        if len(fps) > 1
        else f"the rollouts were sampled from weights {_short(fps[0])}, the training side loaded '{model}' with "
        f"weights {_short(train_fp)}"
    )
    raise NotComparable(
        what, f"score with the checkpoint that sampled them, or pass {OTHER_CHECKPOINT_FLAG} for a staleness audit"
    )


def check_sampling(recorded: dict[str, Any], given: dict[str, Any]) -> None:
    """Sampling settings the rollouts record against ones given as options for the training side."""
    off = {"top_p": 1.0, "top_k": 0.0, "min_p": 0.0}  # what "no truncation" reads as (top_k -1 is vLLM's off)

    def norm(k: str, v: Any) -> float:
        v = off.get(k, 1.0) if v is None else float(v)
        return 0.0 if k == "top_k" and v < 0 else v

    differ = [
        f"{k} {given[k]!r} (the rollouts record {recorded[k]!r})"
        for k in sorted(recorded.keys() & given.keys())
        if norm(k, recorded[k]) != norm(k, given[k])
    ]
    if differ:
        raise NotComparable(
            f"the training side would use {', '.join(differ)}: the two sides' distributions are not the same one",
            "drop the option (the rollouts' own settings are used), or score rollouts sampled with it",
        )


def _plain(text: str, tokenizer: Any) -> Iterator[list[int]]:
    """The text's own tokenisation, with and then without the tokenizer's special tokens."""
    yield [int(x) for x in tokenizer(text)["input_ids"]]
    yield [int(x) for x in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _template_tails(tokenizer: Any) -> list[str]:
    """What follows the last user message in a prompt: nothing (a plain prompt), or the chat template's end of
    a user turn, with and without the generation prompt (found by rendering a marker message)."""
    tails = [""]
    if getattr(tokenizer, "chat_template", None):
        mark = "\u2063trm-diag-marker\u2063"
        for gen in (True, False):
            try:
                rendered = tokenizer.apply_chat_template(
                    [{"role": "user", "content": mark}], add_generation_prompt=gen, tokenize=False
                )
            except Exception:  # a template that needs more than one user turn (a system turn, tools)
                continue
            if isinstance(rendered, str) and mark in rendered:
                tails.append(rendered.rsplit(mark, 1)[1])
    return tails


def _squeeze(s: str) -> str:
    return " ".join(s.split())


def prompt_ids_mismatch(ids: list[int], text: str, tokenizer: Any) -> str | None:
    """Where a row's prompt_ids part from its prompt text; None when they agree: the ids are the text's
    tokenisation, or they decode to a prompt that ends with the text as its last user message (the chat template's
    end of turn and generation prompt after it; earlier turns and system prompts before it). Whitespace runs read
    as one space. Another tokenizer's ids, or another text's, decode to something else."""
    ids = [int(x) for x in ids]
    if any(f == ids for f in _plain(text, tokenizer)):
        return None
    if text.strip():
        decoded = _squeeze(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if any(decoded.endswith(_squeeze(text + tail)) for tail in _template_tails(tokenizer)):
            return None
    f = next(_plain(text, tokenizer))
    k = next((i for i, (x, y) in enumerate(zip(ids, f)) if x != y), min(len(ids), len(f)))
    a = ids[k] if k < len(ids) else "end"
    b = f[k] if k < len(f) else "end"
    return (
        f"its prompt_ids are not its prompt text's tokens (at position {k}: id {a} against {b}) and do not decode "
        "to a prompt ending with it (its chat template's last user turn)"
    )


def check_prompt_ids(ids: list[int], text: str, tokenizer: Any, where: str) -> None:
    """A rollout row that carries both prompt_ids and its prompt text: the ids must be the text's tokenisation,
    or the training side scores other tokens than the engine saw. Without a model (no tokenizer) unchecked."""
    from trm_diag.report.id_tokenizer import IdTokenizer

    if isinstance(tokenizer, IdTokenizer):
        return
    why = prompt_ids_mismatch(ids, text, tokenizer)
    if why:
        raise NotComparable(
            f"{where}: {why}: the token ids fed are not the prompt's",
            "export the ids the engine was given (or drop the prompt text), and score with the model's tokenizer",
        )


def require_gateable(summary: dict[str, Any], path: str, bitwise: bool) -> None:
    """The gate's comparability checks: a report whose checks failed, and with ``bitwise`` a report whose sides
    loaded two checkpoints (no bit-for-bit certificate compares two sets of weights)."""
    c = summary.get("comparable")
    if isinstance(c, dict) and c.get("ok") is False:
        raise NotComparable(f"report '{path}': {'; '.join(map(str, c.get('differs') or []))}", "re-run it comparably")
    w = c.get("weights") if isinstance(c, dict) else None
    if bitwise and isinstance(w, dict) and w.get("same") is False:
        raise NotComparable(
            f"report '{path}' compares two checkpoints (weights {_short(w.get('rollout'))} and "
            f"{_short(w.get('train'))}): no bit-for-bit certificate holds between different weights",
            "gate it with drift rules, or certify a pair that loads one checkpoint",
        )
