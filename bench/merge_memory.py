"""`trm-diag merge`: peak memory versus the number of rollouts.

    .venv/bin/python bench/merge_memory.py [--sizes 5000,10000,20000,40000] [--shards 2]

Builds shard reports of N synthetic scored rollouts in all (16-token prompts, 32-token
responses, every token column filled; prompt i in shard i % S, as `--shard I/S` does) and
merges them in a fresh process per cell, two ways:
- streaming (trm-diag merge): shard rows read back chunk by chunk, one token column at a time
  for quantiles and bounds, the merged tables written as row groups;
- naive (all in memory, how merge worked before): every chunk of the merged order loaded into
  one Scored first, then assembled and written.
Prints seconds and peak RSS of the whole process (sampled every 10 ms).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _models import ROOT, SAMPLE
from streaming_reports import build_store, peak_rss


def build_shard(out: Path, n: int, shard: int, shards: int) -> None:
    """One shard report of the prompts i < n with i % shards == shard (one sample each)."""
    from transformers import AutoTokenizer

    from trm_diag.config import SamplingConfig, Thresholds
    from trm_diag.report.assemble import assemble, report_parts
    from trm_diag.report.tables import write_summary, write_tables

    prompts = list(range(shard, n, shards))
    store = build_store(out.parent / f"store{shard}", prompts, seed=shard)
    side = {"model": str(SAMPLE), "model_fingerprint": "bench"}
    header = {"rollout": {"spec": "hf:dtype=bfloat16", **side}, "train": {"spec": "hf:dtype=float32", **side},
              "prompts": {"count": len(prompts)}, "shard": f"{shard}/{shards}", "horizons": [1024]}  # fmt: skip
    a = assemble(store, command="compare", fidelity="exact", sampling=SamplingConfig(), thresholds=Thresholds(),
                 horizons=(1024,), tokenizer=AutoTokenizer.from_pretrained(SAMPLE), width=2048, moe=None,
                 header=header, warn=lambda m: None)  # fmt: skip
    out.mkdir(parents=True)
    write_tables(out, report_parts(a), a.summary)
    write_summary(out, a.summary)
    store.clear()


def naive_merge(shards: list[str], out: str) -> None:
    """The merged rows all in memory before assembling (the pre-streaming merge)."""
    from trm_diag.report.assemble import MemoryChunks
    from trm_diag.run import merge
    from trm_diag.types import Scored

    real = merge.assemble

    def in_memory(source, **kw):
        parts = [source.chunk(i) for i in range(source.n_chunks)]
        scored = Scored([r for p in parts for r in p.rollouts], [c for p in parts for c in p.columns],
                        [x for p in parts for x in p.routing])  # fmt: skip
        return real(MemoryChunks(scored), **kw)

    merge.assemble = in_memory
    merge.run_merge(shards, out, warn=lambda m: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5000,10000,20000,40000")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "trm-diag")
    print(f"trm-diag merge of {args.shards} shard reports (fresh process per cell; peak RSS of the process)")
    print(f"{'rollouts':>9}{'tokens':>10}  {'method':<11}{'seconds':>9}{'peak RSS MB':>13}")
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            shards = [str(Path(tmp) / f"s{k}") for k in range(args.shards)]
            for k, s in enumerate(shards):
                code = (f"import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from merge_memory import "
                        f"build_shard; build_shard(Path({s!r}), {n}, {k}, {args.shards})")  # fmt: skip
                subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
            methods = {"streaming": [exe, "merge", *shards, "--json", "--out", f"{tmp}/m"]}
            if args.naive:
                code = (f"import sys; sys.path.insert(0, 'bench'); from merge_memory import naive_merge; "
                        f"naive_merge({shards!r}, {tmp + '/naive'!r})")  # fmt: skip
                methods["naive"] = [sys.executable, "-c", code]
            for method, cmd in methods.items():
                seconds, mb, code = peak_rss(cmd)
                if code:
                    continue
                out = Path(tmp) / ("m" if method == "streaming" else "naive")
                tokens = json.loads((out / "summary.json").read_text())["metrics"]["n_tokens"]
                print(f"{n:>9}{tokens:>10}  {method:<11}{seconds:>9.1f}{mb:>13.0f}")


if __name__ == "__main__":
    main()
