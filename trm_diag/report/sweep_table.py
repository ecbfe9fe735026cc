"""The sweep's table and verdict from its per-arm numbers: pure functions over plain dicts.

One row per side: the rollout side (own error only) and every arm (headline metrics of its report, own
error against the reference, decomposition of its gap to the rollout side). SWEEP_COLUMNS is the table's
vocabulary; readers (sweep.parquet, the CLI) take their columns from it.
"""

from __future__ import annotations

import math
from typing import Any

# column -> what it holds (sweep.parquet's schema, README "Sweep")
SWEEP_COLUMNS: dict[str, str] = {
    "arm": "the arm's name (its report is the folder of that name); 'rollout' for the rollout side",
    "kind": "rollout | arm",
    "status": "done | skipped | failed",
    "reason": "why the arm did not run",
    "backend": "backend name",
    "changed": "what differs from the preset's base, in words",
    "spec": "the full backend spec",
    "token_kl_mean": "mean token KL(rollout || arm), the arm report's view",
    "token_kl_p99": "99th percentile of token KL",
    "abs_log_ratio_rms": "rms of log q_arm(y) - log p_roll(y) over sampled tokens",
    "b_star_T": "B* at the observed longest response",
    "b_star_4096": "B* at T = 4096",
    "accept_trm_max": "share of sequences TRM-Max keeps",
    "ref_kl_mean": "own error: mean KL(reference || side) over response tokens",
    "ref_kl_p99": "own error: 99th percentile of that KL",
    "ref_lp_err_rms": "own error: rms of log q_side(y) - log q_ref(y)",
    "gap_lp_rms": "rms of e_arm - e_roll (sampled-token log-prob gap, full tempered rows)",
    "indep_lp_rms": "sqrt(rms(e_roll)^2 + rms(e_arm)^2): the gap independent errors predict",
    "gap_share_roll": "rms(e_roll)^2 / (rms(e_roll)^2 + rms(e_arm)^2): the rollout side's share",
    "err_corr": "correlation of e_roll and e_arm (high: a shared cause)",
}
HORIZON_4096 = 4096
BASELINE_ARM = "trainer-baseline"  # the trainer preset's unchanged spec: the mismatch a default run sees


def _num(x: float) -> float:
    return x if x == x else -math.inf


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one arm's report (its summary.json)."""
    m = summary.get("metrics", {})
    horizons = summary.get("verdict", {}).get("horizons", [])
    at = {h.get("T"): h.get("B_star") for h in horizons}
    observed = next((h.get("B_star") for h in horizons if h.get("observed")), math.nan)
    k2 = m.get("token_k2_mean", math.nan)
    return {
        "token_kl_mean": m.get("token_kl_mean", math.nan),
        "token_kl_p99": m.get("token_kl_p99", math.nan),
        "abs_log_ratio_rms": math.sqrt(2 * k2) if k2 is not None and k2 >= 0 else math.nan,  # k2 = l^2 / 2
        "b_star_T": observed,
        "b_star_4096": at.get(HORIZON_4096, math.nan),
        "accept_trm_max": m.get("accept_trm_max", math.nan),
    }


def table_rows(rollout: dict[str, Any], arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (missing values NaN / ''), the rollout side first, then the arms ranked:
    done arms by own error against the reference (else by KL to the rollout side), then the others."""

    def key(r: dict[str, Any]) -> tuple:
        own, gap = r.get("ref_kl_mean", math.nan), r.get("token_kl_mean", math.nan)
        first = own if own == own else gap
        return (r.get("status") != "done", first if first == first else math.inf, r["arm"])

    text = ("arm", "kind", "status", "reason", "backend", "changed", "spec")
    full = [{c: r.get(c, "" if c in text else math.nan) for c in SWEEP_COLUMNS} for r in [rollout, *arms]]
    return [full[0], *sorted(full[1:], key=key)]


def _g(x: float) -> str:
    return f"{x:.3g}"


def _group(arms: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in arms if r["arm"].startswith(prefix)]


def verdict(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    """Lines answering 'which setting causes the mismatch': which side carries the gap of the default
    trainer (else the largest gap), then the arm that lowers that side's own error most."""
    roll, arms = rows[0], [r for r in rows[1:] if r["status"] == "done"]
    if not arms:
        return ["no arm ran: see the skipped arms' reasons"]
    if not (reference and roll["ref_kl_mean"] == roll["ref_kl_mean"]):
        close = min(arms, key=lambda r: r["token_kl_mean"])
        far = max(arms, key=lambda r: r["token_kl_mean"])
        return [
            f"closest to the rollout side: {close['arm']} ({close['changed']}; token KL mean "
            f"{_g(close['token_kl_mean'])}); farthest: {far['arm']} ({_g(far['token_kl_mean'])})"
        ]
    lines = []
    baseline = [r for r in arms if r["arm"] == BASELINE_ARM]
    gap = baseline[0] if baseline else max(arms, key=lambda r: _num(r["gap_lp_rms"]))
    share = gap["gap_share_roll"]
    engine_side = share != share or share >= 0.5
    if share == share:
        corr = gap["err_corr"]
        side = "the rollout side" if engine_side else f"the arm ({gap['arm']})"
        lines.append(
            f"{'gap' if baseline else 'largest gap'} to {gap['arm']}: rms {_g(gap['gap_lp_rms'])} (independent errors "
            f"predict {_g(gap['indep_lp_rms'])}, correlation {_g(corr) if corr == corr else 'n/a'}); {side} carries "
            f"{max(share, 1 - share):.0%} of it"
        )
    # the side that carries the gap: its preset's arms, measured against that side's own error
    group, base, who = (_group(arms, "engine-"), roll, "the rollout side") if engine_side else (
        _group(arms, "trainer-"), gap, gap["arm"])  # fmt: skip
    group = group or arms
    best = min(group, key=lambda r: r["ref_kl_mean"])
    own, was = best["ref_kl_mean"], base["ref_kl_mean"]
    if own < was:
        times = f"{was / own:.3g}x lower" if own > 0 else "exact"
        lines.insert(0,
            f"the largest reduction comes from {best['changed']} ({best['arm']}): own error against the {reference} "
            f"reference KL {_g(own)}, against {_g(was)} for {who} ({times})"
        )  # fmt: skip
    else:
        lines.insert(0, f"no arm is closer to the {reference} reference than {who} (KL {_g(was)})")
    return lines
