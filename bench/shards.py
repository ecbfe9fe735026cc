"""Scale-out: `--shard I/N` runs and `trm-diag merge` against one run.

    .venv/bin/python bench/shards.py [--shards 2] [--prompts 48]

Baseline: one `trm-diag compare` over all prompts with every CPU thread. Sharded: N
`compare --shard I/N` processes started at once, each with its share of the threads
(OMP_NUM_THREADS), then `trm-diag merge`. Both sides run at batch_size=1, so the engines
are batch-invariant: the merged report holds the same rollouts as the single run, and its
values differ only by the rounding of a different thread count (printed). On a GPU cluster each shard is a job on its own GPU(s) (see
docs/scale-out.md); on this 2-core machine the shards share the cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

SPECS = ["--rollout", "hf:dtype=bfloat16,batch_size=1", "--train", "hf:dtype=float32,batch_size=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=48)
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "trm-diag")
    common = [*SPECS, "--num-prompts", str(args.prompts), "--max-new-tokens", "48", "-q"]
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run([exe, "compare", *common, "--out", f"{tmp}/single"], check=True, stdout=subprocess.DEVNULL)
        single = time.perf_counter() - t

        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // args.shards))}
        t = time.perf_counter()
        procs = [
            subprocess.Popen(
                [exe, "compare", *common, "--shard", f"{i}/{args.shards}", "--out", f"{tmp}/s{i}"],
                env=env,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            for i in range(args.shards)
        ]
        if any(p.wait() for p in procs):
            sys.exit("a shard failed")
        shards = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([exe, "merge", *[f"{tmp}/s{i}" for i in range(args.shards)], "--out", f"{tmp}/merged"],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        merge = time.perf_counter() - t
        a = pd.read_parquet(f"{tmp}/single/tokens.parquet")
        b = pd.read_parquet(f"{tmp}/merged/tokens.parquet")
        same_ids = a.shape == b.shape and (a["token_id"].to_numpy() == b["token_id"].to_numpy()).all()
        diff = {c: float((a[c] - b[c]).abs().max()) for c in ("lp_roll", "lp_train", "kl")} if same_ids else {}
    print(f"{'run':<36}{'wall s':>8}")
    print(f"{'one process, ' + str(threads) + ' threads':<36}{single:>8.1f}")
    print(f"{str(args.shards) + ' shards at once':<36}{shards:>8.1f}")
    print(f"{'merge':<36}{merge:>8.1f}")
    print(f"same rollouts (token ids) in the merged and the single report: {same_ids} ({len(a)} tokens)")
    print("max |merged - single|: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    print("(the shards use fewer threads than the single run, so float sums may round differently)")


if __name__ == "__main__":
    main()
