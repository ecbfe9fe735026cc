"""`trm-diag sweep` end to end on real engines: arms, the float64 reference, skips, resume, readers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import run_cli
from trm_diag.backends import load_backend, parse_spec
from trm_diag.config import SamplingConfig
from trm_diag.errors import UsageError
from trm_diag.report.sweep_table import SWEEP_COLUMNS
from trm_diag.report.tables import complete_report
from trm_diag.run.pipeline import Reporter
from trm_diag.run.sweep import SweepConfig, run_sweep

SAMPLING = SamplingConfig(max_new_tokens=24, topk=0)
ROLL = "hf:dtype=float32,batch_size=1"


def _cfg(model, prompts, out, arms, rollout=ROLL, reference="hf:dtype=float64", **kw) -> SweepConfig:
    return SweepConfig(
        rollout=parse_spec(rollout), train=parse_spec("hf:dtype=float32"), arms=tuple(arms),
        reference=parse_spec(reference) if reference else None, model=str(model), prompts=str(prompts),
        out=str(out), sampling=SAMPLING, num_prompts=kw.pop("num_prompts", 6), **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_sweep(tmp_path_factory, dense_model, prompts_file):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    arms = [ROLL, "hf:dtype=bfloat16", "hf:attn=flash_attention_2", "hf:attn=no_such_kernel"]
    result = run_sweep(_cfg(dense_model, prompts_file, out, arms))
    rows = {r["arm"]: r for r in pd.read_parquet(out / "sweep.parquet").to_dict("records")}
    return out, result.summary, rows


def test_an_arm_equal_to_the_batch_invariant_rollout_spec_shows_zero_mismatch(hf_sweep):
    _, _, rows = hf_sweep
    same = rows["hf-dtype-float32-batch-size-1"]
    assert same["status"] == "done"
    assert same["token_kl_mean"] == 0 and same["gap_lp_rms"] == 0 and same["b_star_4096"] == 0
    assert same["ref_kl_mean"] == rows["rollout"]["ref_kl_mean"]  # the same rows: the same own error


def test_fp32_own_error_is_far_below_bf16_against_the_float64_reference(hf_sweep):
    _, summary, rows = hf_sweep
    fp32, bf16 = rows["hf-dtype-float32-batch-size-1"], rows["hf-dtype-bfloat16"]
    assert 0 < fp32["ref_kl_mean"] < 1e-6 * bf16["ref_kl_mean"]
    assert fp32["ref_lp_err_rms"] < 1e-3 * bf16["ref_lp_err_rms"]
    # an accurate rollout side: the gap to the bf16 arm is the bf16 arm's own error
    assert bf16["gap_share_roll"] < 1e-4
    assert math.isclose(bf16["gap_lp_rms"], bf16["ref_lp_err_rms"], rel_tol=1e-3)
    # the bf16 arm carries the gap; the fp32 spec is the setting that removes it
    assert (
        "(hf-dtype-float32-batch-size-1)" in summary["verdict"][0] and "for hf-dtype-bfloat16" in summary["verdict"][0]
    )
    assert "the arm (hf-dtype-bfloat16) carries 100%" in summary["verdict"][1]


def test_own_error_matches_a_direct_float64_recomputation(hf_sweep, dense_model):
    out, _, rows = hf_sweep
    saved = pd.read_parquet(out / "rollouts.parquet")  # the rollouts the sweep sampled once
    pairs = [(list(p), list(r)) for p, r in zip(saved["prompt_ids"], saved["response_ids"])]
    errs = []
    ref = load_backend(parse_spec("hf:dtype=float64").with_model(str(dense_model)))
    arm = load_backend(parse_spec("hf:dtype=bfloat16").with_model(str(dense_model)))
    for rr, ar, (_, resp) in zip(ref.score(pairs, SAMPLING), arm.score(pairs, SAMPLING), pairs):
        y = torch.tensor(resp)[:, None]
        lr = torch.log_softmax(rr.scores(0, rr.length).double(), -1).gather(-1, y)
        la = torch.log_softmax(ar.scores(0, ar.length).double(), -1).gather(-1, y)
        errs.append((la - lr).squeeze(-1).numpy())
    e = np.concatenate(errs)
    assert math.isclose(rows["hf-dtype-bfloat16"]["ref_lp_err_rms"], float(np.sqrt(np.mean(e**2))), rel_tol=1e-9)


def test_arms_that_cannot_run_are_listed_with_the_reason(hf_sweep):
    _, summary, rows = hf_sweep
    assert rows["hf-attn-flash-attention-2"]["status"] == "skipped"
    assert "flash_attn" in rows["hf-attn-flash-attention-2"]["reason"]
    assert rows["hf-attn-no-such-kernel"]["status"] == "failed"
    assert "no_such_kernel" in rows["hf-attn-no-such-kernel"]["reason"]
    assert summary["arms"]["hf-dtype-bfloat16"]["spec"].startswith("hf:model=")  # the full spec is kept
    assert list(pd.read_parquet(hf_sweep[0] / "sweep.parquet").columns) == list(SWEEP_COLUMNS)


def test_every_arm_folder_is_a_normal_report(hf_sweep, capsys):
    out, _, _ = hf_sweep
    _, s = complete_report(out / "hf-dtype-bfloat16")
    assert s["train"]["spec"].startswith("hf:model=") and "dtype=bfloat16" in s["train"]["spec"]
    assert s["rollout"]["spec"].endswith("dtype=float32,batch_size=1")
    code, _, _ = run_cli(["gate", str(out / "hf-dtype-bfloat16"), "--rule", "token.kl.mean <= 1"], capsys)
    assert code == 0
    code, text, _ = run_cli(["show", str(out)], capsys)
    assert code == 0 and "largest reduction" in text and "hf-dtype-bfloat16" in text
    code, _, err = run_cli(["gate", str(out), "--rule", "token.kl.mean <= 1"], capsys)
    assert code == 2 and "holds a sweep, not a report" in err


class _StopAt(Reporter):
    """Interrupts the run when a phase of this name starts (as Ctrl-C would)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def phase(self, name: str, total: int, unit: str = "", steps: int = 1):
        if name.startswith(self.name):
            raise KeyboardInterrupt
        return super().phase(name, total, unit, steps)


