"""`trm-diag score`: round trip with `compare --save-rollouts`, column mapping, and malformed input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_cli
from trm_diag.cli import main

SAMPLED = ["lp_roll", "lp_train", "log_ratio", "k1", "k2", "k3", "abs_rho_m1", "tv_bin", "kl_bin"]


def run(argv, capsys):
    return run_cli(argv, capsys)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, dense_model):
    d = tmp_path_factory.mktemp("score")
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out", str(d / "cmp"),
              "--num-prompts", "10", "--max-new-tokens", "24", "--temperature", "0.8", "--top-k", "50",
              "--save-rollouts", str(d / "r.jsonl"), "-q"])  # fmt: skip
    assert e.value.code == 0
    return d


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_round_trip_reproduces_sampled_columns(saved, dense_model, tmp_path, fmt, capsys):
    src = saved / "r.jsonl"
    if fmt == "parquet":
        rows = [json.loads(x) for x in src.read_text().splitlines()]
        src = tmp_path / "r.parquet"
        pd.DataFrame(rows).to_parquet(src)
    code, _, err = run(["score", str(src), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q"], capsys)
    assert code == 0, err
    a = pd.read_parquet(saved / "cmp" / "tokens.parquet")
    b = pd.read_parquet(tmp_path / "s" / "tokens.parquet")
    for c in SAMPLED:  # the exact tier's kernel and the top-K tier both give lp_train in float64 (~1e-15 apart)
        np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-12, atol=1e-14, err_msg=c)
    assert (a["lp_roll"].to_numpy() == b["lp_roll"].to_numpy()).all() and (a["token_id"] == b["token_id"]).all()
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["command"] == "score" and s["fidelity"] == "topk" and s["sampling"]["temperature"] == 0.8
    assert s["sampling"]["top_k"] == 50 and s["rollout"]["sampling_from"] == "file"
    # score generates nothing: no response budget, seed or samples per prompt; K is the file's (compare's --topk 20)
    assert [s["sampling"][k] for k in ("max_new_tokens", "samples_per_prompt", "seed")] == [None, None, None]
    assert s["topk"] == s["sampling"]["topk"] == 20
    assert "kl" not in b and (b["kl_lo"] <= b["kl_hi"]).all()  # the top-K tier has intervals, not exact kl


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_score_streams_the_file_in_chunks(saved, dense_model, tmp_path, fmt, monkeypatch, capsys):
    """The file is read twice (checked, then scored chunk by chunk); small chunks give the same report."""
    from transformers import AutoTokenizer

    import trm_diag.run.score
    from trm_diag.report.rollouts_io import iter_rollout_chunks, scan_rollouts

    src = saved / "r.jsonl"
    if fmt == "parquet":
        src = tmp_path / "r.parquet"
        pd.DataFrame([json.loads(x) for x in (saved / "r.jsonl").read_text().splitlines()]).to_parquet(src)
    tok = AutoTokenizer.from_pretrained(dense_model)
    whole = scan_rollouts(src, {}, tok, 2048, keep=True)
    chunks = list(iter_rollout_chunks(src, {}, tok, 2048, 3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1] and whole.count == 10
    assert [vars(r) for c in chunks for r in c] == [vars(r) for r in whole.rollouts]

    argv = ["score", str(src), "--model", str(dense_model), "--train", "hf:dtype=float32,batch_size=1", "-q"]
    assert run([*argv, "--out", str(tmp_path / "one")], capsys)[0] == 0
    monkeypatch.setattr(trm_diag.run.score, "SCORE_CHUNK", 3)
    assert run([*argv, "--out", str(tmp_path / "four")], capsys)[0] == 0
    assert json.loads((tmp_path / "four" / "summary.json").read_text())["rollout"]["empty_responses"] == 0
    for f in ("tokens.parquet", "sequences.parquet", "bounds.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / f), pd.read_parquet(tmp_path / "four" / f))


def test_sampled_tier_and_mapping(saved, dense_model, tmp_path, capsys):
    rows = [json.loads(x) for x in (saved / "r.jsonl").read_text().splitlines()]
    renamed = tmp_path / "verl.jsonl"
    with open(renamed, "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r["prompt_ids"], "output_ids": r["response_ids"], "old_log_probs": r["rollout_logprobs"],
                                "reward": 1.0, "temperature": 0.8, "top_k": 50}) + "\n")  # fmt: skip
    code, _, err = run(["score", str(renamed), "--model", str(dense_model), "--out", str(tmp_path / "m"), "-q",
                        "--map", "prompt_ids=input_ids", "--map", "response_ids=output_ids",
                        "--map", "rollout_logprobs=old_log_probs"], capsys)  # fmt: skip
    assert code == 0, err
    a = pd.read_parquet(saved / "cmp" / "tokens.parquet")
    b = pd.read_parquet(tmp_path / "m" / "tokens.parquet")
    # the exact tier's pipeline view (float64 from the rows) and the sampled tier read the same full softmax
    np.testing.assert_allclose(b["lp_train"].to_numpy(), a["lp_train"].to_numpy(), rtol=1e-12, atol=1e-14)
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["fidelity"] == "sampled" and "heuristic" in s["bound_inputs"]["source"]["delta"]
    assert (pd.read_parquet(tmp_path / "m" / "sequences.parquet")["reward"] == 1.0).all()


def test_what_the_log_probs_are_comes_from_the_file_or_the_option(saved, dense_model, tmp_path, capsys):
    """`logprobs: raw` (vLLM's default export) is recorded and named; --logprobs overrides the file; the
    sampled tier gives the pipeline view only and says so."""
    rows = [json.loads(x) for x in (saved / "r.jsonl").read_text().splitlines()]
    assert {r["logprobs"] for r in rows} == {"processed"}  # compare --save-rollouts writes what they are
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({**r, "logprobs": "raw"}) + "\n" for r in rows))
    argv = ["score", str(raw), "--model", str(dense_model), "--fidelity", "sampled", "-q"]
    assert run([*argv, "--out", str(tmp_path / "a")], capsys)[0] == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["sampling"]["logprobs"] == "raw" and "raw log-probs" in s["compared_distribution"]
    assert "pipeline view only" in s["views"]["note"]
    assert run([*argv, "--out", str(tmp_path / "b"), "--logprobs", "processed"], capsys)[0] == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["sampling"]["logprobs"] == "processed"
    code, _, err = run([*argv, "--out", str(tmp_path / "c"), "--logprobs", "raw_logits"], capsys)
    assert code == 2 and "logprobs 'raw_logits' is unknown" in err and not (tmp_path / "c").exists()


def test_text_only_rows_are_retokenized_with_a_warning(dense_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_model)
    resp = " 3+4=7. So the answer is 7."
    n = len(tok(resp, add_special_tokens=False)["input_ids"])
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "Q: What is 3+4?\nA:", "response": resp, "rollout_logprobs": [-0.1] * n}) + "\n")
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "tokenised with the model's tokenizer" in err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["rollout"]["retokenized_fields"] == 2


def test_empty_response_is_reported_not_fatal(dense_model, tmp_path, capsys):
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"prompt_ids": [5, 6, 7], "response_ids": [], "rollout_logprobs": []}) + "\n"
                 + json.dumps({"prompt_ids": [5, 6], "response_ids": [8, 9], "rollout_logprobs": [-0.5, -1.0]}) + "\n")  # fmt: skip
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "empty responses" in err
    seqs = pd.read_parquet(tmp_path / "o" / "sequences.parquet")
    assert list(seqs["length"]) == [0, 2] and math.isnan(seqs["k2_max"][0]) and seqs["accept_trm_max"][0]


BAD = {
    "length mismatch": (
        {"prompt_ids": [5], "response_ids": [6, 7], "rollout_logprobs": [-1.0]},
        "2 response tokens but 1 log-probs",
    ),
    "out of vocab": (
        {"prompt_ids": [5], "response_ids": [6, 99999], "rollout_logprobs": [-1.0, -1.0]},
        "token id 99999 is outside",
    ),
    "positive logprob": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [0.5]},
        "invalid rollout log-prob 0.5",
    ),
    "nan logprob": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [float("nan")]},
        "invalid rollout log-prob nan",
    ),
    "no logprobs": ({"prompt_ids": [5], "response_ids": [6]}, "no 'rollout_logprobs'"),
    "no response": ({"prompt_ids": [5], "rollout_logprobs": [-1.0]}, "no 'response_ids'"),
    "empty prompt": ({"prompt_ids": [], "response_ids": [6], "rollout_logprobs": [-1.0]}, "empty prompt"),
    "ids not ints": (
        {"prompt_ids": [5], "response_ids": ["a"], "rollout_logprobs": [-1.0]},
        "list of integer token ids",
    ),
    "prompt_idx a list": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "prompt_idx": [None]},
        "'prompt_idx' must be a finite number",
    ),
    "sample_idx fractional": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "sample_idx": 1.5},
        "'sample_idx' must be a non-negative integer",
    ),
    "huge token id": (
        {"prompt_ids": [10**400], "response_ids": [6], "rollout_logprobs": [-1.0]},
        "is outside the model's vocabulary",
    ),
    "top-K id out of vocab": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "topk_logprobs": [{"99999": -0.1}]},
        "top-K token id 99999 is outside",
    ),
    "top-K positive logprob": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "topk_logprobs": [[[6, 0.7]]]},
        "invalid top-K log-prob 0.7",
    ),
    "logprobs mode unknown": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "logprobs": "raw_logprobs"},
        "logprobs 'raw_logprobs' is unknown",
    ),
    "topk_k beyond the entries given": (
        {
            "prompt_ids": [5],
            "response_ids": [6, 7],
            "rollout_logprobs": [-1.0, -1.0],
            "topk_k": 3,
            "topk_logprobs": [[[6, -1.0], [8, -2.0], [9, -2.5]], [[7, -1.0], [8, -2.0]]],
        },
        "topk_k is 3 but response token 1 has 2 top-K entries",
    ),  # fmt: skip
    "reward infinite": (
        {"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0], "reward": float("inf")},
        "'reward' must be a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_rows_exit_2_without_report(case, dense_model, tmp_path, capsys):
    row, needle = BAD[case]
    f = tmp_path / "bad.jsonl"
    f.write_text(
        json.dumps({"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0]}) + "\n" + json.dumps(row) + "\n"
    )
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err and f"{f}:2" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize(
    "content,argv,needle",
    [
        (None, [], "does not exist"),
        ("{not json\n", [], "not valid JSON"),
        ("\n", [], "holds no rollouts"),
        (
            '{"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0]}\n',
            ["--fidelity", "topk"],
            "has no topk_logprobs",
        ),
        (
            '{"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0]}\n',
            ["--fidelity", "exact"],
            "not available for imported rollouts",
        ),
        (
            '{"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0]}\n',
            ["--map", "nonsense"],
            "is not canonical=source",
        ),
        (
            '{"prompt_ids": [5], "response_ids": [6], "rollout_logprobs": [-1.0]}\n',
            ["--map", "foo=bar"],
            "unknown field 'foo'",
        ),
    ],
)
def test_file_level_errors(content, argv, needle, dense_model, tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    if content is not None:
        f.write_text(content)
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "o"), *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("fidelity", ["exact", "topk", "sampled"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_save_rollouts_round_trips_in_every_tier_and_format(dense_model, tmp_path, fidelity, fmt, capsys):
    path = tmp_path / f"r.{fmt}"
    code, _, err = run(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--fidelity", fidelity,
                        "--num-prompts", "3", "--max-new-tokens", "8", "--save-rollouts", str(path),
                        "--out", str(tmp_path / "c"), "-q"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run(["score", str(path), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q"], capsys)
    assert code == 0, err
    a, b = (pd.read_parquet(tmp_path / d / "tokens.parquet") for d in ("c", "s"))
    assert (a["token_id"] == b["token_id"]).all() and (a["lp_roll"] == b["lp_roll"]).all()
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["fidelity"] == "topk"  # compare records the top-K (--topk 20) in every tier


def test_impossible_top_k_data_is_refused(dense_model, tmp_path, capsys):
    row = {"prompt_ids": [1, 2], "response_ids": [5], "rollout_logprobs": [-0.01],
           "topk_logprobs": [[[i, -0.01] for i in range(5, 25)]]}  # fmt: skip
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(row) + "\n")
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "top-K probabilities of response token 0 sum to 19.8 > 1" in err


def test_right_padded_exports_are_stripped_after_the_first_eos(saved, dense_model, tmp_path, capsys):
    """verl pads responses with the EOS id and log-prob 0.0: those tokens are not the response."""
    from trm_diag.backends.checkpoint import eos_token_ids

    eos = min(eos_token_ids(dense_model))
    rows = [json.loads(x) for x in (saved / "r.jsonl").read_text().splitlines()]
    padded = []
    for r in rows:
        r = dict(r, topk_logprobs=None)
        end = next((t for t, tok in enumerate(r["response_ids"]) if tok == eos), None)
        if end is None:
            r["response_ids"] = r["response_ids"] + [eos]
            r["rollout_logprobs"] = r["rollout_logprobs"] + [-0.5]
            end = len(r["response_ids"]) - 1
        r["response_ids"] = r["response_ids"][: end + 1] + [eos] * 7
        r["rollout_logprobs"] = r["rollout_logprobs"][: end + 1] + [0.0] * 7
        padded.append(r)
    f = tmp_path / "padded.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in padded))
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "s")], capsys)
    assert code == 0 and f"dropped {7 * len(rows):,} token(s) after the first end-of-sequence token" in err
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["rollout"]["after_eos"] == {"rollouts": len(rows), "tokens": 7 * len(rows), "stripped": True,
                                         "eos_ids": sorted(eos_token_ids(dense_model))}  # fmt: skip
    tok = pd.read_parquet(tmp_path / "s" / "tokens.parquet")
    assert len(tok) == sum(len(r["response_ids"]) - 7 for r in padded)
    code, _, err = run(
        ["score", str(f), "--model", str(dense_model), "--keep-after-eos", "--out", str(tmp_path / "k")], capsys
    )
    assert code == 0 and "scored as real tokens" in err
    assert len(pd.read_parquet(tmp_path / "k" / "tokens.parquet")) == sum(len(r["response_ids"]) for r in padded)


def _rows(saved):
    return [json.loads(x) for x in (saved / "r.jsonl").read_text().splitlines()]


def test_top_k_data_on_some_rows_only_is_refused_or_scored_in_the_sampled_tier(saved, dense_model, tmp_path, capsys):
    """The top-K tier on half the rows would give NaN intervals on the rest and certify from half the tokens."""
    rows = _rows(saved)
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r if i < 3 else {**r, "topk_logprobs": None}) + "\n" for i, r in enumerate(rows)))
    argv = ["score", str(f), "--model", str(dense_model), "-q"]
    code, _, err = run([*argv, "--fidelity", "topk", "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and f"{f}:4: no topk_logprobs, while 3 of 10 rows have topk_logprobs" in err
    assert not (tmp_path / "t").exists()
    code, _, err = run([*argv, "--out", str(tmp_path / "d")], capsys)
    assert (
        code == 0 and f"only 3 of 10 rows have topk_logprobs (first without: {f}:4): scored in the sampled tier" in err
    )
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert s["fidelity"] == "sampled" and s["rollout"]["topk_rows"] == 3 and s["topk"] is None
    assert not pd.read_parquet(tmp_path / "d" / "tokens.parquet").isna().any().any()


def test_repeated_rows_are_refused_and_shared_keys_named(saved, dense_model, tmp_path, capsys):
    """The same rows twice would be scored twice: refused, unless --allow-duplicates (then counted in a
    warning, as rows that only share (prompt_idx, sample_idx) always are)."""
    rows = _rows(saved)
    f = tmp_path / "twice.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:4]))
    argv = ["score", str(f), "--model", str(dense_model), "--fidelity", "sampled", "-q"]
    code, _, err = run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and f"{f}:11: repeats an earlier row (prompt_idx 0, sample_idx 0" in err and "4 such row" in err
    code, _, err = run([*argv, "--allow-duplicates", "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and f"4 rollout(s) share their (prompt_idx, sample_idx) with an earlier row (first: {f}:11" in err
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["rollout"]["duplicates"] == {"same_key": 4, "same_row": 4} and len(pd.read_parquet(
        tmp_path / "a" / "sequences.parquet")) == 14  # fmt: skip
    # the same keys with other responses: scored, with the count
    other = [{**r, "response_ids": r["response_ids"][:-1], "rollout_logprobs": r["rollout_logprobs"][:-1],
              "topk_logprobs": r["topk_logprobs"][:-1]} for r in rows[:2]]  # fmt: skip
    g = tmp_path / "keys.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in rows + other))
    code, _, err = run(["score", str(g), "--model", str(dense_model), "--fidelity", "sampled", "-q",
                        "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert code == 0 and "2 rollout(s) share their (prompt_idx, sample_idx)" in err and "0 repeat" in err
    # a report with repeated keys is named as such by merge (not as an overlap of two shards)
    h = tmp_path / "rest.jsonl"
    h.write_text("".join(json.dumps({**r, "prompt_idx": 100 + i}) + "\n" for i, r in enumerate(rows[:2])))
    assert run(["score", str(h), "--model", str(dense_model), "--fidelity", "sampled", "-q",
                "--out", str(tmp_path / "c")], capsys)[0] == 0  # fmt: skip
    code, _, err = run(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and f"prompt 0 sample 0 appears twice in '{tmp_path / 'a'}'" in err
    code, _, err = run(["merge", str(tmp_path / "b"), str(tmp_path / "c"), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "appears twice in" in err


def test_repeats_match_a_brute_force_count():
    """rollouts_io._repeats against a direct scan: each row against every earlier row."""
    from array import array

    import numpy as np

    from trm_diag.report.rollouts_io import _repeats

    rng = np.random.default_rng(7)
    p, s, d = (rng.integers(0, 4, 300) for _ in range(3))
    got_key, got_row = _repeats(*(array("q", x.tolist()) for x in (p, s, d)))
    want_key = [i for i in range(300) if any(p[j] == p[i] and s[j] == s[i] for j in range(i))]
    want_row = [i for i in range(300) if any((p[j], s[j], d[j]) == (p[i], s[i], d[i]) for j in range(i))]
    assert got_key.tolist() == want_key and got_row.tolist() == want_row
    assert [len(x) for x in _repeats(array("q"), array("q"), array("q"))] == [0, 0]


def test_a_byte_order_mark_is_read_past(saved, dense_model, tmp_path, capsys):
    """Windows editors start UTF-8 files with a BOM: not part of the first row."""
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (saved / "r.jsonl").read_bytes())
    code, _, err = run(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q"], capsys)
    assert code == 0, err
