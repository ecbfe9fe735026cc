"""Prompt token ids held by `compare` for the whole run: Python lists (naive) vs PromptIds.

    .venv/bin/python bench/prompt_ids_memory.py [--prompts 20000] [--tokens 2000]

A stand-in tokenizer returns random ids below 151,936 (Qwen's vocabulary), so only the
holding is measured, not tokenisation. Prints the resident-memory growth of each way.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
from _memory import measure

from trm_diag.report.prompts import Prompt, PromptIds


class _Tok:
    chat_template = None

    def __init__(self, n: int) -> None:
        self.rng, self.n = np.random.default_rng(0), n

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.rng.integers(0, 151_936, self.n).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20_000)
    ap.add_argument("--tokens", type=int, default=2_000)
    args = ap.parse_args()
    prompts = [Prompt(text=f"p{i}") for i in range(args.prompts)]
    print(f"{args.prompts:,} prompts of {args.tokens:,} tokens")
    print(f"{'holding':<22}{'seconds':>9}{'extra MB':>10}")
    for name, build in (  # packed first: memory the naive lists free may stay in the process
        ("PromptIds (int32)", lambda: PromptIds(prompts, _Tok(args.tokens))),
        ("lists (naive)", lambda: [_Tok(args.tokens)(p.text)["input_ids"] for p in prompts]),
    ):
        held, seconds, mb = measure(build)
        print(f"{name:<22}{seconds:>9.1f}{mb:>10.0f}")
        del held
        gc.collect()


if __name__ == "__main__":
    main()
