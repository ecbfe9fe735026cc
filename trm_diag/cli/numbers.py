"""Numbers as the terminal shows them: one formatter for every table (no heavy imports, so `gate`
renders without numpy)."""

from __future__ import annotations

import math
from typing import Any


def pct(x: Any) -> str:
    """A fraction as a percentage ('n/a' when missing)."""
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number: scientific below 0.01 and from 100,000 on (whole numbers aside), '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return f"{x:,}"
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:  # a count held as a float (summary.json, the gate) reads as a count
        return f"{int(x):,}"
    if 1e-2 <= abs(x) < 1e5:
        short = f"{x:.{digits}g}"
        return short if "e" not in short else f"{x:,.0f}"  # 1375.4: '1,375', never '1.38e+03'
    return f"{x:.{max(digits - 1, 1)}e}"
