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

from tests.helpers import run_cli
from trm_diag.assemble import Scored, assemble
from trm_diag.backends.base import Rollout, TensorRows
from trm_diag.config import SamplingConfig, Thresholds
from trm_diag.scoring import token_columns


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


def test_nan_rows_are_flagged_excluded_and_kept_out_of_bounds():
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
    assert math.isfinite(out.summary["bound_inputs"]["delta"]) and math.isfinite(
        out.summary["metrics"]["token_kl_mean"]
    )
    assert out.bounds["value"].notna().any() and not out.bounds["value"].isna().all()
    seq = out.sequences.iloc[0]
    assert math.isclose(seq["kl_max"], float(np.nanmax(cols["kl"])))


def test_zero_probability_tokens_give_infinite_kl_with_a_flag(dense_model, tmp_path, capsys):
    code, *_ = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=float32", "--out", str(tmp_path / "c"),
                        "--num-prompts", "6", "--max-new-tokens", "24", "--save-rollouts", str(tmp_path / "r.jsonl"), "-q"], capsys)  # fmt: skip
    assert code == 0
    # rescore as if the rollout had used top-k 1: most sampled tokens are impossible for the training side
    code, _, err = run_cli(["score", str(tmp_path / "r.jsonl"), "--model", str(dense_model), "--top-k", "1",
                            "--out", str(tmp_path / "s")], capsys)  # fmt: skip
    assert code == 0 and "probability 0" in err
    tok = pd.read_parquet(tmp_path / "s" / "tokens.parquet")
    z = tok["zero_prob"]
    assert z.any() and np.isposinf(tok.loc[z, "k1"]).all() and np.isneginf(tok.loc[z, "log_ratio"]).all()
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["hygiene"]["zero_prob_tokens"] == int(z.sum())
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
