"""`trm-diag sweep` with N arms against N separate `trm-diag compare` runs (the naive way).

    .venv/bin/python bench/sweep.py [--prompts 16] [--max-new-tokens 64] [--no-vllm]

Both sides do the same work per arm (score the rollouts exactly, write a report); the sweep samples the
rollouts once and keeps the rollout engine's rows on disk, where each compare loads the rollout engine,
generates and re-scores again. Prints wall time and peak resident memory (whole process tree,
children included) of each, one after the other (never two engines at once).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ARMS_VLLM = ["hf:dtype=float32", "hf:dtype=bfloat16", "hf:dtype=float16", "hf:dtype=float32,attn=eager",
             "vllm:dtype=float32", "vllm:dtype=bfloat16,kv_cache_dtype=fp8"]  # fmt: skip
ARMS_HF = ["hf:dtype=float32", "hf:dtype=float16", "hf:dtype=float32,attn=eager", "hf:dtype=float32,batch_size=1",
           "hf:dtype=bfloat16,lm_head_dtype=float32", "hf:dtype=bfloat16,attn=eager"]  # fmt: skip


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the process and its children), sampled every 20 ms."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-vllm", action="store_true", help="rollout hf:dtype=bfloat16, transformers arms only")
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "trm-diag")
    rollout, arms = ("hf:dtype=bfloat16", ARMS_HF) if args.no_vllm else ("vllm:dtype=bfloat16", ARMS_VLLM)
    common = ["--rollout", rollout, "--num-prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
              "-q"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        naive_s, naive_peak = 0.0, 0.0
        for i, arm in enumerate(arms):
            s, peak = timed([exe, "compare", *common, "--train", arm, "--out", f"{tmp}/c{i}"])
            naive_s, naive_peak = naive_s + s, max(naive_peak, peak)
            rows.append((f"compare --train {arm}", s, peak))
        for ref in ("none", "hf:dtype=float64"):
            s, peak = timed([exe, "sweep", *common, *[f"--arm={a}" for a in arms], "--reference", ref,
                             "--out", f"{tmp}/sweep-{ref.split(':')[0]}"])  # fmt: skip
            rows.append((f"sweep, {len(arms)} arms, reference {ref}", s, peak))
    print(f"rollout {rollout}, {args.prompts} prompts, max {args.max_new_tokens} new tokens, {os.cpu_count()} CPUs")
    print("| run | wall s | peak RSS MiB |\n| --- | ---: | ---: |")
    for name, s, peak in rows:
        print(f"| {name} | {s:.1f} | {peak:,.0f} |")
    print(f"| {len(arms)} x compare (sum / max) | {naive_s:.1f} | {naive_peak:,.0f} |")
    sweep_s = rows[-2][1]
    print(f"sweep without reference: {sweep_s / naive_s:.2f}x the time of {len(arms)} compares "
          f"({naive_s / sweep_s:.1f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
