"""A stand-in tokenizer for a report made without a model (the trainer's recorded log-probs): tokens are
shown by id, and text is never tokenised (re-tokenising would need the model's tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trm_diag.errors import InputError


class IdTokenizer:
    """Decodes token ids as ``<id 123>``; its size is unknown (0)."""

    def __len__(self) -> int:
        return 0

    def decode(self, ids: Iterable[int], **_: Any) -> str:
        return "".join(f"<id {int(i)}>" for i in ids)

    def batch_decode(self, seqs: Iterable[Iterable[int]], **_: Any) -> list[str]:
        return [self.decode(s) for s in seqs]

    def encode(self, text: str, **_: Any) -> list[int]:
        return []

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        raise InputError(
            "a rollout has text but no token ids, and no model was given to tokenise it",
            "pass --model PATH (its tokenizer), or export the token ids",
        )
