"""Two reports side by side: headline numbers, acceptance and bounds, and what got better or worse.

Pure: two summary dicts in, rows out (cli/app.py renders them). Lower is better for divergences and
bounds, higher for acceptance. Whether the two reports are comparable at all (models, tokenizer,
fidelity tier) is gate.comparability's question.
"""

from __future__ import annotations

import math
from typing import Any

from trm_diag.criteria import CRITERIA
from trm_diag.tiers import TIERS
from trm_diag.verdict import verdict

SAME = 1e-9  # relative changes below this read as unchanged


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) else None


def _row(name: str, a: Any, b: Any, lower_is_better: bool) -> dict[str, Any]:
    """One compared quantity: values, absolute and relative change, and 'better' / 'worse' / 'same'."""
    x, y = _num(a), _num(b)
    row: dict[str, Any] = {"metric": name, "a": x, "b": y, "change": None, "relative": None, "direction": None}
    if x is None or y is None:
        return row
    if x == y or (math.isfinite(x) and math.isfinite(y) and abs(y - x) <= SAME * max(abs(x), abs(y))):
        row.update(change=0.0, relative=0.0, direction="same")
        return row
    row["change"] = y - x if math.isfinite(x) or math.isfinite(y) else None
    row["relative"] = (y / x - 1.0) if x not in (0.0,) and math.isfinite(x) and math.isfinite(y) else None
    row["direction"] = "better" if (y < x) == lower_is_better else "worse"
    return row


def diff_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """{'verdicts': (a, b), 'rows': [...]}: B of the comparison is the newer report, A the baseline."""
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    rows = []
    va, vb = a.get("verdict") or verdict(a), b.get("verdict") or verdict(b)
    ba, bb = (v["horizons"][0]["B_star"] if v["horizons"] else None for v in (va, vb))
    rows.append(_row("B* at the observed length", ba, bb, True))
    tier = TIERS.get(b.get("fidelity"), TIERS["exact"])
    for col in (*tier.columns, "abs_log_ratio", "k3"):
        for stat in ("mean", "p99", "max"):
            key = f"token_{col}_{stat}"
            if key in ma or key in mb:
                rows.append(_row(f"token {col} {stat}", ma.get(key), mb.get(key), True))
    for name in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_abs_diff"):
        rows.append(_row(name, ma.get(name), mb.get(name), True))
    for name, c in CRITERIA.items():
        rows.append(_row(f"accepted by {c.label}", ma.get(f"accept_{name}"), mb.get(f"accept_{name}"), False))
    for T in sorted(set(a.get("horizons") or ()) & set(b.get("horizons") or ())):
        ha = next((h["B_star"] for h in va["horizons"] if h["T"] == T), None)
        hb = next((h["B_star"] for h in vb["horizons"] if h["T"] == T), None)
        rows.append(_row(f"B* at T = {T:,}", ha, hb, True))
    return {"verdicts": (va["headline"], vb["headline"]), "rows": rows}
