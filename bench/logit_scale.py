"""Why a batch shape can leave rho's band or not: the bf16 resolution of the sampled tokens' logits.

A bf16 model's logits come out of the LM head rounded to bf16 (8 significant bits): at |logit| in [8, 16) one
rounding step is 2^-4 = 0.0625, in [16, 32) it is 0.125. The sampled token's log-prob log p_y = z_y - LSE(z)
moves by about (1 - p_y) dz_y - sum_{j != y} p_j dz_j: a step of its own logit reaches it in full only when
the token is not near-certain (for p_y ~ 1 the log-sum-exp follows z_y and the step cancels). So batch 1 and
batch 8 disagreeing by one step leave [0.9, 1.1] (|log rho| > ~0.095) only at logits of 16 and more, on tokens
with p_y well below 1. This prints, per sample model, the sampled tokens' |logit| quantiles, how many logits
changed by 1, 2, 3 or more steps between batch 1 and batch 8 (right padding, the plain transformers forward a
trainer runs), and the largest 1 - p_y among changed logits of 16 and more, with the machine first.

    .venv/bin/python bench/logit_scale.py                      # both sample models, 48 prompts x 64 tokens
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from batch_shape import machine  # bench/ is on sys.path when this runs as a script

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def logits_at(model: torch.nn.Module, seqs: list[torch.Tensor], bs: int) -> list[torch.Tensor]:
    """Each sequence's logits (positions 0..n-2, predicting tokens 1..n-1) from batches of `bs`, right-padded."""
    out = []
    for i in range(0, len(seqs), bs):
        chunk = seqs[i : i + bs]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)], att[j, : len(s)] = s, 1
        logits = model(input_ids=ids, attention_mask=att).logits
        out += [logits[j, : len(s) - 1] for j, s in enumerate(chunk)]
    return out


def one(name: str, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SAMPLE / name
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = [json.loads(line) for line in (SAMPLE / "prompts.jsonl").read_text().splitlines() if line.strip()]
    texts = [r.get("prompt") or r["messages"][-1]["content"] for r in rows][: args.num_prompts]
    torch.manual_seed(args.seed)
    with torch.no_grad():
        seqs = [
            model.generate(tok(t, return_tensors="pt")["input_ids"], do_sample=True,
                           max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id or 0)[0]
            for t in texts
        ]  # fmt: skip
        a, b = logits_at(model, seqs, 1), logits_at(model, seqs, 8)
    mag, steps, dlp, prob = [], [], [], []
    for s, la, lb in zip(seqs, a, b):
        y = s[1:, None]
        ya, yb = la.gather(-1, y)[:, 0].double(), lb.gather(-1, y)[:, 0].double()
        lpa = ya - torch.logsumexp(la.double(), -1)
        lpb = yb - torch.logsumexp(lb.double(), -1)
        ulp = torch.exp2(torch.floor(torch.log2(ya.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
        mag.append(ya.abs()), steps.append(((yb - ya).abs() / ulp).round()), dlp.append((lpb - lpa).abs())
        prob.append(lpa.exp())
    mag, steps, dlp, prob = (torch.cat(x).numpy() for x in (mag, steps, dlp, prob))
    big = (steps > 0) & (mag >= 16)
    q = np.quantile(mag, [0.5, 0.9, 1.0])
    return {
        "model": name, "tokens": len(mag), "|logit| p50": q[0], "p90": q[1], "max": q[2],
        "share >= 16": float(np.mean(mag >= 16)), "lp not bit-equal": float(np.mean(dlp > 0)),
        "logit +-1 step": int(np.sum(steps == 1)), "+-2": int(np.sum(steps == 2)), "+-3 or more": int(np.sum(steps >= 3)),
        "changed logits >= 16": int(np.sum(big)), "their 1 - p_y max": float(1 - prob[big].min()) if big.any() else "-",
        "max |log rho|": float(dlp.max()),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-llama,tiny-qwen3-moe")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    rows = [one(m, args) for m in args.models.split(",")]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
