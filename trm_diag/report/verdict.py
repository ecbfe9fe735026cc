"""The verdict of a report: inside or outside the trust region, and the findings that explain it.

A pure function of summary.json's content (so `show` gives it for any saved report). The rules
and their thresholds are written down in docs/decisions.md ('Verdict and advice'); each finding
names what it saw and the action it suggests.
"""

from __future__ import annotations

import math
from typing import Any

from trm_diag.math.bounds import BoundInputs, all_bounds, delta_for_budget

ACCEPTANCE_TARGET = 0.7  # the paper advises keeping more than 70% of sequences
LOW_PROB_SHARE = 0.5  # findings: more than half the KL on tokens the rollout gave < 1% probability
ROUTING_SHARE = 0.5  # more than half the KL on tokens whose expert set flipped
PREFILL_GAP = 1e-3  # decode-time and prefill log-probs of the rollout engine differ by more than this
WIDE_INTERVALS = 10.0  # mean certified upper end KL over 10x its lower end: the top-K tier cannot decide
SAMPLER_SHARE = 10.0  # the pipeline view's KL mean over 10x the numerical one: the sampler's side causes it
FEW_ROLLOUTS = 30  # D_TV^seq, D_KL^seq and Dbar_t are Monte-Carlo means: fewer rollouts and INSIDE is said so


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) else None


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def horizon_verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """B* at the observed length and at each horizon of the run, and whether it is below 1."""
    out = []
    bi = summary.get("bound_inputs") or {}
    t_obs = bi.get("observed_T")
    at_obs = (summary.get("bounds_at_observed_T") or {}).get("unified")
    if isinstance(t_obs, int):
        out.append({"T": t_obs, "observed": True, "B_star": _num(at_obs) if at_obs is not None else None})
    inp = BoundInputs.from_dict(bi)
    for T in summary.get("horizons") or ():
        if inp is not None and isinstance(T, int) and T != t_obs:
            out.append({"T": T, "observed": False, "B_star": _num(all_bounds(T, inp)[0]["unified"])})
    for row in out:
        b = row["B_star"]
        row["inside"] = None if b is None else b < 1.0
    return out


def _rollouts(summary: dict[str, Any]) -> int | None:
    """How many rollouts with a scored token the sequence-level bound inputs average over (None: not said)."""
    samples = (summary.get("bound_inputs") or {}).get("samples") or {}
    n = samples.get("sequences")
    return None if not isinstance(n, int) else n - int(samples.get("empty_sequences") or 0)


