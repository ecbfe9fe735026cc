"""`trm-diag score` on rollout files as real pipelines write them: --map over a column of the same name, float32
sampling settings, vLLM's top_k -1, left-padded prompts, boolean rewards, and inputs it cannot read (compressed,
a folder of files, a JSON array, numbers beyond any float) refused in one line."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.helpers import run_cli
from trm_diag.errors import UsageError
from trm_diag.report.rollouts_io import parse_mapping


@pytest.fixture(scope="module")
def chat_ids(dense_model):
    """A prompt as an engine is fed it: the chat template applied to one user turn."""
    tok = AutoTokenizer.from_pretrained(dense_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    return [int(x) for x in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def _row(prompt_ids, **kw):
    return {"prompt_ids": prompt_ids, "response_ids": [294, 14], "rollout_logprobs": [-0.5, -0.25], **kw}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(src, model, out, capsys, *argv):
    code, _, err = run_cli(["score", str(src), "--model", str(model), "--out", str(out), "-q", *argv], capsys)
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("own_first", [True, False])
def test_a_mapped_column_wins_over_the_files_own_column_of_that_name(
    own_first, chat_ids, dense_model, tmp_path, capsys
):
    """verl-style rows with both a padded response_ids and the real output_ids: --map response_ids=output_ids
    scores output_ids whichever column comes first (the file's own once won silently, or failed on lengths)."""
    own = {"response_ids": [294, 14, 7, 7]}
    mapped = {"output_ids": [294, 14], "old_log_probs": [-0.5, -0.25]}
    row = {"prompt_ids": chat_ids, **(own | mapped if own_first else mapped | own)}
    f = _jsonl(tmp_path / "r.jsonl", [row])
    argv = ["--map", "response_ids=output_ids", "--map", "rollout_logprobs=old_log_probs"]
    code, err = _score(f, dense_model, tmp_path / "o", capsys, *argv)
    assert code == 0, err
    seqs = pd.read_parquet(tmp_path / "o" / "sequences.parquet")
    assert list(seqs["response_token_ids"].map(list)) == [[294, 14]]


def test_map_mistakes_are_refused_in_one_line(chat_ids, dense_model, tmp_path, capsys):
    for items, needle in (
        (["reward=score", "advantage=score"], "column 'score' is mapped twice"),
        (["reward=a", "reward=b"], "field 'reward' is mapped twice"),
    ):
        with pytest.raises(UsageError, match=needle):
            parse_mapping(items)
    f = _jsonl(tmp_path / "r.jsonl", [_row(chat_ids, score=1.0)])
    code, err = _score(f, dense_model, tmp_path / "o", capsys, "--map", "reward=scores")  # a typo: maps nothing
    assert code == 2 and "--map reward=scores: no row of" in err and len(err.strip().splitlines()) == 1
    g = _jsonl(tmp_path / "g.jsonl", [{"prompt_ids": chat_ids, "response_ids": [294], "old_log_prob": [-0.5]}])
    code, err = _score(g, dense_model, tmp_path / "o", capsys, "--map", "rollout_logprobs=old_log_probs")
    assert code == 2 and "--map rollout_logprobs=old_log_probs names a column this row does not have" in err
    assert "old_log_prob, prompt_ids, response_ids" in err and not (tmp_path / "o" / "summary.json").exists()


def test_float32_sampling_settings_read_as_the_decimals_written(chat_ids, dense_model, tmp_path, capsys):
    """A Parquet float32 temperature of 0.7 is 0.699999988 in float64: it must match --temperature 0.7 (not
    NOT COMPARABLE) and the summary says 0.7."""
    rows = [_row(chat_ids, temperature=0.7, top_p=0.95), _row(chat_ids, temperature=0.7, top_p=0.95, sample_idx=1)]
    table = pa.Table.from_pylist(rows)
    f32 = {"temperature", "top_p"}
    table = table.cast(pa.schema([pa.field(c.name, pa.float32()) if c.name in f32 else c for c in table.schema]))
    pq.write_table(table, tmp_path / "r.parquet")
    assert pq.read_table(tmp_path / "r.parquet")["temperature"][0].as_py() != 0.7  # the float32 value itself
    code, err = _score(tmp_path / "r.parquet", dense_model, tmp_path / "o", capsys, "--temperature", "0.7")
    assert code == 0, err
    sampling = json.loads((tmp_path / "o" / "summary.json").read_text())["sampling"]
    assert sampling["temperature"] == 0.7 and sampling["top_p"] == 0.95


def test_vllm_top_k_minus_one_means_off(chat_ids, dense_model, tmp_path, capsys):
    f = _jsonl(tmp_path / "r.jsonl", [_row(chat_ids, top_k=-1)])
    code, err = _score(f, dense_model, tmp_path / "o", capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["sampling"]["top_k"] == 0
    g = _jsonl(tmp_path / "g.jsonl", [_row(chat_ids, top_k=5.5)])
    code, err = _score(g, dense_model, tmp_path / "p", capsys)
    assert code == 2 and f"{g}:1: 'top_k' must be an integer >= -1" in err


def test_left_padded_prompts_are_scored_without_their_padding(chat_ids, dense_model, tmp_path, capsys):
    """verl's prompts tensor is left-padded with the pad id; the engine never saw the padding."""
    pad = AutoTokenizer.from_pretrained(dense_model).pad_token_id
    plain = _jsonl(tmp_path / "plain.jsonl", [_row(chat_ids)])
    padded = _jsonl(tmp_path / "padded.jsonl", [_row([pad] * 3 + chat_ids)])
    assert _score(plain, dense_model, tmp_path / "a", capsys)[0] == 0
    code, err = _score(padded, dense_model, tmp_path / "b", capsys)
    assert code == 0 and "dropped 3 pad token(s) at the start of 1 prompt(s)" in err
    a, b = (pd.read_parquet(tmp_path / d / "tokens.parquet") for d in ("a", "b"))
    assert a["lp_train"].tolist() == b["lp_train"].tolist()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["rollout"]["left_padding"] == {"rollouts": 1, "tokens": 3, "stripped": True}
    only_pad = _jsonl(tmp_path / "pad.jsonl", [_row([pad, pad])])
    code, err = _score(only_pad, dense_model, tmp_path / "c", capsys)
    assert code == 2 and f"prompt_ids hold only pad tokens (id {pad})" in err


def test_a_boolean_reward_reads_as_one_or_zero(chat_ids, dense_model, tmp_path, capsys):
    f = _jsonl(tmp_path / "r.jsonl", [_row(chat_ids, reward=True), _row(chat_ids, reward=False, sample_idx=1)])
    code, err = _score(f, dense_model, tmp_path / "o", capsys)
    assert code == 0, err
    assert pd.read_parquet(tmp_path / "o" / "sequences.parquet")["reward"].tolist() == [1.0, 0.0]


def test_inputs_it_cannot_read_are_named_in_one_line(chat_ids, dense_model, tmp_path, capsys):
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write(json.dumps(_row(chat_ids)) + "\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    _jsonl(shards / "a.jsonl", [_row(chat_ids)])
    (tmp_path / "arr.json").write_text(json.dumps([_row(chat_ids)], indent=1))
    giant = json.dumps(_row(chat_ids)).replace('"prompt_ids": [', '"prompt_ids": [1' + "0" * 5000 + ", ")
    (tmp_path / "giant.jsonl").write_text(json.dumps(_row(chat_ids)) + "\n" + giant + "\n")
    _jsonl(tmp_path / "huge.jsonl", [_row(chat_ids, reward=10**400)])
    for name, needle in (
        ("r.jsonl.gz", "is a compressed file (.gz)"),
        ("shards", f"pass its files as a quoted glob, e.g. '{shards / '*.jsonl'}'"),
        ("arr.json", "holds a JSON array: rollout files are JSONL"),
        ("giant.jsonl", f"{tmp_path / 'giant.jsonl'}:2: not valid JSON (Exceeds the limit"),
        ("huge.jsonl", "'reward' must be a finite number, not an integer of 401 digits"),
    ):
        code, err = _score(tmp_path / name, dense_model, tmp_path / "o", capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / "o" / "summary.json").exists()


def test_out_inside_the_model_folder_is_refused(chat_ids, dense_model, tmp_path, capsys):
    """The report would sit among the checkpoint's files (and change its fingerprint): refused, nothing written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dense_model, model)
    before = sorted(p.name for p in model.iterdir())
    f = _jsonl(tmp_path / "r.jsonl", [_row(chat_ids)])
    code, err = _score(f, model, model / "report", capsys)
    assert code == 2 and "lies in the model folder" in err and sorted(p.name for p in model.iterdir()) == before


def test_a_horizon_given_twice_is_one_horizon():
    from trm_diag.config import parse_horizons

    assert parse_horizons("8,8,1e3,8") == (8, 1000)
