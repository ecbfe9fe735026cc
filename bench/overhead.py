"""Overhead of trm-diag's scoring over a bare teacher-forced forward of the training backend.

    .venv/bin/python bench/overhead.py

Bare: what an RL trainer runs anyway, batched like trm-diag: model(prompt + response).logits,
log_softmax and a gather of the sampled tokens' log-probs. trm-diag (exact tier, training
side): the same forward through HFBackend.score (decoder once, head in chunks) plus every
per-token diagnostic (exact kl, kl_rev, tv, entropies, sampled-token metrics) from the two
sides' rows; the rollout side's rows are given (they come from the rollout engine's own
pass). Same token ids, same batches, float32; bare and each trm-diag mode run in turn, 7 rounds
after a warm-up round, best of each (this VM's speed drifts by 10-20% over a minute).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from _models import ROOT, wide_llama

from trm_diag.heap import tune_allocator


def interleaved(fns: dict[str, tuple[str, object]], repeats: int = 7) -> dict[str, float]:
    """Best time of each fn over `repeats` rounds that run every fn once in turn, so slow phases of a
    shared machine hit all of them alike. fns: name -> (TRM_DIAG_KERNEL, fn)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):  # the first round warms up (and compiles)
        for name, (mode, fn) in fns.items():
            os.environ["TRM_DIAG_KERNEL"] = mode
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: min(v[1:]) for k, v in times.items()}


def run(model: Path, n_seqs: int, resp_len: int, label: str, modes: dict[str, str]) -> None:
    """One bare baseline per model, then trm-diag with each TRM_DIAG_KERNEL."""
    from trm_diag.backends import load_backend, parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.math.scoring import batch_columns
    from trm_diag.types import Rollout, TensorRows

    hf = load_backend(parse_spec(f"hf:dtype=float32,model={model},batch_size=8"))
    s = SamplingConfig()
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(5, 1900, (24,), generator=g).tolist(), torch.randint(5, 1900, (resp_len,), generator=g).tolist())
        for _ in range(n_seqs)
    ]
    rolls = [Rollout(i, i, 0, p, r, [-1.0] * len(r), "length") for i, (p, r) in enumerate(pairs)]
    given = [TensorRows(rw.rows(0, rw.length).clone()) for rw in hf.score(pairs, s)]  # the rollout side's rows

    def bare():
        with torch.inference_mode():
            for b in range(0, n_seqs, 8):
                batch = pairs[b : b + 8]
                ids = torch.tensor([p + r for p, r in batch])  # equal lengths: no padding needed
                logits = hf.model(ids).logits[:, len(batch[0][0]) - 1 : -1]
                lp = torch.log_softmax(logits.float(), -1)
                lp.gather(-1, torch.tensor([r for _, r in batch])[..., None])

    def ours():  # as the pipeline: score a batch, then all its diagnostics in one batch_columns call
        for b in range(0, n_seqs, 8):
            rows = hf.score(pairs[b : b + 8], s)
            batch_columns(rolls[b : b + 8], given[b : b + 8], rows, "exact", hf.vocab_width)

    alone = interleaved({"bare": ("eager", bare)}, repeats=5)["bare"]  # its best case: nothing in between
    best = interleaved({"bare": ("eager", bare), **{name: (mode, ours) for name, mode in modes.items()}})
    tb = min(alone, best["bare"])  # the faster bare: the overhead is never flattered
    for name in modes:
        to = best[name]
        print(f"{label + ', ' + name:<48}{n_seqs * resp_len:>8}{tb:>10.3f}{to:>10.3f}{100 * (to / tb - 1):>10.0f}%")


def main() -> None:
    tune_allocator()  # as the CLI does (trm_diag/heap.py)
    print(f"{'model, kernel':<48}{'tokens':>8}{'bare s':>10}{'trm s':>10}{'overhead':>11}")
    kernels = {"eager": "eager", "inductor": "inductor", "native C (default)": "native"}
    run(ROOT / "sample_data" / "tiny-llama", 64, 128, "bundled (V=2,048)", kernels)
    with tempfile.TemporaryDirectory() as tmp:
        path = wide_llama(Path(tmp) / "wide")
        run(path, 16, 128, "V=151,936", kernels)


if __name__ == "__main__":
    main()
