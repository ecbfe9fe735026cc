"""Streaming assembly: a report built chunk by chunk from a checkpoint store equals the one built
from every rollout in memory, table for table and number for number."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import token_columns
from trm_diag.config import SamplingConfig, Thresholds
from trm_diag.report import tables as report
from trm_diag.report.assemble import MemoryChunks, assemble, report_parts
from trm_diag.report.partial import PartialStore
from trm_diag.report.tables import write_summary, write_tables
from trm_diag.types import Rollout, Scored, TensorRows

V, LAYERS, EXPERTS = 40, 2, 4


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(V)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))


def _chunks(n_chunks: int, per_chunk: int, seed: int = 0) -> list[Scored]:
    """Scored chunks from random logits of two sides: real token columns, MoE routing, some rewards,
    a few empty responses; seq ids local to each chunk, as compare's generate() numbers them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_chunks):
        rollouts, columns, routing = [], [], []
        for j in range(per_chunk):
            T = int(torch.randint(0, 12, (1,), generator=g)) if (c + j) % 5 else 0
            a = torch.randn(T, V, generator=g) * 3
            p = torch.log_softmax(a, -1)
            q = torch.log_softmax(a + 0.1 * torch.randn(T, V, generator=g), -1)
            ids = torch.randint(0, V, (T,), generator=g).tolist()
            lp = p[torch.arange(T), ids].tolist() if T else []
            extra = {"reward": float(j % 3)} if c % 2 else {}
            r = Rollout(j, c * per_chunk + j, 0, [1, 2, 3], ids, lp, "stop" if T % 2 else "length", extra)
            router_p = torch.randn(LAYERS, T, EXPERTS, generator=g)
            router_q = router_p + 0.3 * torch.randn(LAYERS, T, EXPERTS, generator=g)
            rows_p, rows_q = TensorRows(p, router_p), TensorRows(q, router_q)
            cols, comp = token_columns(r, rows_p, rows_q, "exact", V, experts_per_token=2)
            rollouts.append(r)
            columns.append(cols)
            routing.append((j, comp))
        out.append(Scored(rollouts, columns, routing))
    return out


def _in_memory(chunks: list[Scored]) -> Scored:
    """Everything in one Scored with global seq ids (what the naive path holds)."""
    rollouts, columns, routing = [], [], []
    for sc in chunks:
        base = len(rollouts)
        for r, cols in zip(sc.rollouts, sc.columns):
            r2 = Rollout(base + r.seq_id, r.prompt_idx, r.sample_idx, r.prompt_ids, r.response_ids, r.lp_roll,
                         r.finish_reason, r.extra)  # fmt: skip
            rollouts.append(r2)
            columns.append({**cols, "seq_id": np.full(len(cols["pos"]), r2.seq_id, dtype=np.int64)})
        routing += [(base + i, comp) for i, comp in sc.routing]
    return Scored(rollouts, columns, routing)


def _report(source, tokenizer, out):
    a = assemble(source, command="compare", fidelity="exact", sampling=SamplingConfig(), thresholds=Thresholds(),
                 horizons=(64, 1024), tokenizer=tokenizer, width=V, moe=(EXPERTS, 2), header={}, warn=lambda m: None)  # fmt: skip
    out.mkdir()
    write_tables(out, report_parts(a), a.summary)
    write_summary(out, a.summary)
    return json.loads((out / "summary.json").read_text())


def test_chunked_store_and_in_memory_give_the_same_report(tmp_path, tokenizer, monkeypatch):
    chunks = _chunks(n_chunks=7, per_chunk=6)
    store = PartialStore(tmp_path / "run", "test", len(chunks), resume=False)
    for i, sc in enumerate(chunks):
        store.save(i, sc)
    monkeypatch.setattr(report, "ROW_GROUP_BYTES", 4096)  # many row groups
    streamed = _report(store, tokenizer, tmp_path / "streamed")
    monkeypatch.setattr(report, "ROW_GROUP_BYTES", 1 << 40)  # one row group per table
    whole = _report(MemoryChunks(_in_memory(chunks)), tokenizer, tmp_path / "whole")
    assert pq.ParquetFile(tmp_path / "streamed" / "tokens.parquet").num_row_groups > 3
    assert pq.ParquetFile(tmp_path / "whole" / "tokens.parquet").num_row_groups == 1
    for key in ("metrics", "bound_inputs", "bounds_at_observed_T", "masking", "worst_sequences", "routing", "hygiene"):
        assert streamed[key] == whole[key], key
    for name in ("tokens", "sequences", "bounds", "routing"):
        a = pd.read_parquet(tmp_path / "streamed" / f"{name}.parquet")
        b = pd.read_parquet(tmp_path / "whole" / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    seqs = pd.read_parquet(tmp_path / "streamed" / "sequences.parquet")
    assert seqs["seq_id"].tolist() == list(range(42))
    assert seqs["reward"].isna().sum() == 4 * 6 and seqs["reward"].notna().sum() == 3 * 6  # odd chunks only
    tokens = pd.read_parquet(tmp_path / "streamed" / "tokens.parquet")
    assert (tokens.groupby("seq_id").size().reindex(range(42), fill_value=0).to_numpy() == seqs["length"]).all()
    # per-sequence maxima agree with the token rows they came from
    assert np.allclose(tokens.groupby("seq_id")["kl"].max().to_numpy(), seqs.loc[seqs["length"] > 0, "kl_max"])
    assert streamed["routing"]["worst_token_is_flip"]["of"] == 42


def test_store_columns_keep_row_order_and_global_seq_ids(tmp_path):
    chunks = _chunks(n_chunks=5, per_chunk=4, seed=1)
    store = PartialStore(tmp_path / "run", "test", len(chunks), resume=False)
    for i, sc in enumerate(chunks):
        store.save(i, sc)
    whole = MemoryChunks(_in_memory(chunks))
    for name in ("seq_id", "pos", "kl", "log_ratio", "nonfinite", "route_flips"):
        assert np.array_equal(store.column(name), whole.column(name), equal_nan=name not in ("nonfinite",)), name
    assert [r.seq_id for i in range(5) for r in store.chunk(i).rollouts] == list(range(20))


def test_a_failed_write_leaves_no_table_and_no_summary(tmp_path, tokenizer):
    chunks = _chunks(n_chunks=2, per_chunk=3)
    a = assemble(MemoryChunks(_in_memory(chunks)), command="compare", fidelity="exact", sampling=SamplingConfig(),
                 thresholds=Thresholds(), horizons=(64,), tokenizer=tokenizer, width=V, moe=(EXPERTS, 2), header={},
                 warn=lambda m: None)  # fmt: skip

    def parts():
        yield from list(report_parts(a))[:2]
        raise KeyboardInterrupt  # e.g. Ctrl-C half way through the tables

    with pytest.raises(KeyboardInterrupt):
        write_tables(tmp_path, parts(), a.summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
