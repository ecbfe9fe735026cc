"""Exact kl, kl_rev, tv and both entropies at V = 151,936: naive torch composition vs trm-diag's kernels.

    .venv/bin/python bench/divergence_kernel.py [--rows 256,1024] [--vocab 151936]

Methods, all on the same float32 logits [N, V] of two sides:
- naive: two log_softmax, two exp, products and sums, all materialised over [N, V];
- stable chunks: exact_divergences on log_softmax outputs (trm-diag's support-aware path);
- fused eager: logit_divergences op by op (cancellation-free terms, float64 sums);
- inductor: the same function through torch.compile (inductor, C++ on CPU);
- native C: trm_diag/kernels/rows_kernel.c, one row at a time (the default on CPU).
Accuracy: max relative error against a float64 evaluation of the same float32 logits, over
values float32 can resolve (> 1e-8). Memory: peak RSS growth during the call (sampled).
"""

from __future__ import annotations

import argparse
import time

import torch
from _memory import measure

from trm_diag.divergence import exact_divergences, logit_divergences
from trm_diag.heap import tune_allocator

KEYS = ("kl", "kl_rev", "tv", "ent_roll", "ent_train")


def naive(a, b):
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = lp.exp(), lq.exp()
    return {"kl": (p * (lp - lq)).sum(-1), "kl_rev": (q * (lq - lp)).sum(-1), "tv": 0.5 * (p - q).abs().sum(-1),
            "ent_roll": -(p * lp).sum(-1), "ent_train": -(q * lq).sum(-1)}  # fmt: skip


def stable(a, b):
    return exact_divergences(torch.log_softmax(a, -1), torch.log_softmax(b, -1))


def main() -> None:
    tune_allocator()  # as the CLI does (trm_diag/heap.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,1024")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    V = args.vocab
    methods = {
        "naive (materialised)": naive,
        "stable chunks (log-probs)": stable,
        "fused eager": lambda a, b: logit_divergences(a, b, kernel="eager"),
        "inductor": lambda a, b: logit_divergences(a, b, kernel="inductor"),
        "native C (default)": lambda a, b: logit_divergences(a, b, kernel="native"),
    }
    for kernel in ("inductor", "native"):
        t0 = time.perf_counter()
        logit_divergences(torch.randn(4, V), torch.randn(4, V), kernel=kernel)  # compile once
        print(f"{kernel} first call: {time.perf_counter() - t0:.1f} s (cached on disk afterwards)")
    print(f"threads: {torch.get_num_threads()}, V = {V:,}")
    print(f"\n{'N':>6} {'method':<26}{'rows/s':>9}{'x naive':>9}{'max rel err':>13}{'peak extra MB':>15}")
    for n in [int(x) for x in args.rows.split(",")]:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, V, generator=g) * 4  # peaked rows like a trained model's, plus a near-one-hot block
        a[: n // 4] *= 6
        b = a + torch.randn(n, V, generator=g) * 0.02
        ref = {k: v for k, v in naive(a[:32].double(), b[:32].double()).items()}
        base = None
        for name, fn in methods.items():
            fn(a[:8], b[:8])
            best, mem, out = float("inf"), 0.0, None
            for _ in range(args.repeats):
                out, dt, mb = measure(lambda fn=fn, a=a, b=b: fn(a, b))
                best, mem = min(best, dt), max(mem, mb)
            rps = n / best
            base = base or rps
            err = 0.0
            for k in KEYS:
                r = ref[k]
                big = r.abs() > 1e-8
                err = max(err, float(((out[k][:32].double() - r).abs() / r.abs())[big].max()))
            print(f"{n:>6} {name:<26}{rps:>9.0f}{rps / base:>9.2f}{err:>13.1e}{mem:>15.0f}")


if __name__ == "__main__":
    main()
