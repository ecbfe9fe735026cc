"""Exact kl, kl_rev, tv and both entropies at V = 151,936: naive torch composition vs trm-diag's kernels.

    .venv/bin/python bench/divergence_kernel.py [--rows 256,1024] [--vocab 151936]

Methods, all on the same float32 logits [N, V] of two sides:
- naive: two log_softmax, two exp, products and sums, all materialised over [N, V];
- stable chunks: exact_divergences on log_softmax outputs (trm-diag's support-aware path);
- fused eager: logit_divergences op by op (cancellation-free terms, float64 sums);
- inductor: the same function through torch.compile (inductor, C++ on CPU);
- native C: trm_diag/kernels/rows_kernel.c, one row at a time, built for this CPU (-march=native);
- native C AVX2 (x86-64 only): the same source built for x86-64-v3, what an AVX2-only server runs;
- auto: what `auto` picks here (measured once per machine, kernels/choice.py).
Runs alternate between methods, best of --repeats rounds each, so a noisy neighbour hits every
method alike. Accuracy: max relative error against a float64 evaluation of the same float32 logits, over
values float32 can resolve (> 1e-8). Memory: peak RSS growth during the call (sampled).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _memory import measure

from trm_diag.heap import tune_allocator
from trm_diag.kernels import OUTPUTS
from trm_diag.kernels.choice import measured_choice
from trm_diag.kernels.native import _cpu, cpu_model, native_rows
from trm_diag.math.divergence import exact_divergences, logit_divergences

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
        "native C (-march=native)": lambda a, b: logit_divergences(a, b, kernel="native"),
    }
    if platform.machine() == "x86_64" and (avx2 := native_rows("x86-64-v3")) is not None:
        methods["native C AVX2 (x86-64-v3)"] = lambda a, b, fn=avx2: dict(
            zip(OUTPUTS, fn(a, b, torch.zeros(len(a), dtype=torch.long)))
        )
    for kernel in ("inductor", "native"):
        t0 = time.perf_counter()
        logit_divergences(torch.randn(4, V), torch.randn(4, V), kernel=kernel)  # compile once
        print(f"{kernel} first call: {time.perf_counter() - t0:.1f} s (cached on disk afterwards)")
    t0 = time.perf_counter()
    picked = measured_choice(torch.device("cpu"))
    print(f"auto: {picked['kernel']} ({time.perf_counter() - t0:.2f} s to decide; {picked['why']})")
    methods["auto"] = lambda a, b: logit_divergences(a, b, kernel="auto")
    flags = _cpu().split("flags", 1)[-1].split()
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16") if f in flags]
    print(f"CPU: {cpu_model()} ({platform.machine()}); vector flags: {' '.join(isa)}")
    print(f"threads: {torch.get_num_threads()}, V = {V:,}, best of {args.repeats} alternating rounds")
    print(f"\n{'N':>6} {'method':<28}{'rows/s':>9}{'x naive':>9}{'max rel err':>13}{'peak extra MB':>15}")
    for n in [int(x) for x in args.rows.split(",")]:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, V, generator=g) * 4  # peaked rows like a trained model's, plus a near-one-hot block
        a[: n // 4] *= 6
        b = a + torch.randn(n, V, generator=g) * 0.02
        ref = {k: v for k, v in naive(a[:32].double(), b[:32].double()).items()}
        best = dict.fromkeys(methods, float("inf"))
        mem = dict.fromkeys(methods, 0.0)
        outs = {}
        for fn in methods.values():
            fn(a[:8], b[:8])
        for _ in range(args.repeats):  # alternating: each round times every method once
            for name, fn in methods.items():
                outs[name], dt, mb = measure(lambda fn=fn, a=a, b=b: fn(a, b))
                best[name], mem[name] = min(best[name], dt), max(mem[name], mb)
        base = n / best["naive (materialised)"]
        for name in methods:
            rps, err = n / best[name], 0.0
            for k in KEYS:
                r = ref[k]
                big = r.abs() > 1e-8
                err = max(err, float(((outs[name][k][:32].double() - r).abs() / r.abs())[big].max()))
            print(f"{n:>6} {name:<28}{rps:>9.0f}{rps / base:>9.2f}{err:>13.1e}{mem[name]:>15.0f}")


if __name__ == "__main__":
    main()
