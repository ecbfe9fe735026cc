"""Memory of `locate`'s capture: chosen positions only, against keeping every position's states.

    .venv/bin/python bench/locate_memory.py [--tokens 4096] [--positions 8]

A random-initialised Llama (hidden 512, 8 layers; weights are irrelevant to memory) runs one
teacher-forced pass over a long sequence. Naive: hooks keep each layer's attention, MLP and hidden
state at every position (what dumping tensors by hand does: O(T x layers x hidden)). locate: the same
hooks keep the chosen positions only (backends/capture.py: O(layers x hidden) per token). Prints the
bytes each keeps and the peak resident growth of the pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import measure  # noqa: E402

from trm_diag.backends.capture import LayerCapture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--positions", type=int, default=8)
    args = ap.parse_args()
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=2000, max_position_embeddings=args.tokens)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 2000, (1, args.tokens))
    chosen = list(range(0, args.tokens, args.tokens // args.positions))[: args.positions]

    def run(positions):
        cap = LayerCapture(positions)
        cap.install(model.model)
        with torch.inference_mode():
            model.model(input_ids=ids)
        cap.remove()
        return cap

    run(chosen)  # warm-up
    rows = []
    for name, positions in (("naive: every position", list(range(args.tokens))), ("locate: chosen positions", chosen)):
        cap, seconds, peak = measure(lambda p=positions: run(p))
        kept = sum(t.numel() * t.element_size() for d in cap.states.values() for t in d.values())
        rows.append((name, len(positions), kept / 2**20, peak, seconds))
        del cap
    print(f"Llama hidden 512, 8 layers, {args.tokens} tokens; states kept in float64")
    print("| capture | positions | kept MiB | peak extra RSS MiB | s |\n| --- | ---: | ---: | ---: | ---: |")
    for name, n, kept, peak, s in rows:
        print(f"| {name} | {n:,} | {kept:,.2f} | {peak:,.0f} | {s:.2f} |")


if __name__ == "__main__":
    main()
