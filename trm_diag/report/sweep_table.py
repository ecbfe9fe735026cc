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
    "against": "the side the arm's report compares it with: empty for the rollout side, else that spec's own scoring "
    "pass (sweep --arms batch: the trainer against itself at batch size 1)",
    "outside_band": "share of tokens whose rho = exp(lp_train - lp_roll) leaves [0.9, 1.1] "
    "(metrics.frac_ratio_outside_10pct)",
    "abs_log_ratio_max": "largest |log rho| over the tokens",
    "ppo_clip_flip_pos": "share of tokens whose PPO clip status (eps 0.2) flips for a positive advantage: rho > 1.2",
    "ppo_clip_flip_neg": "the same for a negative advantage: rho < 0.8 (DAPO's eps_low is the same 0.2)",
    "dapo_clip_flip_pos": "DAPO (eps_high 0.28), positive advantage: rho > 1.28",
    "route_flip_share": "MoE: share of tokens whose expert set differs at one layer at least (routing.token_any_flip_rate)",
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
        "outside_band": m.get("frac_ratio_outside_10pct", math.nan),
        "abs_log_ratio_max": m.get("abs_log_ratio_max", math.nan),
        "ppo_clip_flip_pos": m.get("ppo_clip_flip_pos", math.nan),
        "ppo_clip_flip_neg": m.get("ppo_clip_flip_neg", math.nan),
        "dapo_clip_flip_pos": m.get("dapo_clip_flip_pos", math.nan),
        "route_flip_share": (summary.get("routing") or {}).get("token_any_flip_rate", math.nan),
    }


def table_rows(rollout: dict[str, Any], arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (missing values NaN / ''), the rollout side first, then the arms ranked:
    done arms by own error against the reference (else by KL to the rollout side), then the others."""

    def key(ir: tuple[int, dict[str, Any]]) -> tuple:
        i, r = ir
        own, gap = r.get("ref_kl_mean", math.nan), r.get("token_kl_mean", math.nan)
        first = own if own == own else gap
        if r.get("against"):  # the trainer against itself: after the others, in the preset's order
            return (r.get("status") != "done", True, i, r["arm"])
        return (r.get("status") != "done", False, first if first == first else math.inf, r["arm"])

    text = ("arm", "kind", "status", "reason", "backend", "changed", "spec", "against")
    full = [{c: r.get(c, "" if c in text else math.nan) for c in SWEEP_COLUMNS} for r in [rollout, *arms]]
    return [full[0], *(r for _, r in sorted(enumerate(full[1:]), key=key))]


def _g(x: float) -> str:
    return f"{x:.3g}"


def _group(arms: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in arms if r["arm"].startswith(prefix)]


def verdict(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    """Lines answering 'which setting causes the mismatch': which side carries the gap of the default
    trainer (else the largest gap), then the arm that lowers that side's own error most."""
    roll = rows[0]
    arms = [r for r in rows[1:] if r["status"] == "done" and not r.get("against")]
    batch = batch_verdict(rows)
    if not arms:
        return batch or ["no arm ran: see the skipped arms' reasons"]
    return _verdict(roll, arms, reference) + batch


def _pct(x: float) -> str:
    return f"{x:.1%}" if x == x else "n/a"


def batch_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for the arms compared with the trainer itself (sweep --arms batch): the arm that moves the most tokens
    outside the band, its clip flips, and for MoE the share of tokens regrouping re-routes."""
    arms = [r for r in rows[1:] if r["status"] == "done" and r.get("against")]
    if not arms:
        return []
    worst = max(arms, key=lambda r: (_num(r["outside_band"]), _num(r["abs_log_ratio_max"])))
    lines = [
        f"the trainer against itself ({worst['against']}): {worst['arm']} ({worst['changed']}) moves "
        f"{_pct(worst['outside_band'])} of tokens outside rho in [0.9, 1.1] (largest |log rho| "
        f"{_g(worst['abs_log_ratio_max'])}); PPO clip status flips on {_pct(worst['ppo_clip_flip_pos'])} (A > 0) / "
        f"{_pct(worst['ppo_clip_flip_neg'])} (A < 0) of tokens, DAPO's on {_pct(worst['dapo_clip_flip_pos'])} (A > 0)"
    ]
    moved = [r for r in arms if r["route_flip_share"] == r["route_flip_share"]]
    if moved:
        most = max(moved, key=lambda r: r["route_flip_share"])
        lines.append(f"MoE routing: {most['arm']} ({most['changed']}) changes the expert set of "
                     f"{_pct(most['route_flip_share'])} of tokens at one layer at least")  # fmt: skip
    return lines


def _verdict(roll: dict[str, Any], arms: list[dict[str, Any]], reference: str | None) -> list[str]:
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
    if engine_side:  # a trainer knob cannot lower the rollout side's error: the engine preset's or explicit arms
        group = _group(arms, "engine-") or [r for r in arms if not r["arm"].startswith("trainer-")]
        base, who = roll, "the rollout side"
        if not group:
            lines.insert(0, "the rollout side carries the gap, and no arm changes the rollout spec: add --arms engine "
                         "(or --arm SPEC) to find the setting that lowers it")  # fmt: skip
            return lines
    else:
        group, base, who = _group(arms, "trainer-") or arms, gap, gap["arm"]
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