def test_resume_after_an_interrupted_arm_gives_the_same_sweep_table(tmp_path, dense_model, prompts_file):
    arms = ["hf:dtype=bfloat16", "hf:dtype=float16", "hf:dtype=float32"]
    full = run_sweep(
        _cfg(dense_model, prompts_file, tmp_path / "full", arms, rollout="hf:dtype=bfloat16", num_prompts=4)
    )
    cut = _cfg(dense_model, prompts_file, tmp_path / "cut", arms, rollout="hf:dtype=bfloat16", num_prompts=4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cut, _StopAt("score hf-dtype-float16"))
    assert (tmp_path / "cut" / "hf-dtype-bfloat16" / "summary.json").is_file()  # the finished arm is kept
    assert not (tmp_path / "cut" / "summary.json").exists()  # no half sweep looks complete
    with pytest.raises(UsageError, match="interrupted run"):
        run_sweep(cut)  # neither --resume nor --overwrite
    before = (tmp_path / "cut" / "hf-dtype-bfloat16" / "summary.json").stat().st_mtime_ns
    resumed = run_sweep(SweepConfig(**{**cut.__dict__, "resume": True}))
    assert (tmp_path / "cut" / "hf-dtype-bfloat16" / "summary.json").stat().st_mtime_ns == before  # not re-run
    numbers = [c for c in SWEEP_COLUMNS if c not in ("reason",)]
    a = pd.DataFrame(full.summary["table"])[numbers]
    b = pd.DataFrame(resumed.summary["table"])[numbers]
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)
    assert not (tmp_path / "cut" / ".trm-partial").exists()


