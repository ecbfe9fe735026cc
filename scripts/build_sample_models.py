"""Build the bundled sample models in sample_data/ (deterministic; CI never runs this).

    python scripts/build_sample_models.py [--steps 600] [--only dense|moe]

1. Generates a corpus of step-by-step arithmetic and list-manipulation traces, half in
   a chat format, from a fixed seed.
2. Trains a byte-level BPE tokenizer on it (with a chat template).
3. Trains a tiny Llama (dense) and a tiny Qwen3-MoE for a few hundred steps on CPU, so
   their next-token distributions are peaked like a real model's, not near-uniform.
   The logits are padded to a multiple of 64 beyond the tokenizer, as in real
   checkpoints (Qwen pads 151,665 tokens to 151,936).
4. Saves each as safetensors (float32) with the tokenizer, and writes the prompt files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sample_data"
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SEQ_LEN = 128


# ---------------------------------------------------------------- corpus
def add_trace(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}.")
        carry, digits = s // 10, digits + [s % 10]
    if carry:
        digits.append(carry)
    ans = "".join(map(str, digits[::-1]))
    return f"What is {a}+{b}?", " ".join(steps) + f" So {a}+{b}={ans}."


def sub_trace(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
    return f"What is {a}-{b}?", f"Start at {a}. Take away {b}. {a}-{b}={a - b}. So the answer is {a - b}."


def mul_trace(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    t, u = divmod(b, 10)
    return (
        f"What is {a}*{b}?",
        f"{a}*{t}0={a * t * 10}. {a}*{u}={a * u}. {a * t * 10}+{a * u}={a * b}. So {a}*{b}={a * b}.",
    )


def list_trace(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    op = rng.choice(["sort", "reverse", "max", "sum"])
    shown = "[" + ", ".join(map(str, xs)) + "]"
    if op == "sort":
        return f"Sort {shown}.", f"The sorted list is [{', '.join(map(str, sorted(xs)))}]."
    if op == "reverse":
        return f"Reverse {shown}.", f"The reversed list is [{', '.join(map(str, xs[::-1]))}]."
    if op == "max":
        return f"What is the max of {shown}?", f"Compare one by one. The max is {max(xs)}."
    run, parts = 0, []
    for x in xs:
        run += x
        parts.append(str(run))
    return f"What is the sum of {shown}?", f"Running sums: {', '.join(parts)}. The sum is {run}."


TRACES = [add_trace, sub_trace, mul_trace, list_trace]


def example(rng: random.Random) -> str:
    q, a = rng.choice(TRACES)(rng)
    if rng.random() < 0.5:
        return f"<|user|>\n{q}\n<|assistant|>\n{a}<|endoftext|>"
    return f"Q: {q}\nA: {a}<|endoftext|>"


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [example(rng) for _ in range(n)]


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------- models
def padded(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


def dense_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def moe_config(vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def batches(ids: list[int], batch: int, rng: torch.Generator):
    data = torch.tensor(ids[: (len(ids) // SEQ_LEN) * SEQ_LEN]).view(-1, SEQ_LEN)
    while True:
        order = torch.randperm(data.shape[0], generator=rng)
        for s in range(0, len(order) - batch + 1, batch):
            yield data[order[s : s + batch]]


def train(model, ids: list[int], steps: int, lr: float, moe: bool, log: str) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    it = batches(ids, 32, gen)
    model.train()
    t0 = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = next(it)
        out = model(input_ids=x, labels=x, output_router_logits=moe) if moe else model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"[{log}] step {step:4d} loss {out.loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def save(model, tok, name: str) -> None:
    path = OUT / name
    path.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"saved {path} ({size / 2**20:.2f} MiB safetensors)")
    assert size <= 8 * 2**20, "sample model must stay under 8 MB"


# ---------------------------------------------------------------- prompts
def write_prompts() -> None:
    rng = random.Random(12345)
    plain, chat = [], []
    for i in range(24):
        q, _ = TRACES[i % len(TRACES)](rng)
        plain.append({"prompt": f"Q: {q}\nA:"})
    for i in range(24):
        q, _ = TRACES[(i + 1) % len(TRACES)](rng)
        msgs = [{"role": "user", "content": q}]
        chat.append({"messages": msgs})
    mixed = [x for pair in zip(plain, chat) for x in pair]
    with open(OUT / "prompts.jsonl", "w") as f:
        for row in mixed:
            f.write(json.dumps(row) + "\n")
    with open(OUT / "prompts.txt", "w") as f:
        for row in plain[:8]:
            f.write(row["prompt"].replace("\n", "\\n") + "\n")
    print(f"wrote {len(mixed)} prompts to {OUT / 'prompts.jsonl'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", choices=["dense", "moe"], default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(exist_ok=True)
    texts = corpus(40_000, seed=7)
    tok = build_tokenizer(texts, vocab_size=2000)
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"])
    vocab = padded(len(tok))
    print(f"corpus {len(ids)} tokens; tokenizer {len(tok)} tokens; logits padded to {vocab}")
    from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

    if args.only in (None, "dense"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(dense_config(vocab))
        train(model, ids, args.steps, 3e-3, moe=False, log="dense")
        save(model, tok, "tiny-llama")
    if args.only in (None, "moe"):
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(moe_config(vocab))
        train(model, ids, args.steps, 3e-3, moe=True, log="moe")
        save(model, tok, "tiny-qwen3-moe")
    write_prompts()


if __name__ == "__main__":
    main()
