"""The sweep's table and verdict from per-arm numbers (pure functions)."""

from __future__ import annotations

import math

from trm_diag.report.sweep_table import SWEEP_COLUMNS, headline, table_rows, verdict

NAN = math.nan


def _arm(name, own, gap, share, kl=1e-4, status="done"):
    return {"arm": name, "kind": "arm", "status": status, "changed": name.split("-", 1)[1], "ref_kl_mean": own,
            "gap_lp_rms": gap, "indep_lp_rms": gap, "gap_share_roll": share, "err_corr": 0.1, "token_kl_mean": kl}  # fmt: skip


ROLL = {"arm": "rollout", "kind": "rollout", "status": "done", "ref_kl_mean": 5e-5}


def test_rows_rank_done_arms_by_own_error_and_fill_every_column():
    arms = [_arm("engine-fp16", 1e-6, 0.01, 0.99), _arm("engine-fp32", 1e-12, 0.01, 1.0),
            {"arm": "engine-x", "status": "skipped", "reason": "no GPU"}]  # fmt: skip
    rows = table_rows(ROLL, arms)
    assert [r["arm"] for r in rows] == ["rollout", "engine-fp32", "engine-fp16", "engine-x"]
    assert all(list(r) == list(SWEEP_COLUMNS) for r in rows)
    assert math.isnan(rows[3]["ref_kl_mean"]) and rows[3]["reason"] == "no GPU"


def test_verdict_names_the_engine_knob_when_the_rollout_side_carries_the_gap():
    rows = table_rows(ROLL, [_arm("trainer-baseline", 1e-12, 0.01, 1.0), _arm("engine-dtype-float32", 2e-12, 0.01, 1.0),
                             _arm("engine-kv-cache-fp8", 3e-3, 0.08, 0.1)])  # fmt: skip
    lines = verdict(rows, "hf:dtype=float64")
    assert lines[0].startswith("the largest reduction comes from dtype-float32 (engine-dtype-float32)")
    assert "2.5e+07x lower" in lines[0]
    assert lines[1].startswith("gap to trainer-baseline") and "the rollout side carries 100%" in lines[1]


def test_verdict_names_the_trainer_knob_when_the_trainer_carries_the_gap():
    rows = table_rows(ROLL, [_arm("trainer-baseline", 4e-4, 0.03, 0.1), _arm("trainer-lm-head-fp32", 1e-5, 0.01, 0.8),
                             _arm("engine-dtype-float32", 1e-12, 0.02, 0.99)])  # fmt: skip
    lines = verdict(rows, "hf:dtype=float64")
    assert "(trainer-lm-head-fp32)" in lines[0] and "for trainer-baseline (40x lower)" in lines[0]
    assert "the arm (trainer-baseline) carries 90%" in lines[1]


def test_verdict_without_reference_or_arms():
    rows = table_rows(
        {**ROLL, "ref_kl_mean": NAN}, [_arm("a-x", NAN, NAN, NAN, kl=1e-3), _arm("b-y", NAN, NAN, NAN, kl=2e-5)]
    )
    assert verdict(rows, None)[0].startswith("closest to the rollout side: b-y")
    assert verdict(table_rows(ROLL, [_arm("a-x", 1, 1, 1, status="skipped")]), "r")[0].startswith("no arm ran")


def test_headline_reads_an_arm_report():
    summary = {"metrics": {"token_kl_mean": 1e-4, "token_kl_p99": 1e-3, "token_k2_mean": 2e-4, "accept_trm_max": 0.9},
               "verdict": {"horizons": [{"T": 50, "observed": True, "B_star": 0.1}, {"T": 4096, "B_star": 3.0}]}}  # fmt: skip
    h = headline(summary)
    assert h["b_star_T"] == 0.1 and h["b_star_4096"] == 3.0 and math.isclose(h["abs_log_ratio_rms"], 0.02)
    assert math.isnan(headline({})["token_kl_mean"])


def test_verdict_with_trainer_arms_only_when_the_rollout_side_carries_the_gap():
    """No trainer knob can lower the rollout side's own error: the verdict asks for engine arms instead of crediting
    a trainer arm whose own error is float64 noise."""
    rows = table_rows(
        ROLL, [_arm("trainer-baseline", 2.7e-13, 0.01, 1.0), _arm("trainer-attn-eager", 1.7e-13, 0.01, 1.0)]
    )
    lines = verdict(rows, "hf:dtype=float64")
    assert lines[0].startswith("the rollout side carries the gap, and no arm changes the rollout spec")
    assert not any("largest reduction" in line for line in lines)
    explicit = table_rows(
        ROLL, [_arm("trainer-baseline", 1e-12, 0.01, 1.0), _arm("hf-dtype-float32", 1e-12, 0.01, 1.0)]
    )
    assert verdict(explicit, "hf:dtype=float64")[0].startswith("the largest reduction comes from dtype-float32")
