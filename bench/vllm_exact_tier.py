"""Cost of vLLM's full next-token rows: in-engine capture (trm-diag) vs prompt_logprobs=-1 (naive).

    .venv/bin/python bench/vllm_exact_tier.py [--seqs 8] [--tokens 128]

Part 1 scores the same prompt+response token ids with one vLLM engine (float32) in two
ways and checks they agree: trm-diag's logits capture (forward hook on logits_processor,
cost ~ the tensor size) and vLLM's own ``prompt_logprobs=-1`` (V Python objects per
position). Part 2 times `trm-diag compare` end to end for each fidelity tier, as whole
processes (wall seconds and peak RSS via GNU time). Both parts run on the bundled sample
(V = 2,048) and on a random tiny Llama with Qwen's vocabulary width (V = 151,936).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _memory import measure
from _models import wide_llama

from trm_diag.heap import tune_allocator

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "tiny-llama"


def part1(model: Path, seqs: int, tokens: int, naive_seqs: int) -> list[tuple]:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from trm_diag.backends import load_backend, parse_spec
    from trm_diag.config import SamplingConfig

    eng = load_backend(parse_spec(f"vllm:dtype=float32,model={model},kv_cache_memory_bytes=536870912"))
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(5, 1900, (16,), generator=g).tolist(), torch.randint(5, 1900, (tokens,), generator=g).tolist())
        for _ in range(seqs)
    ]
    s = SamplingConfig()
    eng.score(pairs[:1], s)  # warm-up
    rows, cap_s, cap_mb = measure(lambda: eng.score(pairs, s))
    n_tok = seqs * tokens
    out = [(model.name, eng.vocab_width, n_tok, "capture hook (trm-diag)", cap_s, n_tok / cap_s, cap_mb)]
    # naive: vLLM's own full-vocabulary prompt log-probs, as Python objects
    sub = pairs[:naive_seqs]
    reqs = [TokensPrompt(prompt_token_ids=p + r) for p, r in sub]
    gc.collect()
    params = SamplingParams(max_tokens=1, prompt_logprobs=-1, detokenize=False)
    res, naive_s, naive_mb = measure(lambda: eng.llm.generate(reqs, params, use_tqdm=False))
    n_naive = naive_seqs * tokens
    out.append(
        (model.name, eng.vocab_width, n_naive, "prompt_logprobs=-1 (naive)", naive_s, n_naive / naive_s, naive_mb)
    )
    # agreement: the two paths give the same log-probs on the response positions
    worst = 0.0
    for (p, r), rr, rw in zip(sub, res, rows):
        lp = rw.rows(0, rw.length)
        for t_i in range(0, len(r), max(1, len(r) // 16)):
            d = rr.prompt_logprobs[len(p) + t_i]
            ids = torch.tensor(list(d.keys()))
            vals = torch.tensor([v.logprob for v in d.values()])
            worst = max(worst, float((lp[t_i, ids] - vals).abs().max()))
    print(f"  {model.name}: max |capture - prompt_logprobs| over checked positions = {worst:.2e}", flush=True)
    eng.close()
    eng = rows = res = None  # free the engine before the next one starts
    gc.collect()
    return out


def part2(model: Path, n_prompts: int, max_new: int) -> list[tuple]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for tier in ("sampled", "topk", "exact"):
            cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "trm_diag", "compare", "--model", str(model),
                   "--rollout", "vllm:dtype=bfloat16,kv_cache_memory_bytes=536870912", "--train", "hf:dtype=float32",
                   "--fidelity", tier, "--num-prompts", str(n_prompts), "--max-new-tokens", str(max_new),
                   "--out", f"{tmp}/{tier}", "-q", "--json"]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if p.returncode != 0:
                raise SystemExit(p.stderr[-2000:])
            wall, rss_kb = p.stderr.strip().splitlines()[-1].split()
            import json

            s = json.loads(p.stdout)
            out.append(
                (
                    model.name,
                    tier,
                    s["metrics"]["n_tokens"],
                    float(wall),
                    s["timings"]["score_s"] + s["timings"]["rollout_rows_s"],
                    int(rss_kb) / 1024,
                )
            )
    return out


def main() -> None:
    tune_allocator()  # as the CLI does (trm_diag/heap.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--naive-seqs-wide", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory() as tmp:
        wide = wide_llama(Path(tmp) / "tiny-llama-v151936", max_positions=1024, peaked=True)
        rows1 = part1(SAMPLE, args.seqs, args.tokens, args.seqs)
        rows1 += part1(wide, args.seqs, args.tokens, args.naive_seqs_wide)
        print("\nPart 1: full next-token rows from vLLM (float32), same token ids")
        print(f"{'model':<22}{'V':>9}{'tokens':>8}  {'method':<28}{'seconds':>9}{'tokens/s':>11}{'peak extra MB':>15}")
        for m, v, n, meth, sec, tps, mb in rows1:
            print(f"{m:<22}{v:>9,}{n:>8}  {meth:<28}{sec:>9.3f}{tps:>11.0f}{mb:>15.0f}")
        rows2 = part2(SAMPLE, 48, 96) + part2(wide, 8, 64)
        print("\nPart 2: trm-diag compare, vllm bf16 rollout vs hf fp32 train, whole process")
        print(f"{'model':<22}{'tier':<9}{'tokens':>8}{'wall s':>9}{'scoring s':>11}{'peak RSS MB':>13}")
        for m, tier, n, wall, sc, mb in rows2:
            print(f"{m:<22}{tier:<9}{n:>8}{wall:>9.1f}{sc:>11.2f}{mb:>13.0f}")


if __name__ == "__main__":
    main()
