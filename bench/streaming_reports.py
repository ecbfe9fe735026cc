"""Streaming reports: peak memory versus the number of rollouts.

    .venv/bin/python bench/streaming_reports.py [--sizes 2500,5000,10000,20000] [--e2e 2500,5000,10000,20000]
        [--e2e-rollout SPEC] [--e2e-train SPEC] [--e2e-extra "--fidelity topk --topk 8"]

Part 1, assembling and writing a report (no model): a checkpoint store holding N scored
rollouts (16-token prompts, 32-token responses, every token column filled) becomes a report
in two ways, each in a fresh process:
- streaming (trm-diag): statistics chunk by chunk, single token columns read back for
  quantiles and bounds, Parquet row groups written as chunks come;
- naive (all in memory, how trm-diag worked before): every chunk loaded into one Scored,
  each table built as one DataFrame and written at the end.
Part 2, end to end: `trm-diag compare` on the bundled tiny Llama (hf bf16 rollouts by default,
--e2e-rollout to change; hf fp32 training side, batches of 64, 16 new tokens) with N one-line
prompts; peak RSS of the whole process, sampled every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from _models import ROOT, SAMPLE

from trm_diag.heap import tune_allocator

CHUNK = 64  # rollouts per stored chunk, as compare's default --chunk-prompts
PROMPT_LEN, RESP_LEN = 16, 32


def build_store(folder: Path, prompts: list[int], seed: int = 0):
    """A finished checkpoint store (returned) with one synthetic scored rollout per prompt index."""
    from trm_diag.report.partial import PartialStore
    from trm_diag.schema import TOKEN_COLUMNS
    from trm_diag.types import Rollout, Scored

    chunks = (len(prompts) + CHUNK - 1) // CHUNK
    store = PartialStore(folder, "bench", chunks, resume=False)
    rng = np.random.default_rng(seed)
    for c in range(chunks):
        rollouts, columns = [], []
        for j, p in enumerate(prompts[c * CHUNK : (c + 1) * CHUNK]):
            ids = rng.integers(5, 1900, PROMPT_LEN + RESP_LEN).tolist()
            lp = (-rng.exponential(1.0, RESP_LEN)).tolist()
            rollouts.append(Rollout(j, p, 0, ids[:PROMPT_LEN], ids[PROMPT_LEN:], lp, "length"))
            cols = {k: np.abs(rng.normal(0, 1e-3, RESP_LEN)) for k in TOKEN_COLUMNS}
            cols.update(seq_id=np.full(RESP_LEN, j), pos=np.arange(RESP_LEN), token_id=np.array(ids[PROMPT_LEN:]),
                        lp_roll=np.array(lp), lp_train=np.array(lp) + cols["log_ratio"],
                        nonfinite=np.zeros(RESP_LEN, bool), zero_prob=np.zeros(RESP_LEN, bool))  # fmt: skip
            columns.append(cols)
        store.save(c, Scored(rollouts, columns, []))
    return store


def report(folder: Path, chunks: int, out: Path, naive: bool) -> dict:
    """Assemble and write the report of the store in ``folder`` (run in a fresh process)."""
    tune_allocator()  # as the CLI does
    from _memory import measure
    from transformers import AutoTokenizer

    from trm_diag.config import SamplingConfig, Thresholds
    from trm_diag.report.assemble import MemoryChunks, assemble, report_parts
    from trm_diag.report.partial import PartialStore
    from trm_diag.report.tables import write_summary, write_tables
    from trm_diag.types import Scored

    tok = AutoTokenizer.from_pretrained(SAMPLE)
    store = PartialStore(folder, "bench", chunks, resume=True)
    out.mkdir(parents=True, exist_ok=True)

    def run():
        source = store
        if naive:
            parts = [store.chunk(i) for i in range(chunks)]
            source = MemoryChunks(
                Scored([r for p in parts for r in p.rollouts], [c for p in parts for c in p.columns], [])
            )
        a = assemble(source, command="compare", fidelity="exact", sampling=SamplingConfig(), thresholds=Thresholds(),
                     horizons=(1024,), tokenizer=tok, width=2048, moe=None, header={}, warn=lambda m: None)  # fmt: skip
        write_tables(out, report_parts(a), a.summary)
        write_summary(out, a.summary)

    _, seconds, mb = measure(run)
    return {"seconds": seconds, "peak_mb": mb}


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB of the process tree, exit code) of a command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    if proc.returncode:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
    return time.perf_counter() - t, peak / 2**20, proc.returncode


def part1(sizes: list[int]) -> None:
    print("Part 1: assemble + write a report from a checkpoint store (fresh process per cell)")
    print(f"{'rollouts':>9}{'tokens':>10}  {'method':<11}{'seconds':>9}{'peak extra MB':>15}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            chunks = build_store(Path(tmp) / "store", list(range(n))).n_chunks
            for method in ("streaming", "naive"):
                code = (
                    "import json, sys; sys.path.insert(0, 'bench'); from pathlib import Path; "
                    "from streaming_reports import report; "
                    f"print(json.dumps(report(Path({str(Path(tmp) / 'store')!r}), {chunks}, "
                    f"Path({str(Path(tmp) / method)!r}), {method == 'naive'})))"
                )
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    print(res.stderr[-2000:], file=sys.stderr)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{n:>9}{n * RESP_LEN:>10}  {method:<11}{r['seconds']:>9.1f}{r['peak_mb']:>15.0f}")


def part2(sizes: list[int], rollout: str, train: str = "hf:dtype=float32,batch_size=64", extra: tuple = ()) -> None:
    print(f"\nPart 2: trm-diag compare end to end (tiny Llama, {rollout} vs {train} {' '.join(extra)}, 16 new tokens)")
    print(f"{'rollouts':>9}{'tokens':>10}{'seconds':>9}{'peak RSS MB':>13}")
    exe = str(Path(sys.executable).parent / "trm-diag")
    rng = random.Random(0)
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text(
                "".join(json.dumps({"prompt": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}="}) + "\n" for _ in range(n))
            )
            out = Path(tmp) / "out"
            cmd = [exe, "compare", "--prompts", str(prompts), "--rollout", rollout,
                   "--train", train, "--max-new-tokens", "16", "--out", str(out), "-q", *extra]  # fmt: skip
            seconds, mb, code = peak_rss(cmd)
            if code:
                continue
            tokens = json.loads((out / "summary.json").read_text())["metrics"]["n_tokens"]
            print(f"{n:>9}{tokens:>10}{seconds:>9.1f}{mb:>13.0f}")


def part3(sizes: list[int], resp_len: int) -> None:
    print(f"\nPart 3: trm-diag score end to end (imported rollouts, {resp_len}-token responses, sampled tier, "
          "tiny Llama hf fp32)")  # fmt: skip
    print(f"{'rollouts':>9}{'tokens':>10}{'file MB':>9}{'seconds':>9}{'peak RSS MB':>13}")
    exe = str(Path(sys.executable).parent / "trm-diag")
    rng = np.random.default_rng(0)
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "rollouts.jsonl"
            with f.open("w") as out:
                for i in range(n):
                    ids = rng.integers(5, 1900, PROMPT_LEN + resp_len).tolist()
                    lps = np.round(-rng.exponential(1.0, resp_len), 6).tolist()
                    row = {"prompt_ids": ids[:PROMPT_LEN], "response_ids": ids[PROMPT_LEN:], "rollout_logprobs": lps,
                           "prompt_idx": i, "reward": float(i % 2)}  # fmt: skip
                    out.write(json.dumps(row) + "\n")
            cmd = [exe, "score", str(f), "--train", "hf:dtype=float32,batch_size=64", "--out", f"{tmp}/out", "-q"]
            seconds, mb, code = peak_rss(cmd)
            if code:
                continue
            print(f"{n:>9}{n * resp_len:>10}{f.stat().st_size / 2**20:>9.0f}{seconds:>9.1f}{mb:>13.0f}")


def main() -> None:
    tune_allocator()  # as the CLI does (trm_diag/heap.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2500,5000,10000,20000,40000")
    ap.add_argument("--e2e", default="2500,5000,10000,20000")
    ap.add_argument("--e2e-rollout", default="hf:dtype=bfloat16,batch_size=64", help="rollout spec of part 2")
    ap.add_argument("--e2e-train", default="hf:dtype=float32,batch_size=64", help="training spec of part 2")
    ap.add_argument("--e2e-extra", default="", help="more compare options of part 2, e.g. '--fidelity topk --topk 8'")
    ap.add_argument("--score", default="", help="part 3 sizes (imported rollouts), e.g. 2000,8000")
    ap.add_argument("--score-len", type=int, default=256, help="response tokens per imported rollout (part 3)")
    args = ap.parse_args()
    if args.sizes:
        part1([int(x) for x in args.sizes.split(",")])
    if args.e2e:
        part2([int(x) for x in args.e2e.split(",")], args.e2e_rollout, args.e2e_train, tuple(args.e2e_extra.split()))
    if args.score:
        part3([int(x) for x in args.score.split(",")], args.score_len)


if __name__ == "__main__":
    main()
