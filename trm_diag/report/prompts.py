"""Prompt files (JSONL, Parquet, plain text) and their tokenisation with chat templates.

Formats:
- ``.jsonl``: one JSON object per line with ``"prompt": "text"`` or
  ``"messages": [{"role": ..., "content": ...}, ...]`` (chat-style; rendered with the
  model's chat template and the generation prompt); a bare JSON string is a prompt too.
- ``.parquet``: a ``prompt`` or ``messages`` column.
- ``.txt``: one prompt per line; ``\\n`` inside a line stands for a newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError, ModelError
from trm_diag.report.rows import read_jsonl, read_parquet


@dataclass(frozen=True)
class Prompt:
    """One prompt: plain text or a chat message list."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in (self.messages or ())]


def _text(x: str, where: str) -> str:
    """Text a tokenizer can take: valid Unicode (JSON escapes can smuggle in a lone surrogate)."""
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{where}: the prompt holds an invalid character {e.object[e.start : e.end]!r} (a lone surrogate)",
            "write the prompt as valid Unicode text",
        ) from None
    return x


def _from_obj(obj: Any, where: str) -> Prompt:
    prompt = _parse_obj(obj, where)
    for x in (prompt.text, *(t for pair in prompt.messages or () for t in pair)):
        if x is not None:
            _text(x, where)
    return prompt


def _parse_obj(obj: Any, where: str) -> Prompt:
    if isinstance(obj, str):
        return Prompt(text=obj)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with 'prompt' or 'messages'", "see README 'Prompt files'")
    if "messages" in obj and obj["messages"] is not None:
        msgs = obj["messages"]
        if hasattr(msgs, "tolist"):
            msgs = msgs.tolist()
        if not isinstance(msgs, list) or not msgs:
            raise InputError(
                f"{where}: 'messages' must be a non-empty list", 'write [{"role": "user", "content": "..."}]'
            )
        pairs = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: each message needs string 'role' and 'content'", "fix the message list")
            pairs.append((m["role"], m["content"]))
        return Prompt(messages=tuple(pairs))
    for key in ("prompt", "text"):
        if isinstance(obj.get(key), str):
            return Prompt(text=obj[key])
    raise InputError(f"{where}: no 'prompt' (string) or 'messages' (list) field", "see README 'Prompt files'")


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; raises InputError naming the file and line of any problem."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise InputError(
            f"prompt file '{path}' is a broken symlink or a symlink loop", "point --prompts at the real file"
        )
    if not p.is_file():
        raise InputError(f"prompt file '{path}' does not exist", "pass --prompts with a .jsonl, .parquet or .txt file")
    suffix = p.suffix.lower()
    prompts: list[Prompt] = []
    if suffix in (".jsonl", ".json"):
        prompts = [_from_obj(obj, where) for where, obj in read_jsonl(p)]
    elif suffix == ".parquet":
        prompts = [_from_obj(row, where) for where, row in read_parquet(p, ("prompt", "messages"))]
    elif suffix == ".txt":
        text = p.read_text(encoding="utf-8-sig", errors="strict")  # without a leading byte-order mark
        prompts = [
            Prompt(text=_text(line.replace("\\n", "\n"), f"{path}:{n}"))
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    else:
        raise InputError(f"unsupported prompt file type '{suffix}' ({path})", "use .jsonl, .parquet or .txt")
    if not prompts:
        raise InputError(f"prompt file '{path}' holds no prompts", "add at least one prompt")
    return prompts


def encode_prompt(prompt: Prompt, tokenizer: Any) -> list[int]:
    """Token ids of a prompt; chat prompts go through the tokenizer's chat template."""
    if prompt.is_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                "the prompt file has chat-style prompts but the model's tokenizer has no chat template",
                "use plain 'prompt' entries, or a model with a chat template",
            )
        ids = tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(x) for x in ids]
    ids = tokenizer(prompt.text)["input_ids"]
    return [int(x) for x in ids]


class PromptIds:
    """Every prompt's token ids packed in one int32 array (4 bytes a token instead of ~36 in
    Python lists: 20,000 prompts of 2,000 tokens hold 160 MB, not 1.4 GB); read a slice at a time."""

    def __init__(
        self, prompts: list[Prompt], tokenizer: Any, vocab_width: int | None = None, max_tokens: int | None = None
    ) -> None:
        """Encode every prompt; ids must lie inside the model's vocabulary (a tokenizer larger than
        config.json's vocab_size is refused), and prompts longer than max_tokens keep their last tokens."""
        from array import array

        import numpy as np

        flat, offsets = array("i"), array("q", [0])  # grown in place: no second copy of the ids
        self.truncated = 0
        for i, p in enumerate(prompts):
            ids = encode_prompt(p, tokenizer)
            if not ids:
                raise InputError(f"prompt {i} encodes to zero tokens", "remove empty prompts from the prompt file")
            if vocab_width is not None and max(ids) >= vocab_width:
                raise ModelError(
                    f"prompt {i} encodes to token id {max(ids)}, beyond the model's vocab_size {vocab_width} "
                    "(the tokenizer is larger than config.json says)",
                    "use the tokenizer that belongs to this checkpoint",
                )
            if max_tokens is not None and len(ids) > max_tokens:
                ids = ids[-max_tokens:]
                self.truncated += 1
            flat.extend(ids)
            offsets.append(len(flat))
        self.flat = np.frombuffer(flat, dtype=np.int32) if flat else np.zeros(0, np.int32)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, s: slice) -> list[list[int]]:
        """The ids of prompts s.start .. s.stop - 1, as lists for the engines."""
        lo, hi, _ = s.indices(len(self))
        return [self.flat[self.offsets[i] : self.offsets[i + 1]].tolist() for i in range(lo, hi)]