def test_sweep_with_vllm_rollout_and_a_vllm_arm(tmp_path, dense_model, prompts_file):
    arms = ["vllm:dtype=float32", "hf:dtype=float32"]
    cfg = _cfg(dense_model, prompts_file, tmp_path / "v", arms, rollout="vllm:dtype=bfloat16", num_prompts=4)
    summary = run_sweep(cfg).summary
    rows = {r["arm"]: r for r in summary["table"]}
    v32, h32, roll = rows["vllm-dtype-float32"], rows["hf-dtype-float32"], rows["rollout"]
    assert v32["status"] == "done" and h32["status"] == "done"
    assert v32["ref_kl_mean"] < 1e-4 * roll["ref_kl_mean"]  # vLLM in fp32 is close to exact arithmetic
    assert h32["ref_kl_mean"] < 1e-4 * roll["ref_kl_mean"]
    assert roll["ref_kl_mean"] > 1e-7  # the bf16 engine's own error is real
    assert abs(v32["token_kl_mean"] / h32["token_kl_mean"] - 1) < 0.05  # both fp32 sides: the same gap
    assert summary["rollout"]["spec"].startswith("vllm:")


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(["sweep", "--arms", "nope", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "not a preset" in err and "Traceback" not in err
    code, _, err = run_cli(["sweep", "--resume", "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "no interrupted run" in err
    assert not (tmp_path / "s").exists()


class _Warnings(Reporter):
    """Keeps the run's warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_a_moe_sweep_runs_with_the_float64_reference(tmp_path, moe_model, prompts_file):
    """transformers' grouped expert matmul has no float64 kernel: the default reference runs the experts one by one."""
    cfg = _cfg(moe_model, prompts_file, tmp_path / "moe", ["hf:dtype=bfloat16", "hf:dtype=float64"], num_prompts=2)
    rows = {r["arm"]: r for r in run_sweep(cfg).summary["table"]}
    assert rows["hf-dtype-bfloat16"]["status"] == "done" and rows["hf-dtype-float64"]["status"] == "done"
    assert rows["hf-dtype-float64"]["ref_kl_mean"] == 0  # the reference's own spec: the same float64 rows
    assert 0 < rows["rollout"]["ref_kl_mean"] < rows["hf-dtype-bfloat16"]["ref_kl_mean"]


def test_a_reference_that_fails_keeps_the_rollouts_and_resumes_with_another(
    tmp_path, moe_model, prompts_file, monkeypatch, capsys
):
    """A reference that fails while scoring (here: transformers' grouped expert matmul in float64, as before the
    per-expert loop) is one line, and the sampled rollouts survive a resume with another reference."""
    import trm_diag.backends.hf as hf

    monkeypatch.setattr(hf, "FLOAT64_EXPERTS", "grouped_mm")
    out = tmp_path / "ref"
    argv = ["sweep", "--model", str(moe_model), "--rollout", "hf:dtype=bfloat16", "--arm", "hf:dtype=float32",
            "--num-prompts", "2", "--max-new-tokens", "8", "--out", str(out), "-q"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 3 and "the reference hf:dtype=float64 failed while scoring" in err and "Traceback" not in err
    assert "--resume and another --reference" in err and len(err.strip().splitlines()) == 1
    saved = out / ".trm-partial" / "chunk-00000.generated.parquet"
    before = pd.read_parquet(saved)
    code, _, err = run_cli([*argv, "--resume", "--reference", "hf:dtype=float32"], capsys)
    assert code == 0, err
    assert "the reference changed (hf:dtype=float64 -> hf:dtype=float32)" in err
    kept = pd.read_parquet(out / "rollouts.parquet")  # the rollouts sampled before the failure, not new ones
    assert [list(x) for x in kept["response_ids"]] == [list(x) for x in before["response_ids"]]
    arm = {r["arm"]: r for r in pd.read_parquet(out / "sweep.parquet").to_dict("records")}["hf-dtype-float32"]
    assert arm["status"] == "done" and arm["ref_kl_mean"] == 0  # measured against the new reference (itself)


def test_an_arm_that_fails_while_scoring_is_listed_failed_and_the_sweep_finishes(
    tmp_path, moe_model, prompts_file, monkeypatch
):
    import trm_diag.backends.hf as hf

    monkeypatch.setattr(hf, "FLOAT64_EXPERTS", "grouped_mm")
    cfg = _cfg(moe_model, prompts_file, tmp_path / "arm", ["hf:dtype=float64", "hf:dtype=bfloat16"],
               reference="hf:dtype=float32", num_prompts=2)  # fmt: skip
    rep = _Warnings()
    rows = {r["arm"]: r for r in run_sweep(cfg, rep).summary["table"]}
    assert rows["hf-dtype-float64"]["status"] == "failed" and "Double" in rows["hf-dtype-float64"]["reason"]
    assert rows["hf-dtype-bfloat16"]["status"] == "done"
    assert not (tmp_path / "arm" / "hf-dtype-float64").exists()  # no half-written arm report
    assert any(w.startswith("arm hf-dtype-float64 failed while scoring") for w in rep.warnings)


def test_a_resumed_sweep_with_fewer_arms_keeps_the_finished_ones_and_says_so(tmp_path, dense_model, prompts_file,
                                                                            capsys):  # fmt: skip
    arms = ["hf:dtype=bfloat16", "hf:dtype=float16", "hf:dtype=float32"]
    cut = _cfg(dense_model, prompts_file, tmp_path / "cut", arms, rollout="hf:dtype=bfloat16", num_prompts=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cut, _StopAt("score hf-dtype-float32"))
    # readers name the command that finishes the folder: the sweep (not compare), for the sweep and its arm
    for folder, needle in (
        (cut.out, "holds an interrupted sweep"),
        (f"{cut.out}/hf-dtype-float32", "an arm of a sweep"),
    ):
        code, _, err = run_cli(["show", folder], capsys)
        assert code == 2 and needle in err and "trm-diag sweep ... --resume" in err and "compare" not in err, err
    rep = _Warnings()
    fewer = SweepConfig(**{**cut.__dict__, "arms": ("hf:dtype=float32", "hf:dtype=bfloat16"), "resume": True})
    rows = {r["arm"]: r for r in run_sweep(fewer, rep).summary["table"]}
    assert set(rows) == {"rollout", "hf-dtype-bfloat16", "hf-dtype-float16", "hf-dtype-float32"}
    assert rows["hf-dtype-float16"]["status"] == "done"
    assert any("hf-dtype-float16 (finished earlier, not among this command's arms) is kept" in w for w in rep.warnings)


def test_cli_refuses_a_vllm_float64_spec_before_any_work(tmp_path, dense_model, capsys):
    out = tmp_path / "v64"
    argv = ["sweep", "--model", str(dense_model), "--rollout", "hf:dtype=float32", "--arm", "hf:dtype=bfloat16",
            "--reference", "vllm:dtype=float64", "--num-prompts", "1", "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "does not run in dtype=float64" in err and "hf:dtype=float64" in err
    assert "Traceback" not in err and not out.exists()  # refused before sampling: nothing written
    for spec in ("vllm:dtype=double", "vllm:dtype=fp64"):
        with pytest.raises(UsageError, match="float64"):
            parse_spec(spec)


def test_show_a_sweep_as_markdown_and_refuse_html(hf_sweep, capsys):
    out, _, _ = hf_sweep
    code, text, _ = run_cli(["show", str(out), "--format", "markdown"], capsys)
    assert code == 0 and "| arm | own KL |" in text and "| hf-dtype-bfloat16 |" in text
    assert not set("─━│┃") & set(text)  # no box-drawn text
    assert "- skipped `hf-attn-flash-attention-2`" in text
    code, _, err = run_cli(["show", str(out), "--html"], capsys)
    assert code == 2 and "holds a sweep" in err and "hf-dtype-bfloat16" in err and "--html" in err
    assert not (out / "report.html").exists()


def test_readers_of_a_folder_a_live_run_holds_say_it_is_live(tmp_path, capsys):
    from trm_diag.report.outputs import PARTIAL_DIR, claim_out_dir

    folder = tmp_path / "live"
    with claim_out_dir(folder, overwrite=False, warn=print):
        (folder / PARTIAL_DIR).mkdir()
        code, _, err = run_cli(["show", str(folder)], capsys)
        assert code == 2 and "still writing" in err and "interrupted" not in err and "wait for it" in err, err
    code, _, err = run_cli(["show", str(folder)], capsys)  # the run is gone: an interrupted run now
    assert code == 2 and "interrupted run" in err
