"""Tiny models the bench scripts build locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "tiny-llama"


def wide_llama(path: Path, max_positions: int = 4096, peaked: bool = False) -> Path:
    """Random tiny Llama (2 layers, hidden 64) with Qwen's vocabulary width 151,936 and the sample tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if peaked:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(40.0)  # peaked distributions, like a trained model's
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(SAMPLE).save_pretrained(path)
    return path
