"""The sweep table's batch-shape rows (sweep --arms batch): their columns from an arm's summary, their order, their
verdict lines, and that they stay out of the engine-versus-trainer verdict."""

from __future__ import annotations

import math

from trm_diag.report.sweep_table import headline, table_rows, verdict

ROLL = {"arm": "rollout", "kind": "rollout", "status": "done", "ref_kl_mean": math.nan}
B1 = "hf:dtype=bfloat16,batch_size=1"


def _batch(name, outside, lr_max, flips=(0.0, 0.0, 0.0), routes=math.nan):
    return {"arm": name, "kind": "arm", "status": "done", "changed": name, "against": B1, "outside_band": outside,
            "abs_log_ratio_max": lr_max, "ppo_clip_flip_pos": flips[0], "ppo_clip_flip_neg": flips[1],
            "dapo_clip_flip_pos": flips[2], "route_flip_share": routes, "token_kl_mean": 1e-3}  # fmt: skip


def test_headline_reads_the_band_the_flips_and_the_route_flips_from_an_arms_summary():
    summary = {"metrics": {"frac_ratio_outside_10pct": 0.25, "abs_log_ratio_max": 0.4, "ppo_clip_flip_pos": 0.05,
                           "ppo_clip_flip_neg": 0.04, "dapo_clip_flip_pos": 0.03},
               "routing": {"token_any_flip_rate": 0.125}, "verdict": {}}  # fmt: skip
    h = headline(summary)
    assert (h["outside_band"], h["abs_log_ratio_max"], h["route_flip_share"]) == (0.25, 0.4, 0.125)
    assert (h["ppo_clip_flip_pos"], h["ppo_clip_flip_neg"], h["dapo_clip_flip_pos"]) == (0.05, 0.04, 0.03)
    assert math.isnan(headline({"metrics": {}, "verdict": {}})["route_flip_share"])  # a dense model: no routing


def test_batch_rows_follow_the_other_arms_in_the_presets_order():
    other = {"arm": "trainer-baseline", "kind": "arm", "status": "done", "changed": "x", "ref_kl_mean": math.nan,
             "token_kl_mean": 5.0}  # fmt: skip
    rows = table_rows(ROLL, [_batch("batch-b1", 0, 0), _batch("batch-b8", 0.1, 0.3), other, _batch("batch-b32", 0, 0)])
    assert [r["arm"] for r in rows] == ["rollout", "trainer-baseline", "batch-b1", "batch-b8", "batch-b32"]
    assert rows[1]["against"] == "" and rows[2]["against"] == B1


def test_batch_verdict_names_the_arm_that_moves_the_most_tokens_and_the_moe_routing():
    rows = table_rows(ROLL, [_batch("batch-b1", 0.0, 0.0, routes=0.0), _batch("batch-b8", 0.099, 0.31, (0.017, 0.02, 0.01), 0.05),
                             _batch("batch-regrouped", 0.05, 0.5, routes=0.126)])  # fmt: skip
    lines = verdict(rows, None)
    assert len(lines) == 2  # only batch arms: no engine-versus-trainer line
    assert lines[0].startswith(f"the trainer against itself ({B1}): batch-b8 (batch-b8) moves 9.9% of tokens outside")
    assert "1.7% (A > 0) / 2.0% (A < 0)" in lines[0] and "DAPO's on 1.0%" in lines[0]
    assert (
        lines[1]
        == "MoE routing: batch-regrouped (batch-regrouped) changes the expert set of 12.6% of tokens at one layer at least"
    )


def test_with_no_token_outside_the_band_the_verdict_names_the_largest_log_ratio():
    lines = verdict(table_rows(ROLL, [_batch("batch-b8", 0.0, 0.011), _batch("batch-b32", 0.0, 0.02)]), None)
    assert "batch-b32 (batch-b32) moves 0.0% of tokens" in lines[0] and "largest |log rho| 0.02" in lines[0]
    assert len(lines) == 1  # a dense model: no routing line
