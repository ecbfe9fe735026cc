"""--shard I/N and `trm-diag merge`: merging the shards equals one run over the same prompts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.helpers import run_cli


def compare(model, out, capsys, *extra):
    # batch_size=1 on both sides: batch-invariant numerics, so a shard computes exactly what the full run does
    code, _, err = run_cli(["compare", "--model", str(model), "--rollout", "hf:dtype=float32,batch_size=1",
                            "--train", "hf:dtype=float32,batch_size=1", "--num-prompts", "10", "--samples", "2",
                            "--max-new-tokens", "24", "--out", str(out), "-q", *extra], capsys)  # fmt: skip
    assert code == 0, err
    return out


@pytest.mark.parametrize("which,chunk", [("dense_model", 64), ("moe_model", 64), ("moe_model", 3)])
def test_merge_of_shards_equals_a_single_run(request, which, chunk, tmp_path, capsys, monkeypatch):
    """Equal to the last bit for batch-invariant engines; with batching, the same rollouts differ only
    by the engines' batch non-invariance (itself a mismatch the tool measures). chunk=3: the merge
    streams 7 chunks whose rollouts come from several shards each."""
    import trm_diag.run.merge

    monkeypatch.setattr(trm_diag.run.merge, "CHUNK", chunk)
    model = request.getfixturevalue(which)
    full = compare(model, tmp_path / "full", capsys)
    shards = [compare(model, tmp_path / f"s{i}", capsys, "--shard", f"{i}/3") for i in range(3)]
    code, _, err = run_cli(["merge", *map(str, shards), "--out", str(tmp_path / "merged"), "--json"], capsys)
    assert code == 0, err
    merged = tmp_path / "merged"
    for table in ("tokens", "sequences", "bounds") + (("routing",) if which == "moe_model" else ()):
        a, b = pd.read_parquet(full / f"{table}.parquet"), pd.read_parquet(merged / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((merged / "summary.json").read_text())
    for key in ("metrics", "bound_inputs", "bounds_at_observed_T", "masking"):
        assert sa[key] == sb[key], key
    assert [m["shard"] for m in sb["merged_from"]] == ["0/3", "1/3", "2/3"]


def test_merge_refuses_overlapping_or_mismatched_shards(dense_model, tmp_path, capsys):
    s0 = compare(dense_model, tmp_path / "s0", capsys, "--shard", "0/2")
    other = compare(dense_model, tmp_path / "t", capsys, "--shard", "1/2", "--temperature", "0.7")
    code, _, err = run_cli(["merge", str(s0), str(s0), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "shard 0/2 is given twice" in err
    code, _, err = run_cli(["merge", str(s0), str(other), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "differs" in err and "sampling" in err
    code, _, err = run_cli(["merge", str(s0), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "at least two reports" in err
    code, _, err = run_cli(["merge", str(s0), str(other), "--out", str(s0), "--overwrite"], capsys)
    assert code == 2 and "is one of the reports being merged" in err and (s0 / "summary.json").exists()


def test_merge_refuses_damaged_or_incomplete_shards(dense_model, tmp_path, capsys):
    import shutil

    s0 = compare(dense_model, tmp_path / "s0", capsys, "--shard", "0/2")
    s1 = compare(dense_model, tmp_path / "s1", capsys, "--shard", "1/2")
    damaged, missing = tmp_path / "damaged", tmp_path / "missing"
    shutil.copytree(s1, damaged)
    (damaged / "tokens.parquet").write_text("not parquet")
    shutil.copytree(s1, missing)
    (missing / "sequences.parquet").unlink()
    for shard, needle in ((damaged, "cannot read report file"), (missing, "is missing")):
        code, _, err = run_cli(["merge", str(s0), str(shard), "--out", str(tmp_path / "m")], capsys)
        assert code == 2 and needle in err and "Traceback" not in err
        assert not (tmp_path / "m" / "summary.json").exists()


def small(model, out, capsys, *extra):
    """A quick compare of the first 3 prompts (batch-invariant, as `compare` above)."""
    code, _, err = run_cli(["compare", "--model", str(model), "--rollout", "hf:dtype=float32,batch_size=1",
                            "--train", "hf:dtype=float32,batch_size=1", "--num-prompts", "3", "--max-new-tokens", "8",
                            "--out", str(out), "-q", *extra], capsys)  # fmt: skip
    assert code == 0, err
    return out, err


def test_an_incomplete_or_mixed_shard_set_is_refused_unless_partial(dense_model, tmp_path, capsys):
    """A fan-out where one task died must not pass for the whole run; --partial merges what is there and
    summary.json says which shards it lacks."""
    s = [small(dense_model, tmp_path / f"s{i}", capsys, "--shard", f"{i}/3")[0] for i in range(2)]
    half = small(dense_model, tmp_path / "h", capsys, "--shard", "1/2")[0]
    code, _, err = run_cli(["merge", *map(str, s), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "shard 2/3 missing: the reports cover 2 of 3 shards" in err and "--partial" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run_cli(["merge", str(s[0]), str(half), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "different splits" in err and "1/2" in err
    code, _, err = run_cli(["merge", *map(str, s), "--out", str(tmp_path / "m"), "--partial", "-q"], capsys)
    assert code == 0 and "merged 2 of 3 shards (missing 2/3" in err
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["coverage"] == {"split": 3, "shards": ["0/3", "1/3"], "missing": ["2/3"], "complete": False,
                                   "partial": True}  # fmt: skip
    assert summary["prompts"]["count"] == 2 and len(pd.read_parquet(tmp_path / "m" / "sequences.parquet")) == 2
    # one split over other prompt counts: 0/2 of 3 prompts (2) with 1/2 of 1 prompt (none): 2 prompts give 0/2 one
    zero = small(dense_model, tmp_path / "zero", capsys, "--shard", "0/2")[0]
    none = small(dense_model, tmp_path / "none", capsys, "--shard", "1/2", "--num-prompts", "1")[0]
    code, _, err = run_cli(["merge", str(zero), str(none), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "holds 2 prompt(s), but 2 shards of 2 prompts give it 1" in err


def test_a_shard_without_prompts_gives_an_empty_report_that_merge_accepts(dense_model, tmp_path, capsys):
    """4 shards over 3 prompts: shard 3/4 is empty; merged (empty shard first), the 4 equal one run."""
    full = small(dense_model, tmp_path / "full", capsys)[0]
    shards = [small(dense_model, tmp_path / f"s{i}", capsys, "--shard", f"{i}/4") for i in range(4)]
    empty, err = shards[3]
    assert "shard 3/4 holds no prompts: its report is empty" in err
    summary = json.loads((empty / "summary.json").read_text())
    assert summary["prompts"]["count"] == 0 and summary["verdict"]["status"] == "unknown"
    assert (
        len(pd.read_parquet(empty / "tokens.parquet")) == 0 and len(pd.read_parquet(empty / "sequences.parquet")) == 0
    )
    assert run_cli(["show", str(empty)], capsys)[0] == 0
    order = [empty] + [d for d, _ in shards[:3]]
    code, _, err = run_cli(["merge", *map(str, order), "--out", str(tmp_path / "m"), "-q"], capsys)
    assert code == 0, err
    for table in ("tokens", "sequences", "bounds"):
        a, b = pd.read_parquet(full / f"{table}.parquet"), pd.read_parquet(tmp_path / "m" / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    merged = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert merged["coverage"]["complete"] is True and merged["prompts"]["count"] == 3
    code, _, err = run_cli(["merge", str(empty), str(empty), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "given twice" in err


@pytest.mark.parametrize("bad", ["2/2", "x/2", "1", "-1/3"])
def test_bad_shard_spec(bad, tmp_path, capsys):
    code, _, err = run_cli(["compare", "--shard", bad, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--shard" in err


def test_row_index_reads_sequences_from_any_row_layout(tmp_path):
    """_Rows finds each sequence's rows by row group, also when a file's rows are not grouped by seq_id."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trm_diag.run.merge import _ranges, _Rows

    assert _ranges(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(12), rng.integers(0, 5, 12))  # some sequences have no rows
    pos = np.concatenate([np.arange(c) for c in np.bincount(seq, minlength=12)])
    for shuffled in (False, True):
        perm = rng.permutation(len(seq)) if shuffled else np.arange(len(seq))
        f = tmp_path / f"t{shuffled}.parquet"
        pq.write_table(
            pa.table({"seq_id": seq[perm], "pos": pos[perm], "v": (seq * 100 + pos)[perm]}), f, row_group_size=4
        )
        rows = _Rows(f)
        assert (rows.order is None) == (not shuffled)
        want = [7, 0, 3, 11]
        starts, counts = rows.spans(np.array(want))
        got = rows.read_spans(starts, counts).to_pydict()
        expect = [(s, p) for s in want for p in range(int(np.sum(seq == s)))]
        assert sorted(zip(got["seq_id"], got["pos"])) == sorted(expect)
        assert [s for s in got["seq_id"]] == [s for s in want for _ in range(int(np.sum(seq == s)))]
        assert all(v == s * 100 + p for s, p, v in zip(got["seq_id"], got["pos"], got["v"]))
        assert np.array_equal(rows.in_grouped_order(seq[perm]), np.sort(seq))
        empty = np.setdiff1d(np.arange(12), seq)[:1]  # a sequence without rows (an empty response)
        assert len(empty) and rows.read_spans(*rows.spans(empty)).column_names == ["seq_id", "pos", "v"]
        assert rows.read_spans(*rows.spans(empty)).num_rows == 0
