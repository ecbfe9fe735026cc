"""Hostile inputs not covered elsewhere: unsafe checkpoints, mismatched tokenizers, NaN and zero probabilities.

Every row of docs/bad-inputs.md names the test that checks it.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import torch

from tests.helpers import run_cli, token_columns
from trm_diag.config import SamplingConfig, Thresholds
from trm_diag.report.assemble import assemble
from trm_diag.types import Rollout, Scored, TensorRows


def test_remote_code_needs_the_flag(dense_model, tmp_path, capsys):
    ck = tmp_path / "custom"
    shutil.copytree(dense_model, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(model_type="my_custom_arch", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (ck / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["compare", "--model", str(ck), "--rollout", "hf", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err


def test_tokenizers_that_differ_are_refused(dense_model, tmp_path, capsys):
    ck = tmp_path / "other-tokenizer"
    shutil.copytree(dense_model, ck)
    tj = json.loads((ck / "tokenizer.json").read_text())
    for tok in tj["added_tokens"]:
        if tok["content"] == "<|system|>":
            tok["content"] = "<|sys|>"
    vocab = tj["model"]["vocab"]
    vocab["<|sys|>"] = vocab.pop("<|system|>")
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    code, _, err = run_cli(["compare", "--rollout", f"hf:model={dense_model}", "--train", f"hf:model={ck}",
                            "--out", str(tmp_path / "o"), "--num-prompts", "2", "--max-new-tokens", "4", "-q"], capsys)  # fmt: skip
    assert code == 2 and "tokenizers differ" in err


def test_nan_logits_everywhere_exit_3(dense_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "nan-model"
    shutil.copytree(dense_model, ck)
    w = load_file(ck / "model.safetensors")
    w["model.norm.weight"][:] = float("nan")
    save_file(w, ck / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(
        ["compare", "--model", str(ck), "--rollout", "hf", "--out", str(tmp_path / "o"), "-q"], capsys
    )
    assert code == 3 and "NaN logits" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_nan_rows_are_flagged_fail_their_masks_and_make_bounds_unknown():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 50, generator=g) * 3
    p = torch.log_softmax(logits[0], -1)
    q = torch.log_softmax(logits[1], -1)
    q_bad = q.clone()
    q_bad[2] = float("nan")  # one position of the training side is NaN
    ids = [3, 7, 9, 1, 4, 5]
    r = Rollout(0, 0, 0, [1, 2], ids, p[torch.arange(6), ids].tolist(), "length")
    cols, _ = token_columns(r, TensorRows(p), TensorRows(q_bad), "exact", 50)
    assert cols["nonfinite"].tolist() == [False, False, True, False, False, False]
    assert math.isnan(cols["kl"][2]) and np.isfinite(np.delete(cols["kl"], 2)).all()
    warnings: list[str] = []
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({str(i): i for i in range(50)}, unk_token="0"))
    )
    out = assemble(Scored([r], [cols], []), command="compare", fidelity="exact", sampling=SamplingConfig(),
                   thresholds=Thresholds(), horizons=(64,), tokenizer=tok, width=50, moe=None, header={},
                   warn=warnings.append)  # fmt: skip
    assert any("NaN logits" in w for w in warnings)
    assert out.summary["hygiene"]["nonfinite_tokens"] == 1
    # descriptive token statistics skip the NaN and count it; nothing that decides skips it
    assert math.isfinite(out.summary["metrics"]["token_kl_mean"]) and out.summary["metrics"]["token_kl_n_nan"] == 1
    bi = out.summary["bound_inputs"]
    assert bi["delta"] is None and bi["kl_seq"] is None and bi["source"]["delta"].startswith("unknown: 1 scored")
    assert out.bounds["value"].isna().all()  # no bound holds over a token nobody could score
    seq = out.sequences.iloc[0]
    assert math.isnan(seq["kl_max"]) and not seq["accept_trm_max"] and not seq["accept_combined"]
    v = out.summary["verdict"]
    assert v["status"] == "unknown" and "1 scored token(s) are NaN" in v["headline"]


def test_zero_probability_tokens_give_infinite_kl_with_a_flag(dense_model, tmp_path, capsys):
    code, *_ = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=float32", "--out", str(tmp_path / "c"),
                        "--num-prompts", "6", "--max-new-tokens", "24", "--save-rollouts", str(tmp_path / "r.jsonl"), "-q"], capsys)  # fmt: skip
    assert code == 0
    # an export whose engine gave some sampled tokens probability 0 (log-prob -inf): a broken engine, and the
    # report must say so with infinite values rather than drop them
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    for r in rows[::2]:
        r["rollout_logprobs"][::3] = [-math.inf] * len(r["rollout_logprobs"][::3])
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # -Infinity, as Python writes it
    code, _, err = run_cli(["score", str(tmp_path / "r.jsonl"), "--model", str(dense_model), "--fidelity", "sampled",
                            "--out", str(tmp_path / "s")], capsys)  # fmt: skip
    assert code == 0 and "probability 0" in err
    tok = pd.read_parquet(tmp_path / "s" / "tokens.parquet")
    z = tok["zero_prob"]
    assert z.any() and np.isneginf(tok.loc[z, "k1"]).all() and np.isposinf(tok.loc[z, "log_ratio"]).all()
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["hygiene"]["zero_prob_tokens"] == int(z.sum())
    # the gate sees every token: an infinite value is a value, counted, and fails `<=` like the summary says
    assert s["metrics"]["token_k2_max"] is None and s["infinite_values"]["/metrics/token_k2_max"] == "inf"
    assert s["metrics"]["token_k2_n_inf"] == int(z.sum())
    for rule in ("token.k2.max <= 0.05", "seq.k2_max.max <= 0.05", "metrics.token_k2_max <= 0.05"):
        code, out, _ = run_cli(["gate", str(tmp_path / "s"), "-r", rule, "--format", "json"], capsys)
        r = json.loads(out)["rules"][0]
        assert code == 1 and not r["passed"] and r["value"] is None, (rule, r)
        if rule.startswith("token."):
            assert r["note"] == f"{int(z.sum()):,} of {len(tok):,} values are infinite", r
    at = s["bounds_at_observed_T"]
    assert at["classical_kl"] is None  # T (T - 1) delta with delta = inf: JSON null, never a finite number
    finite = [
        at[k]
        for k in ("classical", "coupling", "pm_tv", "adaptive_tv", "adaptive_kl", "adaptive_hybrid")
        if at[k] is not None
    ]
    assert finite and at["unified"] == min(v for k, v in at.items() if k != "unified" and v is not None)


def test_unsupported_save_rollouts_suffix_is_refused_before_any_work(dense_model, tmp_path, capsys):
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--out", str(tmp_path / "o"),
                            "--save-rollouts", str(tmp_path / "r.txt")], capsys)  # fmt: skip
    assert code == 2 and "unsupported file type" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before the output folder or any engine


def _old_report(folder):
    folder.mkdir(parents=True)
    for f in ("summary.json", "tokens.parquet", "sequences.parquet", "bounds.parquet"):
        (folder / f).write_text(f"old {f}")
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _same(folder, before):
    return {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_nothing_in_an_existing_report_is_touched_before_every_input_check_passes(dense_model, tmp_path, capsys):
    out = tmp_path / "r"
    before = _old_report(out)
    base = ["--model", str(dense_model), "--rollout", "hf", "--out", str(out), "-q"]
    code, _, err = run_cli(["compare", *base, "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err and _same(out, before)
    (tmp_path / "empty.jsonl").write_text("\n")
    code, _, err = run_cli(["compare", *base, "--overwrite", "--prompts", str(tmp_path / "empty.jsonl")], capsys)
    assert code == 2 and "holds no prompts" in err and _same(out, before)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [5, 6], "rollout_logprobs": [-0.1, 0.7]}) + "\n")
    code, _, err = run_cli(
        ["score", str(bad), "--model", str(dense_model), "--out", str(out), "--overwrite", "-q"], capsys
    )
    assert code == 2 and "invalid rollout log-prob 0.7" in err and _same(out, before)


def test_no_output_may_be_an_input(dense_model, prompts_file, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    shutil.copy(prompts_file, prompts)
    before = prompts.read_bytes()
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--prompts", str(prompts), "--save-rollouts",
                            str(prompts), "--out", str(tmp_path / "o"), "-q"], capsys)  # fmt: skip
    assert code == 2 and "is also an input" in err and prompts.read_bytes() == before
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--save-rollouts", str(tmp_path / "no" / "r.jsonl"),
                            "--out", str(tmp_path / "o"), "-q"], capsys)  # fmt: skip
    assert code == 2 and "does not exist" in err and not (tmp_path / "o").exists()


def test_prompts_that_do_not_fit_are_refused_or_cut_on_request(dense_model, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+2=3. " * 200}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    argv = ["compare", "--model", str(dense_model), "--rollout", "hf", "--prompts", str(long), "--max-new-tokens", "8",
            "--out", str(tmp_path / "o")]  # fmt: skip
    code, _, err = run_cli([*argv, "-q"], capsys)
    assert code == 2 and "beyond the model's 512" in err and "--truncate-prompts" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli([*argv, "--truncate-prompts"], capsys)
    assert code == 0 and "1 prompt(s) cut to their last 504 tokens" in err
    seqs = pd.read_parquet(tmp_path / "o" / "sequences.parquet")
    assert seqs["prompt_token_ids"].map(len).max() == 504
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"prompt": "caf\\ud800"}\n')
    code, _, err = run_cli(
        ["compare", "--model", str(dense_model), "--prompts", str(bad), "--out", str(tmp_path / "s")], capsys
    )
    assert code == 2 and "lone surrogate" in err and "Traceback" not in err


def test_tiny_temperatures_are_an_input_error(dense_model, tmp_path, capsys):
    code, _, err = run_cli(
        ["compare", "--model", str(dense_model), "--temperature", "1e-40", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "below 1e-05" in err and "NaN" not in err


def test_a_full_disk_is_one_line_exit_3_and_the_run_resumes(dense_model, tmp_path, capsys, monkeypatch):
    import errno

    from trm_diag.report.partial import PartialStore

    real = PartialStore.save
    calls = []

    def full(self, i, *a, **k):
        calls.append(i)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "chunk-00001.tokens.parquet"))
        return real(self, i, *a, **k)

    argv = ["compare", "--model", str(dense_model), "--rollout", "hf", "--num-prompts", "6", "--chunk-prompts", "2",
            "--max-new-tokens", "8", "--out", str(tmp_path / "o"), "-q"]  # fmt: skip
    monkeypatch.setattr(PartialStore, "save", full)
    code, _, err = run_cli(argv, capsys)
    assert code == 3 and "no space left" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(PartialStore, "save", real)
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["run"]["resumed_chunks"] == 1 and s["hardware"]["exact_kernels"]
    assert not list((tmp_path / "o").glob(".*.tmp")) and not (tmp_path / "o" / ".trm-lock").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(dense_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    ck = tmp_path / "big-tokenizer"
    shutil.copytree(dense_model, ck)
    tok = AutoTokenizer.from_pretrained(ck)
    tok.add_tokens([f"<|extra{i}|>" for i in range(60)])  # ids 2000..2059: beyond vocab_size 2048
    tok.save_pretrained(ck)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi <|extra59|>"}) + "\n")
    code, _, err = run_cli(["compare", "--model", str(ck), "--rollout", "hf", "--prompts", str(prompts),
                            "--out", str(tmp_path / "o"), "-q"], capsys)  # fmt: skip
    assert code == 2 and "token id 2059, beyond the model's vocab_size 2048" in err and "Traceback" not in err
