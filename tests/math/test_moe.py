"""moe.py against naive recomputation; routing reports on two MoE architectures in transformers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from trm_diag.cli import main
from trm_diag.math.moe import compare_routing, moe_shape, routing_summary, select_experts


def test_select_experts_matches_argsort():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 8, generator=g)
    experts, margin = select_experts(logits, 2)
    probs = torch.softmax(logits, -1).numpy()
    for idx in np.ndindex(3, 50):
        order = np.argsort(-probs[idx])
        assert sorted(order[:2].tolist()) == experts[idx].tolist()
        assert margin[idx].item() == pytest.approx(probs[idx][order[1]] - probs[idx][order[2]], abs=1e-6)


def test_compare_routing_flags_set_changes_only():
    a = torch.tensor([[[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])  # (1 layer, 2 tokens, 4 experts)
    b = torch.tensor([[[2.0, 3.0, 1.0, 0.0], [0.0, 2.5, 2.0, 3.0]]])  # same set (order swapped) / new set
    c = compare_routing(a, b, 2)
    assert c.flip.tolist() == [[False, True]]
    assert c.route_flips.tolist() == [0, 1]
    assert np.isnan(c.route_margin[0]) and c.route_margin[1] > 0


def test_routing_summary():
    flips = np.array([0, 1, 0, 2])
    s = routing_summary(flips, np.array([1, 2]), np.array([0.1, 5.0, 0.2, 7.0]), np.array([0.01, 1.0, 0.02, 2.0]))
    assert s["token_any_flip_rate"] == 0.5 and s["flip_rate"] == pytest.approx(3 / 8)
    assert s["kl_flip"]["mean"] == pytest.approx(6.0) and s["kl_no_flip"]["max"] == pytest.approx(0.2)
    assert (
        moe_shape({"num_local_experts": 4, "num_experts_per_tok": 2}) == (4, 2) and moe_shape({"vocab_size": 3}) is None
    )


def compare(out, model, rollout, train="hf:dtype=float32"):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", str(model), "--rollout", rollout, "--train", train, "--out", str(out),
              "--num-prompts", "12", "--max-new-tokens", "32", "-q"])  # fmt: skip
    assert e.value.code == 0
    return (pd.read_parquet(out / "tokens.parquet"), json.loads((out / "summary.json").read_text()), out)


@pytest.mark.parametrize("which", ["moe_model", "mixtral_model"])
def test_identical_specs_give_zero_flips(tmp_path, request, which):
    model = request.getfixturevalue(which)
    tok, s, out = compare(tmp_path, model, "hf:dtype=float32,batch_size=3")
    assert s["routing"]["available"] and s["routing"]["flip_rate"] == 0.0
    assert (tok["route_flips"] == 0).all()
    routing = pd.read_parquet(out / "routing.parquet")
    assert not routing["flip"].any() and len(routing) == len(tok) * s["routing"]["n_layers"]


@pytest.mark.parametrize("which", ["moe_model", "mixtral_model"])
def test_bf16_flips_match_direct_recomputation(tmp_path, request, which):
    from trm_diag.backends import load_backend, parse_spec
    from trm_diag.config import SamplingConfig

    model = request.getfixturevalue(which)
    trained = which == "moe_model"  # the bundled, trained MoE; the Mixtral is random-init
    tok, s, out = compare(tmp_path, model, "hf:dtype=bfloat16")
    assert s["routing"]["available"]
    assert 'alt="MoE routing flips per layer"' in (out / "report.html").read_text()  # report.html's MoE figure
    if trained:
        assert s["routing"]["token_any_flip_rate"] > 0 and tok["route_flips"].sum() > 0
    # recompute from router logits: same token ids, same batches, independent top-k comparison
    seqs = pd.read_parquet(out / "sequences.parquet")
    pairs = [(list(p), list(r)) for p, r in zip(seqs["prompt_token_ids"], seqs["response_token_ids"])]
    k = s["routing"]["experts_per_token"]
    rows = {}
    for spec in ("hf:dtype=bfloat16", "hf:dtype=float32"):
        b = load_backend(parse_spec(f"{spec},model={model}"))
        rows[spec] = [x.routing.numpy() for x in b.score(pairs, SamplingConfig())]
    direct, tied = [], []
    for a, c in zip(rows["hf:dtype=bfloat16"], rows["hf:dtype=float32"]):  # (layers, T, E) each
        sets, tie = [], np.zeros(a.shape[1], dtype=bool)
        for x in (a, c):
            p = torch.softmax(torch.from_numpy(x), -1).numpy()  # the models route on float32 probabilities
            srt = np.sort(p, axis=-1)[..., ::-1]
            tie |= (srt[..., k - 1] == srt[..., k]).any(0)  # an exact tie at the boundary: set is ambiguous
            sets.append(np.sort(np.argsort(-p, axis=-1, kind="stable")[..., :k], axis=-1))
        direct.append((sets[0] != sets[1]).any(-1).sum(0))  # layers flipped per token
        tied.append(tie)
    direct, tied = np.concatenate(direct), np.concatenate(tied)
    assert tied.mean() < 0.05
    assert np.array_equal(direct[~tied], tok["route_flips"].to_numpy()[~tied])
    if trained:
        assert direct[~tied].sum() > 0
