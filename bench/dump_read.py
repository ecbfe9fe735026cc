"""`trm-diag score` on a slime dump with no model, against simply torch.load-ing the same files.

    .venv/bin/python bench/dump_read.py [--steps 100] [--samples 256] [--tokens 1024] [--runs 1]
    .venv/bin/python bench/dump_read.py --steps 5,20 --runs 3 --extrapolate 100

Writes a seeded synthetic slime dump under /tmp (the --dump-details layout: rollout_data/N.pt and
train_data/N.pt per step, each dict built field for field as tests/report/dumps/test_slime.py's
fixtures are, which follow slime's own writers: Python lists for tokens and rollout_log_probs,
float32 tensors for the trainer's log_probs), sized by the flags; the disk it needs is printed and
checked first. The largest step count is written once; smaller ones are folders of links to its
first steps. Then, in fresh processes taken in turn (naive, trm-diag, naive, ...):
- naive: torch.load(weights_only=True) of every rollout_data and train_data file, every sample's
  token list and log-probs touched (summed): the floor any reader of these files pays;
- trm-diag: `trm-diag score DIR --allow-pickle -q --out OUT` (the trainer's recorded log-probs, no
  model): reads, checks, joins and scores every token, and writes the report.
Prints wall and CPU seconds (min / median over --runs), peak RSS (the process's own, from wait4),
tokens/s and trm-diag's ratios to naive. --extrapolate N adds rows scaled linearly to N steps from
the largest size measured. Everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32_000
PROMPT = 64
PER_PROMPT = 8  # samples per prompt (slime's n_samples_per_prompt): one group shares its prompt
REPORT_BYTES_PER_TOKEN = 80  # trm-diag's report of such a dump (tokens.parquet most of it), measured


def _sample_dict(index: int, group: int, prompt: list[int], response: list[int], lps: list[float]) -> dict:
    """Sample.to_dict() of a finished single-turn sample (the keys and types of the test fixtures' _sample_dict)."""
    n = len(response)
    return {
        "group_index": group, "index": index, "rollout_id": None, "prompt": "a prompt",
        "tokens": prompt + response, "multimodal_inputs": None, "multimodal_train_inputs": None,
        "multimodal_train_input_id": None, "apply_chat_template_kwargs": {}, "response": "a response",
        "response_length": n, "label": "40", "reward": float(index % 2), "loss_mask": [1] * n,
        "weight_versions": ["3"], "rollout_log_probs": lps, "rollout_top_p_token_ids": None,
        "rollout_top_p_token_offsets": None, "rollout_routed_experts": None, "remove_sample": False,
        "teacher_log_probs": None, "status": "truncated", "metadata": {}, "generate_function_path": None,
        "custom_rm_path": None, "train_metadata": None, "session_id": None, "non_generation_time": 0.0,
        "spec_info": {"spec_accept_token_num": 0, "spec_draft_token_num": 0, "spec_verify_ct": 0, "completion_token_num": 0},
        "prefix_cache_info": {"cached_tokens": 0, "total_prompt_tokens": len(prompt)},
    }  # fmt: skip


def _train_payload(step: int, samples: list[dict], tokens: np.ndarray, lp_roll: np.ndarray, lp_train: np.ndarray):
    """_build_dump_payload of one DP shard (the fixtures' _train_payload): per-sample tensors, each its own storage."""
    import torch

    out = []
    for pos, s in enumerate(samples):
        n = s["response_length"]
        out.append({
            "data_parallel_rank": 0, "sample_index": s["index"], "rollout_position": pos,
            "tokens": torch.tensor(tokens[pos], dtype=torch.long), "response_lengths": n,
            "rewards": s["reward"], "truncated": 1, "loss_masks": torch.ones(n, dtype=torch.int),
            "rollout_ids": pos, "rollout_mask_sums": torch.tensor(float(n)), "total_lengths": len(s["tokens"]),
            "rollout_log_probs": torch.tensor(lp_roll[pos], dtype=torch.float32),
            "log_probs": torch.tensor(lp_train[pos], dtype=torch.float32),
            "ref_log_probs": torch.tensor(lp_train[pos], dtype=torch.float32),
            "advantages": torch.zeros(n), "returns": torch.zeros(n), "entropy": torch.ones(n),
        })  # fmt: skip
    layout = {
        "rank": 0, "data_parallel_rank": 0, "sample_indices": [s["index"] for s in samples],
        "partition": list(range(len(samples))), "micro_batch_indices": [[list(range(len(samples)))]],
        "num_microbatches": [1], "global_batch_sizes": [len(samples)],
    }  # fmt: skip
    raw = [s["reward"] for s in samples]
    return {
        "format_version": 2,
        "rollout_id": step,
        "rank": 0,
        "samples": out,
        "dp_shards": [layout],
        "raw_reward": raw,
    }


def write_step(root: Path, step: int, samples: int, tokens: int, seed: int) -> int:
    """One step's two files (seeded by seed and step); returns their bytes."""
    import torch

    rng = np.random.default_rng([seed, step])
    prompts = rng.integers(0, VOCAB, (-(-samples // PER_PROMPT), PROMPT))
    resp = rng.integers(0, VOCAB, (samples, tokens))
    lp_roll = -np.abs(rng.normal(size=(samples, tokens))) * 0.5  # the engine's log-probs
    lp_train = np.minimum(lp_roll + rng.normal(scale=0.02, size=(samples, tokens)), 0.0)  # trainer = engine + noise
    index0 = step * samples  # slime's Sample.index is global over the run
    full = np.concatenate([prompts[np.arange(samples) // PER_PROMPT], resp], axis=1)
    rows = [
        _sample_dict(index0 + i, (index0 + i) // PER_PROMPT, prompts[i // PER_PROMPT].tolist(), resp[i].tolist(),
                     lp_roll[i].tolist())
        for i in range(samples)
    ]  # fmt: skip
    files = (root / "rollout_data" / f"{step}.pt", root / "train_data" / f"{step}.pt")
    torch.save({"rollout_id": step, "samples": rows}, files[0])
    torch.save(_train_payload(step, rows, full, lp_roll, lp_train), files[1])
    return sum(f.stat().st_size for f in files)


def naive_read(folder: str) -> None:
    """torch.load every file of the dump and touch every sample's lists (run in its own process)."""
    import torch

    root, ids, n, total = Path(folder), 0, 0, 0.0
    for f in sorted((root / "rollout_data").glob("*.pt"), key=lambda p: int(p.stem)):
        roll = torch.load(f, map_location="cpu", weights_only=True)
        train = torch.load(root / "train_data" / f.name, map_location="cpu", weights_only=True)
        for s, t in zip(roll["samples"], train["samples"]):
            ids += len(s["tokens"])
            n += len(s["rollout_log_probs"])
            total += float(t["log_probs"].double().sum()) - sum(s["rollout_log_probs"])  # n * mean log ratio
        del roll, train
    print(ids, n, total / n)


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, cpu s, peak RSS MiB) of one command in a fresh process: its own rusage, from wait4."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            sys.exit(f"{cmd[:3]} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="100", help="comma-separated step counts (the largest is written)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024, help="response tokens per sample")
    ap.add_argument("--runs", type=int, default=1, help="runs of each method per size, in turn")
    ap.add_argument("--extrapolate", type=int, default=0, help="also print rows scaled linearly to this many steps")
    ap.add_argument("--max-disk-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive-read", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_read:
        return naive_read(args.naive_read)
    sizes = sorted(int(s) for s in args.steps.split(","))
    exe = str(Path(sys.executable).parent / "trm-diag")
    tmp = Path(tempfile.mkdtemp(prefix="trm-dump-bench-", dir="/tmp"))
    try:
        dump = tmp / f"steps{sizes[-1]}"
        (dump / "rollout_data").mkdir(parents=True)
        (dump / "train_data").mkdir()
        t = time.perf_counter()
        per_step = write_step(dump, 0, args.samples, args.tokens, args.seed)
        dump_bytes = per_step * sizes[-1]
        need = dump_bytes + REPORT_BYTES_PER_TOKEN * sizes[-1] * args.samples * args.tokens  # one report at a time
        free = shutil.disk_usage(tmp).free
        print(f"dump: {sizes[-1]} steps x {args.samples} samples x {args.tokens} tokens (prompt {PROMPT}, vocab "
              f"{VOCAB:,}): {per_step / 2**20:.1f} MiB a step, {dump_bytes / 2**30:.2f} GiB; with the largest "
              f"report ~{need / 2**30:.2f} GiB of disk at most; {free / 2**30:.0f} GiB free")  # fmt: skip
        if need > args.max_disk_gb * 2**30 or need > free / 2:
            sys.exit(f"the run would take {need / 2**30:.2f} GiB (limit {args.max_disk_gb} GiB): pass fewer --steps")
        for step in range(1, sizes[-1]):
            write_step(dump, step, args.samples, args.tokens, args.seed)
        print(f"written in {time.perf_counter() - t:.0f} s")
        folders = {}
        for n in sizes:
            folders[n] = dump if n == sizes[-1] else tmp / f"steps{n}"
            if n != sizes[-1]:  # the first n steps, as links
                for side in ("rollout_data", "train_data"):
                    (folders[n] / side).mkdir(parents=True)
                    for step in range(n):
                        (folders[n] / side / f"{step}.pt").symlink_to(dump / side / f"{step}.pt")
        results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
        report_mb = {}
        for n in sizes:
            for r in range(args.runs):
                results.setdefault((n, "naive"), []).append(
                    run([sys.executable, __file__, "--naive-read", str(folders[n])])
                )
                out = tmp / f"report{n}"
                results.setdefault((n, "trm-diag"), []).append(
                    run([exe, "score", str(folders[n]), "--allow-pickle", "-q", "--out", str(out)])
                )
                scored = json.loads((out / "summary.json").read_text())["metrics"]["n_tokens"]
                if scored != n * args.samples * args.tokens:
                    sys.exit(f"trm-diag scored {scored:,} tokens of {n * args.samples * args.tokens:,}")
                report_mb[n] = du(out) / 2**20
                shutil.rmtree(out)
                print(f"  {n} steps, run {r + 1}/{args.runs} done", flush=True)
        _table(results, sizes, args, report_mb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(results: dict, sizes: list[int], args: argparse.Namespace, report_mb: dict[int, float]) -> None:
    print(f"\nslime dump, {args.samples} samples x {args.tokens} tokens a step; {args.runs} run(s) per cell, in turn;")
    print("wall s as min / median; peak RSS of the process (max over runs); ratios trm-diag / naive of the medians")
    head = f"{'steps':>6}{'tokens':>13}  {'method':<9}{'wall s':>16}{'cpu s':>8}{'peak MiB':>10}{'Mtok/s':>8}"
    print(head + f"{'x time':>8}{'x mem':>7}{'report MiB':>12}")
    rows = []
    for n in sizes:
        toks = n * args.samples * args.tokens
        base = statistics.median(w for w, _, _ in results[(n, "naive")]), max(m for *_, m in results[(n, "naive")])
        for method in ("naive", "trm-diag"):
            runs = results[(n, method)]
            wall, cpu = statistics.median(w for w, _, _ in runs), statistics.median(c for _, c, _ in runs)
            mem = max(m for *_, m in runs)
            rows.append((n, method, min(w for w, _, _ in runs), wall, cpu, mem, toks))
            extra = f"{wall / base[0]:>8.2f}{mem / base[1]:>7.2f}{report_mb[n]:>12.0f}" if method != "naive" else ""
            print(f"{n:>6}{toks:>13,}  {method:<9}{min(w for w, _, _ in runs):>7.1f} / {wall:>6.1f}{cpu:>8.1f}"
                  f"{mem:>10.0f}{toks / wall / 1e6:>8.3f}" + extra)  # fmt: skip
    if args.extrapolate and args.extrapolate != sizes[-1]:
        f, toks = args.extrapolate / sizes[-1], args.extrapolate * args.samples * args.tokens
        fit = len(sizes) > 1  # peak memory: a line through the two largest sizes (it grows with the tokens)
        print(f"extrapolated linearly from {sizes[-1]} steps to {args.extrapolate} (time x {f:g}; peak memory "
              + (f"on the line through {sizes[-2]} and {sizes[-1]} steps):" if fit else "as measured):"))  # fmt: skip
        mem_at = {(n, method): mem for n, method, *_, mem, _ in rows}
        for n, method, _, wall, cpu, mem, _ in rows:
            if n == sizes[-1]:
                if fit:
                    slope = (mem - mem_at[(sizes[-2], method)]) / (sizes[-1] - sizes[-2])
                    mem = max(mem, mem + slope * (args.extrapolate - sizes[-1]))
                extra = f"{'':>15}{report_mb[n] * f:>12.0f}" if method != "naive" else ""
                print(f"{args.extrapolate:>6}{toks:>13,}  {method:<9}{'~':>7}   {wall * f:>6.0f}{cpu * f:>8.0f}"
                      f"{mem:>10.0f}{toks / (wall * f) / 1e6:>8.3f}" + extra)  # fmt: skip


if __name__ == "__main__":
    main()
