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


def verdict(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    """One line answering 'which setting causes the mismatch', then what the decomposition says."""
    roll, arms = rows[0], [r for r in rows[1:] if r["status"] == "done"]
    if not arms:
        return ["no arm ran: see the skipped arms' reasons"]
    lines = []
    if reference and roll["ref_kl_mean"] == roll["ref_kl_mean"]:
        best = min(arms, key=lambda r: r["ref_kl_mean"])
        own, base = best["ref_kl_mean"], roll["ref_kl_mean"]
        if own < base:
            times = f"{base / own:.3g}x lower" if own > 0 else "exact"
            lines.append(
                f"the largest reduction comes from {best['changed']} ({best['arm']}): own error against the "
                f"{reference} reference KL {_g(own)}, against {_g(base)} for the rollout side ({times})"
            )
        else:
            lines.append(f"no arm is closer to the {reference} reference than the rollout side (KL {_g(base)})")
        # the decomposition of the default trainer's gap, else of the largest gap
        baseline = [r for r in arms if r["arm"] == BASELINE_ARM]
        biggest = baseline[0] if baseline else max(arms, key=lambda r: _num(r["gap_lp_rms"]))
        share = biggest["gap_share_roll"]
        if share == share:
            side = "the rollout side" if share >= 0.5 else f"the arm ({biggest['arm']})"
            corr = biggest["err_corr"]
            what = "gap" if baseline else "largest gap"
            lines.append(
                f"{what} to {biggest['arm']}: rms {_g(biggest['gap_lp_rms'])} (independent errors predict "
                f"{_g(biggest['indep_lp_rms'])}, correlation {_g(corr) if corr == corr else 'n/a'}); "
                f"{side} carries {max(share, 1 - share):.0%} of it"
            )
    else:
        close = min(arms, key=lambda r: r["token_kl_mean"])
        far = max(arms, key=lambda r: r["token_kl_mean"])
        lines.append(
            f"closest to the rollout side: {close['arm']} ({close['changed']}; token KL mean "
            f"{_g(close['token_kl_mean'])}); farthest: {far['arm']} ({_g(far['token_kl_mean'])})"
        )
    return lines
