"""The transformers backend's batch shape: batch_size, padding_side and regroup_seed change how sequences are
batched, never which rows come back (in float32 up to its rounding), and one set of weights serves them all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trm_diag.backends import load_backend, parse_spec
from trm_diag.config import SamplingConfig
from trm_diag.errors import UsageError
from trm_diag.math.moe import compare_routing
from trm_diag.report.prompts import encode_prompt, load_prompts

SAMPLING = SamplingConfig(temperature=1.0)
# float32 rows of one model at two batch shapes: the same sums in another order (GEMM blocking by shape); measured
# on this CPU at 1.9e-6 in the log-probs of the bundled models, a few float32 ulps of values of order 10
F32_ATOL = 2e-5


def _pairs(backend, prompts_file, n=7, seed=0):
    """Prompts of unequal lengths with seeded random responses (scoring needs no sampling)."""
    rng = np.random.default_rng(seed)
    prompts = [encode_prompt(p, backend.tokenizer) for p in load_prompts(prompts_file)[:n]]
    return [(p, rng.integers(3, backend.vocab_width, int(rng.integers(2, 9))).tolist()) for p in prompts]


def _log_probs(backend, pairs):
    rows = backend.score(pairs, SAMPLING)
    return [
        rw.rows(0, rw.length).double().gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        for (_, r), rw in zip(pairs, rows)
    ]


@pytest.fixture(scope="module")
def dense_b1(dense_model):
    return load_backend(parse_spec(f"hf:dtype=float32,model={dense_model},batch_size=1"))


@pytest.mark.parametrize(
    "shape",
    [
        "batch_size=8",
        "batch_size=3,padding_side=left",
        "batch_size=8,padding_side=right",
        "batch_size=2,regroup_seed=5",
    ],
)
def test_every_batch_shape_gives_the_batch_1_rows_in_float32(dense_b1, prompts_file, dense_model, shape):
    pairs = _pairs(dense_b1, prompts_file)
    other = dense_b1.rebatched(parse_spec(f"hf:dtype=float32,model={dense_model},{shape}"))
    assert other is not None and other.model is dense_b1.model  # the same weights, not a second load
    for a, b in zip(_log_probs(dense_b1, pairs), _log_probs(other, pairs)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=0, atol=F32_ATOL)


def test_regrouping_permutes_the_batches_and_returns_the_callers_order(dense_b1, dense_model):
    spec = parse_spec(f"hf:dtype=float32,model={dense_model},batch_size=2,regroup_seed=5")
    regrouped = dense_b1.rebatched(spec)
    assert regrouped.batch_size == 8 and regrouped.micro_batch == 2  # a scoring call spans 4 micro-batches
    order = regrouped._order(8)
    assert sorted(order) == list(range(8)) and order != list(range(8)) and order == regrouped._order(8)
    assert regrouped._order(2) == [1, 0]  # never the identity
    other = dense_b1.rebatched(parse_spec(f"hf:dtype=float32,model={dense_model},batch_size=2,regroup_seed=6"))
    assert other._order(8) != order
    seen = []
    real = regrouped._score_batch
    regrouped._score_batch = lambda batch, s: seen.extend(len(r) for _, r in batch) or real(batch, s)
    pairs = [([1, 2], [5] * (i + 1)) for i in range(8)]  # response i has i + 1 tokens
    rows = regrouped.score(pairs, SAMPLING)
    assert seen == [order[j] + 1 for j in range(8)]  # batched in the permuted order
    assert [rw.length for rw in rows] == [i + 1 for i in range(8)]  # returned in the caller's


def test_rebatched_refuses_a_spec_that_changes_more_than_the_batch_shape(dense_b1, dense_model):
    assert dense_b1.rebatched(parse_spec(f"hf:dtype=bfloat16,model={dense_model},batch_size=8")) is None
    assert dense_b1.rebatched(parse_spec(f"hf:dtype=float32,model={dense_model},attn=eager")) is None


@pytest.mark.parametrize(
    "key,fix", [("padding_side=middle", "use one of: right, left"), ("regroup_seed=-1", "regroup_seed")]
)
def test_a_bad_batch_shape_key_is_one_usage_error(dense_model, key, fix):
    with pytest.raises(UsageError) as e:
        load_backend(parse_spec(f"hf:dtype=float32,model={dense_model},{key}"))
    assert fix in f"{e.value.problem} {e.value.fix}"


def test_moe_regrouping_keeps_every_expert_set_in_float32(moe_model, prompts_file):
    b1 = load_backend(parse_spec(f"hf:dtype=float32,model={moe_model},batch_size=1"))
    pairs = _pairs(b1, prompts_file, n=6, seed=1)
    regrouped = b1.rebatched(parse_spec(f"hf:dtype=float32,model={moe_model},batch_size=2,regroup_seed=1"))
    left = b1.rebatched(parse_spec(f"hf:dtype=float32,model={moe_model},batch_size=4,padding_side=left"))
    ref = b1.score(pairs, SAMPLING)
    k = b1.moe[1]
    for other in (regrouped, left):
        for a, b in zip(ref, other.score(pairs, SAMPLING)):
            assert a.routing is not None and a.routing.shape == b.routing.shape
            assert int(compare_routing(a.routing, b.routing, k).route_flips.sum()) == 0
            torch.testing.assert_close(b.routing, a.routing, rtol=0, atol=F32_ATOL)


def test_left_padding_counts_positions_from_each_sequences_first_token(dense_b1, dense_model):
    """RoPE models are blind to a constant shift of positions (measured: the rows agree without position ids too),
    so the position ids a left-padded batch passes are checked directly: 0 at each sequence's first real token."""
    left = dense_b1.rebatched(parse_spec(f"hf:dtype=float32,model={dense_model},batch_size=4,padding_side=left"))
    seen = {}
    hook = left._decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        left.score([([5, 6, 7, 8], [9, 10]), ([5], [9])], SAMPLING)
    finally:
        hook.remove()
    assert seen["attention_mask"].tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    assert seen["position_ids"].tolist() == [list(range(6)), [0, 0, 0, 0, 0, 1]]
