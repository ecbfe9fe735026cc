"""Shared fixtures: the bundled sample models, and tiny models built locally once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fuzz tests draw the same examples every run unless HYPOTHESIS_PROFILE=explore (README, Development):
# a CI run is reproducible, and new cases are hunted for on purpose, then pinned with @example
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# the native kernel is built afresh each session (exercises the build; ~0.2 s), never into ~/.cache
os.environ["TRM_DIAG_CACHE"] = tempfile.mkdtemp(prefix="trm-diag-cache-")
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


@pytest.fixture(scope="session")
def dense_model() -> Path:
    return SAMPLE / "tiny-llama"


@pytest.fixture(scope="session")
def moe_model() -> Path:
    return SAMPLE / "tiny-qwen3-moe"


@pytest.fixture(scope="session")
def prompts_file() -> Path:
    return SAMPLE / "prompts.jsonl"


@pytest.fixture(scope="session")
def wide_vocab_model(tmp_path_factory, dense_model) -> Path:
    """Random-init tiny Llama whose logits are 151,936 wide (Qwen's padded vocabulary) with the
    sample tokenizer (2,000 tokens): the 'logits wider than the tokenizer' case at real scale."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide-vocab")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peak the distributions like a trained model's
        model.model.embed_tokens.weight.mul_(40.0)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(dense_model).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mixtral_model(tmp_path_factory, dense_model) -> Path:
    """Random-init tiny Mixtral (4 experts, top-2) with the sample tokenizer: a second MoE architecture."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("tiny-mixtral")
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)
        for name, w in model.named_parameters():  # decisive routers, like trained ones (few exact bf16 ties)
            if name.endswith("gate.weight") and w.shape[0] == cfg.num_local_experts:
                w.mul_(2.0)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(dense_model).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_report(tmp_path_factory, dense_model) -> Path:
    """A small exact-tier compare report (hf bf16 vs fp32, 4 prompts x 2 samples x 6 tokens: 8 rollouts) for
    tests that only read a report; a test that changes one works on a copy."""
    from tests.helpers import main_exit

    out = tmp_path_factory.mktemp("small-report") / "r"
    assert main_exit(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "4",
                      "--samples", "2", "--max-new-tokens", "6", "--out", str(out), "-q"]) == 0  # fmt: skip
    return out