def findings(summary: dict[str, Any]) -> list[dict[str, str]]:
    """What explains the verdict, most important first: {'id', 'finding', 'action'}."""
    m = summary.get("metrics") or {}
    th = summary.get("thresholds") or {}
    fidelity = summary.get("fidelity")
    out: list[dict[str, str]] = []
    horizons = horizon_verdicts(summary)
    observed = next((h for h in horizons if h["observed"]), None)
    n = _rollouts(summary)
    if observed and observed["B_star"] is not None and observed["B_star"] < 1 and n is not None and n < FEW_ROLLOUTS:
        out.append({
            "id": "few_rollouts",
            "finding": f"B* rests on D_TV^seq, D_KL^seq and Dbar_t averaged over {n} rollout(s): a Monte-Carlo mean "
            f"this small can read far below the true value (D_TV^seq is 0 whenever every sampled rollout has "
            f"prod rho >= 1), so INSIDE is not yet established",
            "action": f"score at least {FEW_ROLLOUTS} rollouts (--num-prompts, --samples) before trusting INSIDE",
        })  # fmt: skip
    if observed and observed["B_star"] is not None and observed["B_star"] >= 1:
        T = observed["T"]
        inv = delta_for_budget(T, 1.0, _num((summary.get("bound_inputs") or {}).get("kl_rate")))
        mask = (
            f"mask with TRM-Max at delta <= {_fmt(inv.delta)} (the largest delta with B* <= 1 at T = {T:,}; "
            f"{inv.assumption}; `trm-diag bounds --report DIR --budget 1` gives it at other T), or "
            if inv.delta
            else ""
        )
        out.append({
            "id": "vacuous_bound",
            "finding": f"B* = {_fmt(observed['B_star'])} >= 1 at the observed length T = {T:,}: the paper's bounds "
            "guarantee nothing for these rollouts",
            "action": f"{mask}reduce the mismatch itself (same dtype and kernels on both sides)",
        })  # fmt: skip
    accept = _num(m.get("accept_combined"))
    if accept is not None and accept < ACCEPTANCE_TARGET:
        keep = (summary.get("masking") or {}).get("thresholds_for_target") or {}
        hint = ", ".join(
            f"{k} <= {_fmt(_num(v))}" for k, v in keep.items() if k in ("trm_max", "trm_avg") and v is not None
        )
        out.append({
            "id": "low_acceptance",
            "finding": f"TRM Max+Avg keeps {100 * accept:.1f}% of sequences at trm_max = {th.get('trm_max')}, "
            f"trm_avg = {th.get('trm_avg')} (the paper advises more than {100 * ACCEPTANCE_TARGET:.0f}%)",
            "action": f"thresholds that keep {100 * ACCEPTANCE_TARGET:.0f}% here: {hint}" if hint
            else "reduce the mismatch, or raise the thresholds",
        })  # fmt: skip
    zero = int((summary.get("hygiene") or {}).get("zero_prob_tokens") or 0)
    if zero:
        out.append({
            "id": "impossible_tokens",
            "finding": f"{zero:,} sampled token(s) have probability 0 on one side: their KL is infinite",
            "action": "check the rollout log-probs (an engine never samples a token it gives probability 0): "
            "padding or -inf values in an export, or a temperature that differs between the file and --temperature",
        })  # fmt: skip
    share = _num(m.get("kl_share_low_prob"))
    if share is not None and share > LOW_PROB_SHARE:
        out.append({
            "id": "low_probability_tokens",
            "finding": f"{100 * share:.0f}% of the KL sits on tokens the rollout gave less than 1% probability",
            "action": "the tail of the sampler drives the mismatch: compare with the truncation the pipeline "
            "samples with (--top-p / --top-k / --min-p), or mask such tokens",
        })  # fmt: skip
    r = summary.get("routing") or {}
    if r.get("available"):
        flip, rest = r.get("kl_flip") or {}, r.get("kl_no_flip") or {}
        mf, nf, mr, nr = (_num(flip.get("mean")), flip.get("n") or 0, _num(rest.get("mean")), rest.get("n") or 0)
        total = (mf or 0) * nf + (mr or 0) * nr
        if total > 0 and mf is not None and (mf * nf) / total > ROUTING_SHARE:
            out.append({
                "id": "routing_flips",
                "finding": f"tokens whose expert set flipped ({100 * r.get('token_any_flip_rate', 0):.1f}% of tokens) "
                f"carry {100 * mf * nf / total:.0f}% of the KL",
                "action": "replay the rollout's routing in training (routing replay), or train in the rollout's precision",
            })  # fmt: skip
    gap = _num(m.get("prefill_gap_abs_max"))
    if fidelity == "exact" and gap is not None and gap > PREFILL_GAP:
        out.append({
            "id": "prefill_gap",
            "finding": f"the rollout engine's decode-time log-probs differ from its own prefill by up to {_fmt(gap)}",
            "action": "its decode and prefill paths differ (kernels that are not batch-invariant, or KV-cache "
            "precision): use batch-invariant kernels, or rescore the rollouts in prefill",
        })  # fmt: skip
    out += _sampler_findings(summary)
    lo, hi = _num(m.get("token_kl_lo_mean")), _num(m.get("token_kl_hi_mean"))
    if fidelity == "topk" and hi is not None and (lo is None or hi > WIDE_INTERVALS * max(lo, 1e-12)):
        out.append({
            "id": "wide_intervals",
            "finding": f"the top-K intervals are too wide to decide (mean KL between {_fmt(lo)} and {_fmt(hi)})",
            "action": "use --fidelity exact, or record more log-probs (a larger --topk)",
        })  # fmt: skip
    bad = _nan_tokens(summary)
    if bad:
        out.append({
            "id": "nan_logits",
            "finding": f"{bad:,} token(s) had NaN logits on a side: the sequences holding them fail every mask, and "
            "no bound holds over tokens nobody could score",
            "action": "try dtype=float32 on the failing side",
        })  # fmt: skip
    est = summary.get("estimators") or {}
    if est.get("sampler_matches_view") is False:
        greedy = str(est.get("sampler", "")).startswith("greedy")  # no view makes the argmax path a draw
        out.append({
            "id": "other_sampler",
            "finding": f"the bound inputs D_KL^seq, D_TV^seq and Dbar_t are estimates: {est.get('sampler', '')}",
            "action": "sample with --temperature > 0 for bounds over draws of pi_roll, or treat these as estimates"
            if greedy
            else "read the bounds of the pipeline view (the distribution the rollouts were drawn from: "
            "--view pipeline with processed log-probs), or treat these as estimates",
        })  # fmt: skip
    if fidelity == "sampled":
        out.append({
            "id": "heuristic",
            "finding": "only the sampled tokens' log-probs are known: the bounds and masks are heuristic",
            "action": "use compare (exact tier), or export the engine's top-K log-probs (top-K tier)",
        })  # fmt: skip
    return out


