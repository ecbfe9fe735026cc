"""Per-update cost of trm_diag.Monitor against a training step of the bundled model (forward + backward of
the same [B, T] batch), as a ratio, next to a naive per-sequence loop (a host copy per sequence and tensor).

    .venv/bin/python bench/monitor.py                 # B in 8, 64, 256; T in 256, 4096 (cells that fit)
    .venv/bin/python bench/monitor.py --cells 8x256,64x256
    .venv/bin/python bench/monitor.py --cells 8x256,64x256 --no-step [--first-built]   # the update alone

--first-built times the update as it was first built (the step's tables as pandas DataFrames, torch's CPU
threads left as they are instead of 1): run it and the default back to back for a before / after. --no-step
skips the training step (the update's cost alone). A cell whose training step would not fit this machine
(logits of B x T x V floats, kept for backward) is skipped and said so. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_data" / "tiny-llama"
MAX_TOKENS_TRAIN = 70_000  # tokens per training step this bench runs (the logits and their gradient: ~1.2 GB)


def _time(fn, repeat: int) -> float:
    fn()  # warm
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def first_built() -> None:
    """The update as first built, for a before / after comparison: the step's tables as pandas DataFrames
    (batch_metrics reads them the same way)."""
    import pandas as pd

    from trm_diag.math import step_metrics

    step_metrics.frame = lambda cols, n_rows: pd.DataFrame(cols, copy=False)


def naive(lp_roll: torch.Tensor, lp_train: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The usual loop: per sequence, copy its tokens to the host and accumulate verl's kl, k3_kl and |lr| max."""
    k1 = k3 = 0.0
    n = 0
    mx = 0.0
    for i in range(lp_roll.shape[0]):
        m = mask[i].cpu()
        a = lp_roll[i].cpu()[m].double()
        b = lp_train[i].cpu()[m].double()
        lr = b - a
        k1 += float((-lr).sum())
        k3 += float((torch.expm1(lr) - lr).sum())
        mx = max(mx, float(lr.abs().max()))
        n += int(m.sum())
    return {"kl": k1 / n, "k3_kl": k3 / n, "abs_log_ratio_max": mx}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="8x256,64x256,256x256,8x4096,64x4096,256x4096")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--first-built", action="store_true", help="time the update as first built (before / after)")
    ap.add_argument("--no-step", action="store_true", help="skip the training step (time the update only)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from trm_diag import Monitor

    torch.manual_seed(0)
    model = None if args.no_step else AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    V = model.config.vocab_size if model is not None else 0
    if args.first_built:
        first_built()
    mon = Monitor(horizons=(1024, 4096, 16384), cpu_threads=None if args.first_built else 1)
    rows = []
    for cell in args.cells.split(","):
        B, T = (int(x) for x in cell.split("x"))
        g = torch.Generator().manual_seed(B * T)
        lp_roll = -torch.rand(B, T, generator=g) * 3
        lp_train = lp_roll + 0.01 * torch.randn(B, T, generator=g)
        mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (B,), generator=g)[:, None]
        batch = (lp_roll, lp_train, mask)
        t_mon = _time(lambda b=batch: mon.update(0, *b), args.repeat)
        t_naive = _time(lambda b=batch: naive(*b), args.repeat)
        if args.no_step:
            rows.append((B, T, t_mon, t_naive, None, "step not run (--no-step)"))
            continue
        if B * T > MAX_TOKENS_TRAIN:
            rows.append((B, T, t_mon, t_naive, None, f"skipped: {B * T:,} tokens x V {V} logits + grad > this box"))
            continue
        ids = torch.randint(3, V, (B, T), generator=g)

        def step(ids: torch.Tensor = ids) -> None:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        t_step = _time(step, max(1, args.repeat - 1))
        rows.append((B, T, t_mon, t_naive, t_step, ""))
    print("update as first built (pandas frames, torch threads as they are)" if args.first_built else "update")
    print(f"{'B':>4} {'T':>5} {'update ms':>10} {'naive ms':>9} {'step ms':>9} {'update/step':>12} {'naive/step':>11}")
    for B, T, tm, tn, ts, note in rows:
        ratio = f"{tm / ts:.2%}" if ts else "-"
        nratio = f"{tn / ts:.2%}" if ts else "-"
        step = f"{ts * 1e3:9.1f}" if ts else f"{'-':>9}"
        print(f"{B:>4} {T:>5} {tm * 1e3:10.2f} {tn * 1e3:9.1f} {step} {ratio:>12} {nratio:>11}  {note}")


if __name__ == "__main__":
    main()
