"""`trm-diag compare` end to end on the sample model, through the real CLI entry point."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.helpers import run_cli
from trm_diag.cli import main

TOKEN_COLS = {
    "seq_id",
    "pos",
    "token_id",
    "lp_roll",
    "lp_train",
    "log_ratio",
    "k1",
    "k2",
    "k3",
    "kl",
    "kl_rev",
    "tv",
    "tv_bin",
    "kl_bin",
}
SEQ_COLS = {"seq_id", "prompt_idx", "sample_idx", "prompt_token_ids", "response_token_ids", "length", "kl_max",
            "kl_mean", "tv_max", "k2_max", "k3_mean", "ser", "accept_trm_max", "accept_trm_avg", "accept_combined",
            "accept_ln_trm", "accept_ser"}  # fmt: skip
FAST = ["--num-prompts", "8", "--max-new-tokens", "24", "-q"]


def run(argv, capsys):
    return run_cli(argv, capsys)


@pytest.fixture(scope="module")
def bf16_report(tmp_path_factory, dense_model):
    out = tmp_path_factory.mktemp("r") / "bf16"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", str(dense_model), "--out", str(out), "--samples", "2", *FAST])
    assert e.value.code == 0
    return out


def test_identical_specs_give_zero_mismatch(tmp_path, dense_model, capsys):
    out = tmp_path / "same"
    code, _, err = run(["compare", "--model", str(dense_model), "--out", str(out), "--rollout", "hf:dtype=float32,batch_size=3",
                        "--train", "hf:dtype=float32", *FAST], capsys)  # fmt: skip
    assert code == 0, err
    tok = pd.read_parquet(out / "tokens.parquet")
    assert len(tok) > 50
    for col in ("kl", "kl_rev", "tv"):
        assert tok[col].abs().max() < 1e-6, col
    for col in ("log_ratio", "k1", "k3", "tv_bin", "kl_bin"):
        assert tok[col].abs().max() < 1e-4, col
    seqs = pd.read_parquet(out / "sequences.parquet")
    assert seqs["accept_combined"].all()


def test_bf16_vs_fp32_shows_mismatch_and_schema(bf16_report):
    tok = pd.read_parquet(bf16_report / "tokens.parquet")
    seqs = pd.read_parquet(bf16_report / "sequences.parquet")
    assert TOKEN_COLS <= set(tok.columns) and SEQ_COLS <= set(seqs.columns)
    assert tok["kl"].max() > 1e-5 and tok["kl"].mean() > 1e-7 and tok["tv"].max() > 1e-3
    assert len(seqs) == 16 and set(seqs["sample_idx"]) == {0, 1}
    assert (seqs["length"] == seqs["response_token_ids"].map(len)).all()
    assert tok.groupby("seq_id").size().sum() == seqs["length"].sum()
    summary = json.loads((bf16_report / "summary.json").read_text())
    # the default pair: vLLM bf16 rollout (vLLM is installed) vs transformers fp32 training
    assert summary["rollout"]["spec"].startswith("vllm:") and "dtype=bfloat16" in summary["rollout"]["spec"]
    assert summary["train"]["spec"].startswith("hf:") and "dtype=float32" in summary["train"]["spec"]
    assert summary["sampling"]["max_new_tokens"] == 24 and summary["complete"]
    assert summary["hardware"]["exact_kernels"] == ["native"]  # the C kernel is the CPU default
    b = pd.read_parquet(bf16_report / "bounds.parquet")
    assert {"T", "bound", "value", "vacuous"} <= set(b.columns) and 4096 in set(b["T"])
    import pyarrow.parquet as pq

    meta = pq.read_schema(bf16_report / "tokens.parquet").metadata[b"trm_diag"]
    assert json.loads(meta)["train"]["spec"] == summary["train"]["spec"]


def test_summary_is_printed(tmp_path, dense_model, capsys):
    code, out, err = run(["compare", "--model", str(dense_model), "--out", str(tmp_path / "x"), "--num-prompts", "4",
                          "--max-new-tokens", "16"], capsys)  # fmt: skip
    assert code == 0
    # the answer on stdout (`> summary.txt` keeps it), progress and messages on stderr
    assert "Token-level mismatch" in out and "TRM-Max" in out and "Worst sequences" in out and "INSIDE" in out
    assert "report written" in err and "trm-diag show" in err and "Token-level" not in err
    # progress counts rollouts (not chunks) with an ETA, and its lines fit 80 columns
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "rollouts" in ln]
    assert lines and "4/4 rollouts" in lines[-1] and "eta" in lines[-1]
    assert all(len(ln.rstrip()) <= 80 for ln in err.replace("\r", "\n").splitlines() if "\u2501" in ln)


@pytest.mark.parametrize("command", ["compare", "score"])
def test_help_groups_options_in_panels(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run([command, "--help"], capsys)
    panels = [p for p in ("Inputs", "Backends", "Sampling", "Thresholds", "Output") if f"\u2500 {p} " in out]
    assert code == 0 and panels == ["Inputs", "Backends", "Sampling", "Thresholds", "Output"]
    assert sorted(panels, key=lambda p: out.index(f"\u2500 {p} ")) == panels


def test_json_output_goes_to_stdout(tmp_path, dense_model, capsys):
    code, out, err = run(
        ["compare", "--model", str(dense_model), "--out", str(tmp_path / "j"), "--json", *FAST], capsys
    )
    assert code == 0
    assert json.loads(out)["metrics"]["n_sequences"] == 8


def test_wide_vocabulary_model(tmp_path, wide_vocab_model, capsys):
    code, _, err = run(["compare", "--model", str(wide_vocab_model), "--out", str(tmp_path / "w"), "--num-prompts", "2",
                        "--max-new-tokens", "6", "-q"], capsys)  # fmt: skip
    assert code == 0, err
    s = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert s["vocab"] == {"logits_width": 151_936, "tokenizer_size": 2000}


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--rollout", "hf:dtyp=bf16"], "unknown key 'dtyp'"),
        (["--rollout", "hf:dtype=bfloat16,dtype=float32"], "key 'dtype' is given twice"),
        (["--rollout", "sglang"], "unknown backend 'sglang'"),
        (["--rollout", "hf:dtype=int3"], "dtype=int3 is not supported"),
        (["--train", "hf:batch_size=0"], "batch_size=0 is below 1"),
        (["--rollout", "vllm:batch_size=-2"], "batch_size=-2 is below 1"),
        (["--train", "hf:batch_size=x"], "batch_size=x is not an integer"),
        (["--top-p", "0"], "--top-p 0.0 is out of range"),
        (["--trm-max", "-1"], "threshold trm_max=-1.0 is out of range"),
        (["--horizons", "a,b"], "--horizons 'a,b'"),
        (["--horizons", "256,inf"], "must hold positive integers"),
        (["--horizons", "1e99"], "1e99 is beyond 10,000,000 tokens"),
        (["--chunk-prompts", "0"], "--chunk-prompts 0 must be >= 1"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, argv, needle, capsys):
    code, _, err = run(["compare", "--out", str(tmp_path / "e"), *argv], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "e" / "summary.json").exists()


def test_bad_prompt_file_names_line(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": broken}\n')
    code, _, err = run(["compare", "--prompts", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{bad}:2: not valid JSON" in err
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    code, _, err = run(["compare", "--prompts", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds no prompts" in err


def test_existing_report_needs_overwrite(bf16_report, capsys):
    code, _, err = run(["compare", "--out", str(bf16_report), *FAST], capsys)
    assert code == 2 and "already holds a report" in err and "--overwrite" in err


def test_vocab_mismatch_between_checkpoints(tmp_path, dense_model, wide_vocab_model, capsys):
    code, _, err = run(["compare", "--rollout", f"hf:model={dense_model}", "--train", f"hf:model={wide_vocab_model}",
                        "--out", str(tmp_path / "v")], capsys)  # fmt: skip
    assert code == 2 and "vocab mismatch between backends" in err


def test_pickle_weights_refused(tmp_path, dense_model, capsys):
    import shutil

    ck = tmp_path / "pickled"
    shutil.copytree(dense_model, ck)
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    code, _, err = run(["compare", "--model", str(ck), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--allow-pickle" in err


@pytest.mark.parametrize(
    "argv,needle", [(["--bogus"], "No such option"), (["--samples", "x"], "Invalid value for '--samples'")]
)
def test_option_parsing_errors_exit_2(argv, needle, capsys):
    code, _, err = run(["compare", *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["compare", "score", "merge", "bounds", "gate"])
def test_help_shows_bracketed_text(command, capsys, monkeypatch):
    """Help text goes through rich markup: literal [brackets] must survive (e.g. [lo, hi], [gate])."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    expected = {"compare": "certified [lo, hi]", "gate": "[tool.trm-diag.gate]"}.get(command)
    assert expected is None or expected in out
