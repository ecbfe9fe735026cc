"""The transformers backend on the bundled sample models: scoring rows, sampling, padding, seeds."""

from __future__ import annotations

import pytest
import torch

from trm_diag.backends import load_backend, parse_spec
from trm_diag.config import SamplingConfig
from trm_diag.math.sampling import processed_logprobs, tempered_logprobs
from trm_diag.report.prompts import encode_prompt, load_prompts


@pytest.fixture(scope="module")
def fp32(dense_model):
    return load_backend(parse_spec(f"hf:dtype=float32,model={dense_model},batch_size=4"))


@pytest.fixture(scope="module")
def prompt_ids(fp32, prompts_file):
    return [encode_prompt(p, fp32.tokenizer) for p in load_prompts(prompts_file)[:6]]


def test_score_rows_equal_full_forward(fp32, prompt_ids):
    s = SamplingConfig(temperature=0.8, top_k=40, max_new_tokens=12, seed=1)
    rolls = fp32.generate(prompt_ids, s)
    rows = fp32.score([(r.prompt_ids, r.response_ids) for r in rolls], s)
    for r, rw in zip(rolls, rows):
        full = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = fp32.model(full).logits[0, len(r.prompt_ids) - 1 : -1, : fp32.vocab_width]
        ref = tempered_logprobs(logits, s)  # scoring rows: the untruncated tempered distribution
        got = rw.rows(0, rw.length)
        assert got.shape == (len(r.response_ids), 2048) and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        # decode-step log-probs (under the truncated distribution sampled from) agree with the teacher-forced pass
        lp_prefill = processed_logprobs(logits, s).gather(-1, torch.tensor(r.response_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp_prefill.double(), torch.tensor(r.lp_roll, dtype=torch.float64), rtol=0, atol=1e-4)


def test_same_seed_same_rollouts(fp32, prompt_ids):
    s = SamplingConfig(max_new_tokens=16, seed=7, samples_per_prompt=2)
    a, b = fp32.generate(prompt_ids, s), fp32.generate(prompt_ids, s)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    c = fp32.generate(prompt_ids, SamplingConfig(max_new_tokens=16, seed=8, samples_per_prompt=2))
    assert [r.response_ids for r in a] != [r.response_ids for r in c]
    assert len(a) == 12 and {r.sample_idx for r in a} == {0, 1}


def test_left_padding_does_not_change_greedy_rollouts(fp32, prompt_ids):
    s = SamplingConfig(temperature=0, max_new_tokens=16)
    batched = fp32.generate(prompt_ids, s)  # prompts of different lengths, left padded
    for i, ids in enumerate(prompt_ids):
        alone = fp32.generate([ids], s)[0]
        assert alone.response_ids == batched[i].response_ids
        torch.testing.assert_close(torch.tensor(alone.lp_roll), torch.tensor(batched[i].lp_roll), rtol=0, atol=1e-4)


def test_responses_stop_at_eos(fp32, prompt_ids):
    rolls = fp32.generate(prompt_ids, SamplingConfig(max_new_tokens=80, seed=0))
    for r in rolls:
        if r.finish_reason == "stop":
            assert r.response_ids[-1] in fp32.eos_ids and not set(r.response_ids[:-1]) & fp32.eos_ids
        else:
            assert len(r.response_ids) == 80
    assert any(r.finish_reason == "stop" for r in rolls), "the trained sample model should finish its traces"


def test_padded_vocab_is_explicit(fp32):
    assert fp32.vocab_width == 2048 and len(fp32.tokenizer) == 2000  # logits wider than the tokenizer


def test_float64_scores_stay_float64_and_match_the_fp32_model(fp32, dense_model, prompt_ids):
    f64 = load_backend(parse_spec(f"hf:dtype=float64,model={dense_model}"))
    seqs = [(prompt_ids[0], prompt_ids[1][:7])]
    s64 = f64.score(seqs, SamplingConfig())[0].scores(0, 7)
    s32 = fp32.score(seqs, SamplingConfig())[0].scores(0, 7)
    assert s64.dtype == torch.float64 and s32.dtype == torch.float32
    assert 0 < (s64 - s32.double()).abs().max() < 1e-4  # fp32 rounding, nothing more


def test_lm_head_dtype_gives_an_fp32_head_on_a_bf16_body(dense_model, prompt_ids):
    spec = f"hf:dtype=bfloat16,lm_head_dtype=fp32,model={dense_model}"
    mixed = load_backend(parse_spec(spec))
    plain = load_backend(parse_spec(f"hf:dtype=bfloat16,model={dense_model}"))
    assert mixed._head.weight.dtype == torch.float32
    assert mixed.model.get_input_embeddings().weight.dtype == torch.bfloat16  # a tied embedding keeps its dtype
    seqs = [(prompt_ids[0], prompt_ids[1][:7])]
    a, b = mixed.score(seqs, SamplingConfig())[0].scores(0, 7), plain.score(seqs, SamplingConfig())[0].scores(0, 7)
    assert a.dtype == torch.float32 and not torch.equal(a, b) and (a - b).abs().max() < 0.1
    rollouts = mixed.generate(prompt_ids[:2], SamplingConfig(max_new_tokens=4, topk=0))  # samples through it too
    assert all(len(r.response_ids) >= 1 for r in rollouts)
    with pytest.raises(Exception, match="lm_head_dtype=int8"):
        load_backend(parse_spec(f"hf:dtype=bfloat16,lm_head_dtype=int8,model={dense_model}"))


@pytest.mark.parametrize("which", ["moe_model", "mixtral_model"])
def test_float64_moe_models_score_and_sample_in_float64(which, request, prompt_ids):
    """transformers' default grouped expert matmul has no float64 kernel: a float64 MoE model (a sweep's
    default reference) runs its experts one by one, in float64, and agrees with the fp32 model to its rounding."""
    model = request.getfixturevalue(which)
    f64 = load_backend(parse_spec(f"hf:dtype=float64,model={model}"))
    f32 = load_backend(parse_spec(f"hf:dtype=float32,model={model}"))
    seqs = [(prompt_ids[0], prompt_ids[1][:7]), (prompt_ids[2], prompt_ids[3][:5])]
    rows64, rows32 = f64.score(seqs, SamplingConfig()), f32.score(seqs, SamplingConfig())
    for a, b in zip(rows64, rows32):
        s64, s32 = a.scores(0, a.length), b.scores(0, b.length)
        assert s64.dtype == torch.float64 and s32.dtype == torch.float32
        # the same routing, and fp32 rounding apart (log-softmax rows, so the per-row constant cancels)
        assert a.routing is not None and torch.equal(a.routing.argmax(-1), b.routing.argmax(-1))
        diff = torch.log_softmax(s64, -1) - torch.log_softmax(s32.double(), -1)
        assert 0 < diff.abs().max() < 1e-4  # fp32 eps x logits of ~16 x a few layers
    rolled = f64.generate(prompt_ids[:2], SamplingConfig(max_new_tokens=4, seed=0))
    assert all(1 <= len(r.response_ids) <= 4 and all(x <= 0 for x in r.lp_roll) for r in rolled)
