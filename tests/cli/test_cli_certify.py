"""Certification and comparability end to end: `gate --bitwise` on a pair built to be identical and on bf16 vs
fp32, and `score` refusing rollouts whose weights, token ids or sampling settings are not the training side's
(NOT COMPARABLE, exit 2) unless a second checkpoint is asked for (--other-checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_cli

COMMON = ["--num-prompts", "4", "--max-new-tokens", "16", "-q"]


def _compare(out, rollout, capsys, *extra):
    code, _, err = run_cli(["compare", "--rollout", rollout, "--train", "hf:dtype=float32", "--out", str(out),
                            *COMMON, *extra], capsys)  # fmt: skip
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # the C kernel (built in ~0.2 s), not `auto`, whose first timing compiles torch.compile's kernel (seconds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRM_DIAG_KERNEL", "native")
        yield tmp_path_factory.mktemp("certify")


class _Cap:
    """run_cli's capture, for module fixtures (no capsys there): output goes to the terminal."""

    def readouterr(self):
        return type("C", (), {"out": "", "err": ""})()


@pytest.fixture(scope="module")
def same(runs, dense_model):
    rollouts = runs / "rollouts.jsonl"
    out = _compare(runs / "same", "hf:dtype=float32,seed=0", _Cap(), "--model", str(dense_model),
                   "--save-rollouts", str(rollouts))  # fmt: skip
    return out, rollouts


@pytest.fixture(scope="module")
def bf16(runs, dense_model):
    return _compare(runs / "bf16", "hf:dtype=bfloat16", _Cap(), "--model", str(dense_model))


def _bit_count(tok: pd.DataFrame) -> tuple[int, tuple[int, int] | None]:
    """Independent reference: tokens whose two float64 log-probs differ in any byte, and the first one."""
    a, b = tok["lp_roll_prefill"].to_numpy(), tok["lp_train"].to_numpy()
    hits = [i for i in range(len(a)) if a[i].tobytes() != b[i].tobytes()]
    first = (int(tok["seq_id"].iloc[hits[0]]), int(tok["pos"].iloc[hits[0]])) if hits else None
    return len(hits), first


def test_gate_bitwise_passes_on_an_identical_pair(same, capsys):
    out, _ = same
    s = json.loads((out / "summary.json").read_text())
    tok = pd.read_parquet(out / "tokens.parquet")
    c = s["certification"]
    assert s["train"]["spec"] != s["rollout"]["spec"] and not s["same_backend_instance"]  # two engines loaded
    assert c["n_tokens_differing"] == _bit_count(tok)[0] == 0 and c["n_tokens"] == len(tok) > 0
    assert c["n_rows_differing"] == int(tok["row_differs"].sum()) == 0 and c["max_abs_log_ratio"] == 0
    code, text, err = run_cli(["gate", str(out), "--bitwise"], capsys)
    assert code == 0, err
    assert f"BITWISE EQUAL on {len(tok)} tokens" in text and "3/3 rules passed" in text


def test_gate_bitwise_fails_on_bf16_vs_fp32_naming_the_first_differing_token(bf16, capsys):
    s = json.loads((bf16 / "summary.json").read_text())
    tok = pd.read_parquet(bf16 / "tokens.parquet")
    n, first = _bit_count(tok)
    c = s["certification"]
    assert c["n_tokens_differing"] == n > 0
    assert (c["first_token_differing"]["seq_id"], c["first_token_differing"]["pos"]) == first
    ref = np.abs(tok["lp_train"].to_numpy() - tok["lp_roll_prefill"].to_numpy()).max()
    assert c["max_abs_log_ratio"] == pytest.approx(ref, rel=1e-12)
    assert c["n_rows_differing"] == int(tok["row_differs"].sum()) > 0
    code, text, _ = run_cli(["gate", str(bf16), "--bitwise", "--format", "table"], capsys)
    assert code == 1
    assert f"differs on {n} of {len(tok)} tokens, first at sequence {first[0]}, position {first[1]}" in text
    assert s["verdict"]["bitwise"].startswith(f"differs on {n}")
    # --bitwise adds its rules to the user's; a JSON result lists all of them
    code, text, _ = run_cli(["gate", str(bf16), "--bitwise", "-r", "token.kl.max <= 1", "--format", "json"], capsys)
    data = json.loads(text)
    assert code == 1 and data["n_rules"] == 4 and data["n_failed"] == 3


