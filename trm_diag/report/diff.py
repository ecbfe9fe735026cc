"""Two reports side by side: headline numbers, acceptance and bounds, and what got better or worse.

`diff_summaries` is pure: two summary dicts in, rows out (cli/app.py renders them). Which way is
better is data (HEADLINE, and the kinds below): lower for divergences and bounds, higher for
acceptance, nearer 0 for signed estimates. B* is compared only at one T for both reports.
`differences` says what makes the two incomparable (`setup_differences`, which merge refuses on too,
gate's model checks, prompts, horizons); `run_diff` reads two folders, warns or refuses, and diffs them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trm_diag.criteria import CRITERIA
from trm_diag.errors import UsageError
from trm_diag.math.bounds import BoundInputs, all_bounds
from trm_diag.report.verdict import verdict
from trm_diag.tiers import TIERS

SAME_BELOW = 1e-6  # default: relative changes at or below this read as unchanged (float32 rounding is ~6e-8)

LOWER, HIGHER, NEARER_ZERO = "lower", "higher", "nearer 0"  # which way is better
# Summary metrics the diff shows and which way is better. A signed metric estimates a non-negative
# quantity but can land on either side of 0 (verl's k1 mean `kl`, the chi2 estimates): the nearer 0
# the better, so magnitudes are compared and a move from +1e-4 to -5e-3 is worse.
HEADLINE: dict[str, str] = {
    "kl": NEARER_ZERO,
    "k3_kl": LOWER,
    "chi2_token": NEARER_ZERO,
    "chi2_seq": NEARER_ZERO,
    "log_ppl_abs_diff": LOWER,
}
TOKEN_EXTRA = ("abs_log_ratio", "k3")  # token columns of every tier shown besides the tier's own (all >= 0)
MUST_MATCH = ("fidelity", "sampling", "thresholds", "compared_distribution", "view")  # summary keys of one setup
BACKEND = {"rollout backend": "rollout", "train backend": "train"}  # setup_differences' names for the specs


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) else None


def _row(
    name: str, a: Any, b: Any, better: str, same_below: float, unit: str | None = None, T: Any = None
) -> dict[str, Any]:
    """One compared quantity: values, absolute change, relative change (of the magnitudes for a
    signed metric) and 'better' / 'worse' / 'same' (relative change at or below ``same_below``)."""
    x, y = _num(a), _num(b)
    row: dict[str, Any] = {"metric": name, "a": x, "b": y, "better": better, "unit": unit, "T": T,
                           "change": None, "relative": None, "direction": None, "note": None}  # fmt: skip
    if x is None or y is None:
        if (x is None) != (y is None):
            row["note"] = f"{'A' if x is None else 'B'} has no value"
        return row
    if x != y and (math.isfinite(x) or math.isfinite(y)):
        row["change"] = y - x
    elif x == y:
        row["change"] = 0.0
    mx, my = (abs(x), abs(y)) if better == NEARER_ZERO else (x, y)  # what is compared
    if mx != 0.0 and math.isfinite(mx) and math.isfinite(my):
        row["relative"] = my / mx - 1.0
    if mx == my or (math.isfinite(mx) and math.isfinite(my) and abs(my - mx) <= same_below * max(abs(mx), abs(my))):
        row["direction"] = "same"
    else:
        row["direction"] = "better" if (my > mx) == (better == HIGHER) else "worse"
    return row


def _observed_T(summary: dict[str, Any]) -> int | None:
    t = (summary.get("bound_inputs") or {}).get("observed_T")
    return t if isinstance(t, int) and not isinstance(t, bool) else None


def b_star(summary: dict[str, Any], T: int) -> float | None:
    """B* of a report at horizon T: the saved value at its observed length, else from its saved
    bound inputs (as the verdict computes its horizons); None when the report has neither."""
    if T == _observed_T(summary):
        saved = _num((summary.get("bounds_at_observed_T") or {}).get("unified"))
        if saved is not None:
            return saved
    inp = BoundInputs.from_dict(summary.get("bound_inputs") or {})
    return None if inp is None else _num(all_bounds(T, inp)[0]["unified"])


def _horizons(summary: dict[str, Any]) -> list[int]:
    return [t for t in summary.get("horizons") or () if isinstance(t, int) and not isinstance(t, bool)]


def _b_star_rows(a: dict[str, Any], b: dict[str, Any], same_below: float) -> list[dict[str, Any]]:
    """B* at the observed lengths (compared only when they are one T), then at every T either report
    observed or lists as a horizon, both computed at that T."""
    ta, tb = _observed_T(a), _observed_T(b)
    first = _row("B* at the observed length", None if ta is None else b_star(a, ta),
                 None if tb is None else b_star(b, tb), LOWER, same_below, T=[ta, tb])  # fmt: skip
    rows = [first]
    if ta != tb:
        first.update(change=None, relative=None, direction=None, note="other T: compared below")
    whose = {ta: "A's length", tb: "B's length"} if ta != tb else {}
    for T in sorted({t for t in (ta, tb) if t is not None and ta != tb} | {*_horizons(a), *_horizons(b)}):
        if T == ta == tb:
            continue
        row = _row(f"B* at T = {T:,}", b_star(a, T), b_star(b, T), LOWER, same_below, T=[T, T])
        row["note"] = row["note"] or whose.get(T)
        rows.append(row)
    return rows


def _kl_seq_kind(summary: dict[str, Any]) -> str | None:
    """How a sampled-tier report's D_KL^seq was estimated: its k1 mean (reports before the upper value), the
    mean's upper 95% value, or None (another tier, or not said)."""
    if summary.get("fidelity") != "sampled":
        return None
    source = str(((summary.get("bound_inputs") or {}).get("source") or {}).get("kl_seq", ""))
    return "the k1 mean" if "k1 mean over" in source else "its upper 95% value" if "upper one-sided" in source else None


