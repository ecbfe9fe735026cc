"""Long horizons at full vocabulary: peak memory and time per token of `compare`'s exact tier against T.

    .venv/bin/python bench/long_horizon.py [--tokens 256,1024,4096] [--in-ram 256,1024] [--before DIR]

vLLM bf16 rollouts against transformers fp32, exact tier, on a random tiny Llama with Qwen's vocabulary
width (V = 151,936; bench/_models.py wide_llama), 8 prompts, responses of each length (the model's EOS
is one id in 151,936, so responses run to the limit). Each run is a whole `trm-diag compare` process
under GNU time (wall, CPU time, peak RSS); summary.json's run.memory says the mode, the bytes spilled and the time
spent on it. Runs: the default memory budget at every length, and for --in-ram lengths a budget no run
reaches (the in-RAM path). --before DIR runs the same command with the code in DIR (e.g. `git worktree`
of an older commit) at the --in-ram lengths. A watchdog kills any run whose process tree passes
--max-rss-gib (10 by default: this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _models import wide_llama

ROOT = Path(__file__).resolve().parent.parent
ROLLOUT = "vllm:dtype=bfloat16,kv_cache_memory_bytes=536870912"


def _watch(pid: int, limit: int, stop: threading.Event, seen: list[int]) -> None:
    """Kill the run when its processes' RSS passes ``limit`` bytes."""
    while not stop.is_set():
        try:
            p = psutil.Process(pid)
            rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return
        seen[0] = max(seen[0], rss)
        if rss > limit:
            for q in [*p.children(recursive=True), p]:
                q.kill()
            return
        time.sleep(0.05)


def run(model: Path, out: Path, tokens: int, budget: str | None, code: Path, limit: int) -> dict:
    cmd = ["/usr/bin/time", "-f", "%e %M %U %S", sys.executable, "-m", "trm_diag", "compare", "--model", str(model),
           "--rollout", ROLLOUT, "--train", "hf:dtype=float32", "--fidelity", "exact", "--num-prompts", "8",
           "--max-new-tokens", str(tokens), "--out", str(out), "--overwrite", "-q", "--json"]  # fmt: skip
    if budget is not None:
        cmd += ["--memory-budget", budget]
    env = {**os.environ, "PYTHONPATH": str(code), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("TRM_DIAG_MEMORY_BUDGET", None)
    # run from the code's folder: `python -m` puts the working folder first on sys.path
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
    stop, seen = threading.Event(), [0]
    watcher = threading.Thread(target=_watch, args=(proc.pid, limit, stop, seen), daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    stop.set()
    if proc.returncode != 0:
        killed = seen[0] > limit
        return {"error": "killed above the RSS limit" if killed else stderr.strip().splitlines()[-1][-300:]}
    wall, rss_kb, user, system = stderr.strip().splitlines()[-1].split()
    s = json.loads(stdout)
    mem = s.get("run", {}).get("memory", {})
    return {"n": s["metrics"]["n_tokens"], "wall": float(wall), "cpu": float(user) + float(system), "rss": int(rss_kb) * 1024, "mode": mem.get("mode", "-"),
            "spilled": mem.get("spilled_bytes", 0), "spill_s": mem.get("spill_s", 0.0),
            "step": mem.get("engine_step_tokens"), "timings": s["timings"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--in-ram", default="256,1024", help="lengths also run with a budget no run reaches")
    ap.add_argument("--before", type=Path, help="a checkout of the code before the change (run at --in-ram lengths)")
    ap.add_argument("--max-rss-gib", type=float, default=10.0)
    args = ap.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]
    in_ram = {int(x) for x in args.in_ram.split(",") if x}
    limit = int(args.max_rss_gib * 2**30)
    plan = [(t, "default", None, ROOT) for t in lengths]
    plan += [(t, "in RAM (64GiB)", "64GiB", ROOT) for t in lengths if t in in_ram]
    if args.before:
        plan += [(t, "before the change", None, args.before) for t in lengths if t in in_ram]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = wide_llama(Path(tmp) / "wide", max_positions=max(lengths) + 512, peaked=True)
        for t, label, budget, code in sorted(plan, key=lambda p: (p[0], p[1])):
            r = run(model, Path(tmp) / "out", t, budget, code, limit)
            rows.append((t, label, r))
            print(t, label, {k: v for k, v in r.items() if k != "timings"}, flush=True)
    print(f"\n{'T':>6} {'run':<20}{'tokens':>8}{'wall s':>8}{'ms/token':>10}{'cpu ms/tok':>11}{'peak RSS':>10}{'spilled':>10}"
          f"{'spill s':>9}  mode")  # fmt: skip
    for t, label, r in rows:
        if "error" in r:
            print(f"{t:>6} {label:<20}  {r['error']}")
            continue
        print(f"{t:>6} {label:<20}{r['n']:>8,}{r['wall']:>8.1f}{1000 * r['wall'] / r['n']:>10.2f}{1000 * r['cpu'] / r['n']:>11.2f}"
              f"{r['rss'] / 2**30:>9.2f}G{r['spilled'] / 2**30:>9.2f}G{r['spill_s']:>9.2f}  {r['mode']}")  # fmt: skip
    print(
        "\nbefore (issue 34, 2026-12-06, AVX2 EPYC): T=256 2,048 tokens 48 s 3.7 GB; T=1,024 8,192 tokens 114 s 9.2 GB"
    )


if __name__ == "__main__":
    main()