def test_saved_rollouts_record_the_weights_and_score_against_them(same, dense_model, tmp_path, capsys):
    out, rollouts = same
    rows = [json.loads(x) for x in rollouts.read_text().splitlines()]
    fp = json.loads((out / "summary.json").read_text())["rollout"]["weights_fingerprint"]
    assert fp and all(r["weights_fingerprint"] == fp for r in rows)
    code, _, err = run_cli(["score", str(rollouts), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q"],
                           capsys)  # fmt: skip
    assert code == 0, err
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["comparable"]["ok"] and s["comparable"]["weights"]["same"] is True


@pytest.fixture(scope="module")
def one_tensor_changed(tmp_path_factory, dense_model):
    """The bundled model with one weight of layer 1's MLP moved: the same size, the same first MiB."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("changed") / "model"
    shutil.copytree(dense_model, path)
    sd = load_file(dense_model / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] += 0.01
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_score_refuses_rollouts_of_another_checkpoint_unless_asked(same, one_tensor_changed, tmp_path, capsys):
    from trm_diag.backends.fingerprint import weights_fingerprint
    from trm_diag.report.assemble import model_fingerprint

    _, rollouts = same
    # the quick fingerprint (first MiB and sizes) cannot tell the two apart; the weights fingerprint can
    bundled = rollouts.parent / "same"
    s = json.loads((bundled / "summary.json").read_text())
    assert model_fingerprint(str(one_tensor_changed)) == s["train"]["model_fingerprint"]
    assert weights_fingerprint(one_tensor_changed) != s["train"]["weights_fingerprint"]
    argv = ["score", str(rollouts), "--model", str(one_tensor_changed), "--out", str(tmp_path / "s"), "-q"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "NOT COMPARABLE" in err and "weights" in err and "--other-checkpoint" in err
    assert "Traceback" not in err and not (tmp_path / "s").exists()  # no report, no folder
    code, _, err = run_cli([*argv, "--other-checkpoint"], capsys)
    assert code == 0, err
    w = json.loads((tmp_path / "s" / "summary.json").read_text())["comparable"]["weights"]
    assert w["same"] is False and w["two_checkpoints"] is True


def test_score_refuses_token_ids_that_are_not_the_prompt_text(same, dense_model, tmp_path, capsys):
    _, rollouts = same
    row = json.loads(rollouts.read_text().splitlines()[0])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_model)
    good = {**row, "prompt": tok.decode(row["prompt_ids"], skip_special_tokens=False)}
    assert (
        tok(good["prompt"])["input_ids"] == row["prompt_ids"]
        or tok(good["prompt"], add_special_tokens=False)["input_ids"] == row["prompt_ids"]
    )  # the decoded text gives the ids back: comparable
    bad = {**row, "prompt": good["prompt"] + " and more"}
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code, _, err = run_cli(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q",
                            "--allow-duplicates"], capsys)  # fmt: skip
    assert code == 2 and "NOT COMPARABLE" in err and f"{f}:2" in err and "not its prompt text's tokens" in err
    f.write_text(json.dumps(good) + "\n")
    code, _, err = run_cli(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "s"), "-q"], capsys)
    assert code == 0, err
    user = "What is 2+2?"  # a raw user message whose ids went through the chat template: comparable too
    ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    chat = {**row, "prompt": user, "prompt_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)}
    f.write_text(json.dumps(chat) + "\n")
    code, _, err = run_cli(["score", str(f), "--model", str(dense_model), "--out", str(tmp_path / "c"), "-q"], capsys)
    assert code == 0, err


def test_score_refuses_a_sampling_setting_the_rollouts_contradict(same, dense_model, tmp_path, capsys):
    _, rollouts = same  # recorded at temperature 1
    code, _, err = run_cli(["score", str(rollouts), "--model", str(dense_model), "--temperature", "0.7", "--out",
                            str(tmp_path / "s"), "-q"], capsys)  # fmt: skip
    assert code == 2 and "NOT COMPARABLE" in err and "temperature 0.7" in err


def test_gate_bitwise_refuses_a_report_of_two_checkpoints():
    from trm_diag.report.comparable import NotComparable, require_gateable

    s = {"comparable": {"ok": True, "weights": {"rollout": "a" * 64, "train": "b" * 64, "same": False}}}
    with pytest.raises(NotComparable, match="two checkpoints"):
        require_gateable(s, "r", bitwise=True)
    require_gateable(s, "r", bitwise=False)  # drift rules still apply to a staleness audit
    with pytest.raises(NotComparable, match="NOT COMPARABLE: report 'r': the weights differ"):
        require_gateable({"comparable": {"ok": False, "differs": ["the weights differ"]}}, "r", bitwise=False)