def diff_summaries(a: dict[str, Any], b: dict[str, Any], same_below: float = SAME_BELOW) -> dict[str, Any]:
    """{'verdicts': (a, b), 'rows': [...], 'changes': [...], 'same_below'}: B is the newer report, A the baseline."""
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    va, vb = a.get("verdict") or verdict(a), b.get("verdict") or verdict(b)
    rows = _b_star_rows(a, b, same_below)
    ka, kb = _kl_seq_kind(a), _kl_seq_kind(b)
    if ka and kb and ka != kb:  # one set of rollouts gives another B*: not a change of the run
        for row in rows:
            row["note"] = row["note"] or f"D_KL^seq is {ka} in A, {kb} in B (another trm-diag version)"
    columns = dict.fromkeys((*TIERS.get(a.get("fidelity"), TIERS["exact"]).columns,
                             *TIERS.get(b.get("fidelity"), TIERS["exact"]).columns, *TOKEN_EXTRA))  # fmt: skip
    for col in columns:
        for stat in ("mean", "p99", "max"):
            key = f"token_{col}_{stat}"
            if key in ma or key in mb:
                rows.append(_row(f"token {col} {stat}", ma.get(key), mb.get(key), LOWER, same_below))
    for name, better in HEADLINE.items():
        rows.append(_row(name, ma.get(name), mb.get(name), better, same_below))
    for name, c in CRITERIA.items():
        key = f"accept_{name}"
        rows.append(_row(f"accepted by {c.label}", ma.get(key), mb.get(key), HIGHER, same_below, unit="fraction"))
    return {"verdicts": (va["headline"], vb["headline"]), "rows": rows, "changes": changes(a, b),
            "same_below": same_below}  # fmt: skip


def setup_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two reports' setups: the MUST_MATCH keys, then 'rollout backend' /
    'train backend' where that side's spec differs. merge refuses any of them; diff warns or names them."""
    out = [key for key in MUST_MATCH if a.get(key) != b.get(key)]
    specs = {what: ((a.get(side) or {}).get("spec"), (b.get(side) or {}).get("spec")) for what, side in BACKEND.items()}
    return out + [what for what, (x, y) in specs.items() if x != y]


def _backend(summary: dict[str, Any], side: str) -> str:
    s = summary.get(side) or {}
    return str(s["spec"]) if s.get("spec") else f"file {s['source']}" if s.get("source") else "unknown"


def changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The backends that differ, in words: what a diff usually compares, so said, not warned about."""
    return [f"{what}: {_backend(a, BACKEND[what])} -> {_backend(b, BACKEND[what])}"
            for what in setup_differences(a, b) if what in BACKEND]  # fmt: skip


def _what(key: str, x: Any, y: Any) -> str:
    """A summary key that differs, in words: with the fields of two dicts that differ ('sampling
    (top_p 0.9 vs 1.0)'), or both values when short."""
    name = ("the " if key in ("view", "compared_distribution") else "") + key.replace("_", " ")
    if isinstance(x, dict) and isinstance(y, dict):
        keys = [k for k in dict.fromkeys((*x, *y)) if x.get(k) != y.get(k)]
        return f"{name} ({', '.join(f'{k} {x.get(k)} vs {y.get(k)}' for k in keys)})"
    return f"{name} ({x} vs {y})" if max(len(str(x)), len(str(y))) <= 24 else name


def prompt_set(folder: str | Path) -> frozenset[bytes]:
    """Digests of the distinct prompts (their token ids) of a report, read from sequences.parquet a
    batch at a time; InputError when the table cannot be read."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from trm_diag.report.tables import unreadable

    path = Path(folder) / "sequences.parquet"
    out: set[bytes] = set()
    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=["prompt_token_ids"], batch_size=4096):
            col = batch.column(0)
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
            ends = np.cumsum(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False))
            for lo, hi in zip(ends - np.diff(ends, prepend=0), ends):
                out.add(hashlib.blake2b(flat[lo:hi].tobytes(), digest_size=16).digest())
    except (OSError, ValueError, KeyError) as e:
        raise unreadable(path, e) from None
    return frozenset(out)


def differences(
    a: dict[str, Any], b: dict[str, Any], prompts: tuple[frozenset[bytes], frozenset[bytes]] | None = None
) -> list[str]:
    """What makes two reports' numbers unlike, in words: other models, tokenizer or tier (gate's
    check), every setup difference merge refuses but the backends (which `changes` names), other
    prompts (``prompts``: the two `prompt_set`s) and other horizons. Empty: comparable."""
    from trm_diag.report.gate import comparability

    out = comparability(a, b)  # names the fidelity tier already
    for key in setup_differences(a, b):
        if key != "fidelity" and key not in BACKEND:
            out.append(_what(key, a.get(key), b.get(key)))
    if prompts is not None and prompts[0] != prompts[1]:
        pa, pb = prompts
        out.append(f"the prompts ({len(pa):,} vs {len(pb):,} distinct, {len(pa & pb):,} in common)")
    ha, hb = _horizons(a), _horizons(b)
    if "horizons" in a and "horizons" in b and ha != hb:
        out.append(f"horizons ({', '.join(map(str, ha)) or 'none'} vs {', '.join(map(str, hb)) or 'none'}; "
                   "B* is compared at every T of either)")  # fmt: skip
    return out


def run_diff(
    baseline: str,
    report: str,
    strict: bool = False,
    same_below: float = SAME_BELOW,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Diff two report folders (B = ``report`` against A = ``baseline``). Differences that make them
    unlike are warned about, or with ``strict`` refused (UsageError)."""
    from trm_diag.report.tables import complete_report

    if not (math.isfinite(same_below) and 0.0 <= same_below < 1.0):
        raise UsageError(f"--same-below {same_below} is not a relative size in [0, 1)", "pass e.g. 1e-6")
    (_, a), (_, b) = complete_report(baseline), complete_report(report)  # tables: prompt_set reads one
    found = differences(a, b, (prompt_set(baseline), prompt_set(report)))
    if found:
        text = f"'{baseline}' and '{report}' differ in {'; '.join(found)}"
        if strict:
            raise UsageError(text, "diff reports of one setup (models, prompts, sampling, thresholds, view, horizons), "
                             "or drop --strict")  # fmt: skip
        warn(f"{text}: the changes compare unlike things")
    return {"baseline": baseline, "report": report, "comparable": not found, "differences": found,
            **diff_summaries(a, b, same_below)}  # fmt: skip