def _sampler_findings(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The mismatch a pipeline adds on top of the numerics (views.py): raw log-probs of a tempered sampler,
    and truncation the trainer does not replay; judged from the three views' KL means."""
    s = summary.get("sampling") or {}
    by_view = (summary.get("views") or {}).get("by_view") or {}
    pipe, full = (_num((by_view.get(v) or {}).get("kl_mean")) for v in ("pipeline", "full"))
    replay = _num((by_view.get("replay") or {}).get("kl_mean"))
    out = _k3_findings(summary)
    tempered = s.get("temperature") not in (None, 0, 1, 1.0)
    if s.get("logprobs") == "raw" and tempered:
        seen = f" (pipeline view KL mean {_fmt(pipe)} against {_fmt(full)} for the numerics)" if pipe and full else ""
        out.append({
            "id": "raw_logprobs",
            "finding": f"the rollout engine reports raw log-probs (untempered, untruncated) while it samples at "
            f"temperature {s['temperature']:g}: the trainer's ratio carries the temperature{seen}",
            "action": "have the engine report the distribution it samples from (vLLM: logprobs_mode="
            "processed_logprobs, trm-diag spec key logprobs=processed)",
        })  # fmt: skip
    elif pipe is not None and full is not None and pipe > SAMPLER_SHARE * max(full, 1e-300):
        out.append({
            "id": "truncation",
            "finding": f"truncated sampling causes most of the mismatch: pipeline view KL mean {_fmt(pipe)} "
            f"against {_fmt(full)} for the numerics alone",
            "action": "replay the sampler's kept set in training (sampling-mask replay: the replay view, "
            f"KL mean {_fmt(replay)}), or sample without top-p / top-k / min-p",
        })  # fmt: skip
    return out


def _nan_tokens(summary: dict[str, Any]) -> int:
    """Scored tokens that are NaN (non-finite logits on a side): the report's hygiene count."""
    return int((summary.get("hygiene") or {}).get("nonfinite_tokens") or 0)


def _k3_findings(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Under truncated sampling E[k3] = KL - (1 - Q_t) and E|rho - 1| = 2 TV - (1 - Q_t) (docs/design.md
    section 9): how far a pipeline that masks or logs on k3 (verl's k3_kl, k3 rejection masks) or on |rho - 1|
    is off, measured on this report's own tokens against the unbiased k1 mean and (1 - rho)^+."""
    m = summary.get("metrics") or {}
    k1, k3 = _num(m.get("kl")), _num(m.get("k3_kl"))
    ser, tv = _num(m.get("abs_rho_m1_mean")), _num(m.get("tv_mc_mean"))
    matches = (summary.get("estimators") or {}).get("sampler_matches_view") is not False
    # the replay view renormalises q on the kept set (E[rho] = 1: k3 unbiased); another sampler has no unbiased k1
    if not (summary.get("views") or {}).get("truncated") or summary.get("view", "pipeline") != "pipeline":
        return []
    if not matches or k1 is None or k3 is None or k3 >= k1:
        return []
    low = f"{k1 / k3:.3g}x below" if k3 > 0 else "not positive, below"
    extra = (
        f"; mean |rho - 1| (SER, LN-TRM) {_fmt(ser)} against 2 (1 - rho)^+ {_fmt(2 * tv)}"
        if ser is not None and tv is not None
        else ""
    )
    return [{
        "id": "k3_truncation",
        "finding": f"sampling is truncated: verl's k3_kl {_fmt(k3)} is {low} the unbiased k1 mean {_fmt(k1)} on "
        f"the same tokens (E[k3] = KL - (1 - Q_t) misses the trainer's mass outside the kept set){extra}",
        "action": "a pipeline that masks or logs on k3 (verl rollout_rs k3, k3_kl) or on |rho - 1| sees too little "
        "mismatch here: mask on k1 means or (1 - rho)^+ (what this report's criteria use), or replay the kept set",
    }]  # fmt: skip


def _where(first: Any) -> str:
    return f"sequence {first['seq_id']}, position {first['pos']}" if isinstance(first, dict) else "an unknown place"


def bitwise_line(summary: dict[str, Any]) -> str | None:
    """The certificate in one line (summary.json `certification`, certify.py): 'BITWISE EQUAL on N tokens', or
    'differs on N tokens, first at sequence s, position p' (full rows named too in the exact tier); None for a
    report written before certification existed."""
    from trm_diag.math.certify import bitwise_equal

    c = summary.get("certification")
    if not isinstance(c, dict) or not isinstance(c.get("n_tokens"), int):
        return None
    n = c["n_tokens"]
    rows = c.get("n_rows_differing")
    if not isinstance(c.get("n_tokens_differing"), int) or isinstance(c.get("n_tokens_differing"), bool):
        return f"not certified: the certification's token count is missing or damaged (on {n:,} tokens)"
    if bitwise_equal(c):
        also = " (their full rows too)" if rows == 0 else ""
        return f"BITWISE EQUAL on {n:,} tokens{also}"
    k = c.get("n_tokens_differing") or 0
    parts = []
    if k:
        parts.append(
            f"differs on {k:,} of {n:,} tokens, first at {_where(c.get('first_token_differing'))} "
            f"(max |log ratio| {_fmt(_num(c.get('max_abs_log_ratio')))})"
        )
    if rows:
        parts.append(f"full rows differ at {rows:,} tokens, first at {_where(c.get('first_row_differing'))}")
    elif "n_rows_differing" in c and rows is None:
        parts.append("full rows were not compared")
    if not parts:  # bit patterns differ only where the values are equal (0.0 against -0.0)
        parts.append(f"differs on {k:,} of {n:,} tokens")
    return "; ".join(parts)


def not_comparable(summary: dict[str, Any]) -> str | None:
    """'NOT COMPARABLE: <what differs>' when the report's comparability checks failed (summary.json
    `comparable`, report/comparable.py), else None."""
    c = summary.get("comparable")
    if isinstance(c, dict) and c.get("ok") is False:
        return "NOT COMPARABLE: " + "; ".join(str(x) for x in c.get("differs") or ["the two sides differ"])
    return None


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """{'status', 'headline', 'horizons', 'acceptance', 'findings', 'bitwise'} for a report's summary
    (docs/design.md s.3-4); status 'not comparable' when the two sides failed a comparability check."""
    m = summary.get("metrics") or {}
    horizons = horizon_verdicts(summary)
    observed = next((h for h in horizons if h["observed"]), None)
    accept = _num(m.get("accept_combined"))
    b = observed["B_star"] if observed else None
    if b is None:
        status = "unknown"
    elif b >= 1:
        status = "outside"
    elif accept is not None and accept < ACCEPTANCE_TARGET:
        status = "inside, masking too much"
    else:
        status = "inside"
    where = f"at the observed length T = {observed['T']:,}" if observed else ""
    nan = _nan_tokens(summary)
    if nan:  # a NaN token could hide any divergence: neither a bound nor the masks' verdict holds
        status = "unknown"
    headline = {
        "unknown": f"UNKNOWN: {nan:,} scored token(s) are NaN (non-finite logits on a side); no bound holds over "
        "tokens nobody could score"
        if nan
        else "no bound could be computed for this report",
        "outside": f"OUTSIDE the trust region {where}: B* = {_fmt(b)} >= 1 (the bound is vacuous)",
        "inside, masking too much": f"INSIDE the trust region {where} (B* = {_fmt(b)} < 1), but the masks keep only "
        f"{100 * (accept or 0):.0f}% of sequences (target > {100 * ACCEPTANCE_TARGET:.0f}%)",
        "inside": f"INSIDE the trust region {where}: B* = {_fmt(b)} < 1"
        + (f"; the masks keep {100 * accept:.0f}% of sequences" if accept is not None else ""),
    }[status]
    later = [h for h in horizons if not h["observed"] and h["inside"] is False]
    if status.startswith("inside") and later:
        headline += f"; outside from T = {later[0]['T']:,} on"
    n = _rollouts(summary)
    if status.startswith("inside") and n is not None and n < FEW_ROLLOUTS:
        headline += f" (from {n} rollout{'s' if n != 1 else ''} only: see findings)"
    if summary.get("fidelity") == "sampled" and status != "unknown":
        headline += " (heuristic: sampled tier)"
    elif (summary.get("estimators") or {}).get("sampler_matches_view") is False and status != "unknown":
        headline += " (estimate: the rollouts were drawn from another distribution than this view's pi_roll)"
    refused = not_comparable(summary)
    if refused:  # drift between unlike sides is no drift: the checks' verdict comes first
        status, headline = "not comparable", refused
    return {
        "status": status,
        "headline": headline,
        "bitwise": bitwise_line(summary),
        "horizons": horizons,
        "acceptance": {"combined": accept, "trm_max": _num(m.get("accept_trm_max")), "target": ACCEPTANCE_TARGET},
        "findings": findings(summary),
    }
