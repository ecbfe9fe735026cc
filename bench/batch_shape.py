"""Batch shape as a mismatch axis: the trainer against itself at batch size 1 (`sweep --arms batch`).

For each (model, dtype) it runs the batch preset through the real sweep (`run_sweep`, no reference) and
prints, per arm, the share of tokens whose rho = exp(lp_train - lp_roll) leaves [0.9, 1.1], the largest
|log rho|, the share of tokens not bit-equal to batch size 1, PPO/DAPO clip-status flips and, for MoE
models, the share of tokens whose expert set changes. The machine and the date go first (bench/RESULTS.md).

    .venv/bin/python bench/batch_shape.py                        # both sample models, bf16 and fp32
    .venv/bin/python bench/batch_shape.py --num-prompts 16 --max-new-tokens 32 --models tiny-llama
    .venv/bin/python bench/batch_shape.py --samples 8 --max-new-tokens 128 --dtypes bfloat16   # ~45k tokens a model
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from trm_diag.backends import parse_spec
from trm_diag.config import SamplingConfig
from trm_diag.run.sweep import SweepConfig, run_sweep

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def machine() -> str:
    """CPU model and date (lscpu's model name where it exists)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {datetime.date.today().isoformat()}"


def run_one(model: str, dtype: str, args: argparse.Namespace, out: Path) -> list[dict]:
    spec = f"hf:dtype={dtype}"
    cfg = SweepConfig(
        rollout=parse_spec(spec), train=parse_spec(spec), presets=("batch",), reference=None,
        model=str(SAMPLE / model), prompts=str(SAMPLE / "prompts.jsonl"), out=str(out), overwrite=True,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, samples_per_prompt=args.samples),
        num_prompts=args.num_prompts,
    )  # fmt: skip
    result = run_sweep(cfg)
    rows = []
    for r in result.summary["table"][1:]:
        if r["status"] != "done":
            rows.append({"model": model, "dtype": dtype, "arm": r["arm"], "status": r["status"]})
            continue
        tokens = pd.read_parquet(out / r["arm"] / "tokens.parquet", columns=["log_ratio"])
        lr = tokens["log_ratio"].to_numpy(dtype=np.float64)
        rows.append({
            "model": model, "dtype": dtype, "arm": r["arm"], "tokens": len(lr),
            "outside [0.9,1.1]": r["outside_band"], "not bit-equal": float(np.mean(lr != 0)),
            "max |log rho|": r["abs_log_ratio_max"], "ppo flip A>0": r["ppo_clip_flip_pos"],
            "ppo flip A<0": r["ppo_clip_flip_neg"], "dapo flip A>0": r["dapo_clip_flip_pos"],
            "route flips": r["route_flip_share"],
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-llama,tiny-qwen3-moe")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1, help="rollouts sampled per prompt (more tokens, same prompts)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {machine()}; torch CPU threads as configured")
    rows = []
    with tempfile.TemporaryDirectory(prefix="trm-batch-") as tmp:
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                rows += run_one(model, dtype, args, Path(tmp) / f"{model}-{dtype}")
                print(pd.DataFrame(rows[-6:]).to_string(index=False), flush=True)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r.get(c, ''):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
