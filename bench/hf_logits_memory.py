"""Peak memory of scoring one long response at V = 151,936: trm-diag's lazy head vs full logits.

    .venv/bin/python bench/hf_logits_memory.py [--lengths 2048,32768]

trm-diag runs the decoder once and applies the output head in row chunks to the response
positions only (HiddenRows), reducing each chunk to divergences before the next. The naive
path materialises model(ids).logits, [T, V] float32 (20 GB at T = 32,768), so it is run
only where it fits. Peak RSS growth is sampled every 2 ms during each call; the model is a
random tiny Llama (2 layers, hidden 64) with Qwen's vocabulary width, so the numbers
isolate the logits path.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _memory import measure
from _models import wide_llama

from trm_diag.heap import tune_allocator


def main() -> None:
    tune_allocator()  # as the CLI does (trm_diag/heap.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,32768")
    ap.add_argument("--naive-max", type=int, default=4096, help="longest response the naive path is run on")
    args = ap.parse_args()
    from trm_diag.backends import load_backend, parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.math.sampling import processed_logprobs
    from trm_diag.math.scoring import batch_columns
    from trm_diag.types import Rollout

    with tempfile.TemporaryDirectory() as tmp:
        path = wide_llama(Path(tmp) / "wide", max_positions=40_000)
        hf = load_backend(parse_spec(f"hf:dtype=float32,model={path},batch_size=1"))
        s = SamplingConfig()
        print(f"{'T':>7} {'path':<34}{'seconds':>9}{'peak extra MB':>15}")
        for T in [int(x) for x in args.lengths.split(",")]:
            g = torch.Generator().manual_seed(T)
            prompt = torch.randint(5, 1900, (16,), generator=g).tolist()
            resp = torch.randint(5, 1900, (T,), generator=g).tolist()
            r = Rollout(0, 0, 0, prompt, resp, [-1.0] * T, "length")

            def ours(prompt=prompt, resp=resp, r=r):
                rows = hf.score([(prompt, resp)], s)[0]
                batch_columns([r], [rows], [rows], "exact", hf.vocab_width)[0]

            _, dt, mb = measure(ours)
            print(f"{T:>7} {'lazy head + fused divergences':<34}{dt:>9.1f}{mb:>15.0f}")
            if T <= args.naive_max:

                def naive(prompt=prompt, resp=resp):
                    with torch.no_grad():
                        logits = hf.model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : -1]
                        lp = processed_logprobs(logits, s)
                        p = lp.exp()
                        (p * (lp - lp)).sum(-1)

                _, dt, mb = measure(naive)
                print(f"{T:>7} {'full logits (model(ids).logits)':<34}{dt:>9.1f}{mb:>15.0f}")
            else:
                print(
                    f"{T:>7} {'full logits (model(ids).logits)':<34}{'-':>9}{f'~{T * 151_936 * 4 * 3 / 2**20:,.0f} (not run)':>15}"
                )


if __name__ == "__main__":
    main()
