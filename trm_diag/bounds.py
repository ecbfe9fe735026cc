"""Upper bounds on the surrogate error |J(pi_theta) - J(pi_roll) - L(pi_theta)| (paper, Section 3).

Plain floats and numpy, no torch (DESIGN.md section 3). R in [0, 1], sums over t = 1..T.
delta = D_KL^{tok,max}, eps = D_TV^{tok,max}, kl_seq = D_KL^seq, tv_seq = D_TV^seq,
dbar[t-1] = Dbar_t. A bound >= 1 is vacuous (it exceeds the reward range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ZETA_MINUS_HALF = -0.2078862250773545  # zeta(-1/2), for the Euler-Maclaurin tail of sum sqrt(k)
EXACT_SUM_LIMIT = 2_000_000


def _sum_sqrt(m: int) -> float:
    """sum_{k=1}^{m} sqrt(k): exact below EXACT_SUM_LIMIT, Euler-Maclaurin above (rel. err < 1e-15)."""
    if m <= 0:
        return 0.0
    if m <= EXACT_SUM_LIMIT:
        return float(np.sqrt(np.arange(1, m + 1, dtype=np.float64)).sum())
    return (2.0 / 3.0) * m**1.5 + 0.5 * m**0.5 + ZETA_MINUS_HALF + (1.0 / 24.0) * m**-0.5


def sum_min1_linear(T: int, c: float) -> float:
    """sum_{t=1}^{T} min(1, (t-1) c), in closed form."""
    if T <= 0:
        return 0.0
    if c <= 0:
        return 0.0
    k_cap = min(T, int(math.floor(1.0 / c)) + 1)  # k = t-1 in [0, k_cap) have k c < 1 (k c <= 1 at the edge)
    k_cap = max(k_cap, 0)
    below = c * (k_cap - 1) * k_cap / 2.0 if k_cap > 1 else 0.0  # sum_{k=0}^{k_cap-1} k c
    # terms at k >= k_cap are exactly 1; the edge k with k c == 1 is counted in `below` as 1 too
    return below + (T - k_cap)


def sum_min1_sqrt(T: int, c: float) -> float:
    """sum_{t=1}^{T} min(1, sqrt((t-1) c)) for c > 0."""
    if T <= 0 or c <= 0:
        return 0.0
    k_cap = min(T, int(math.floor(1.0 / c)) + 1)  # k = t-1 with sqrt(k c) <= 1
    below = math.sqrt(c) * _sum_sqrt(k_cap - 1) if k_cap > 1 else 0.0  # only k = 0 (c = inf: not inf * 0)
    return below + (T - k_cap)


def classical(T: int, eps: float) -> float:
    """Classical TV form: 2 T (T-1) eps^2 (paper, Sec. 3)."""
    return 2.0 * T * (T - 1) * eps**2


def classical_kl(T: int, delta: float) -> float:
    """Classical KL form: T (T-1) delta (paper, Sec. 3)."""
    return float(T) * (T - 1) * delta


def coupling(T: int, eps: float) -> float:
    """Coupling bound: 4 min(1, eps) sum_t min(1, (t-1) eps) (paper, Sec. 3)."""
    return 4.0 * min(1.0, eps) * sum_min1_linear(T, eps)


def pm_kl(T: int, delta: float) -> float:
    """Pinsker-Marginal KL: 4 min(1, sqrt(delta/2)) sum_t min(1, sqrt((t-1) delta/2)) (paper, Sec. 3)."""
    return 4.0 * min(1.0, math.sqrt(delta / 2.0)) * sum_min1_sqrt(T, delta / 2.0)


def pm_tv(T: int, eps: float, delta: float) -> float:
    """Pinsker-Marginal TV: 4 min(1, eps) sum_t min(1, sqrt((t-1) delta/2)) (paper, Sec. 3)."""
    return 4.0 * min(1.0, eps) * sum_min1_sqrt(T, delta / 2.0)


def mix_kl(T: int, delta: float, kl_seq: float) -> float:
    """Mixed KL: 4 T min(1, sqrt(delta/2)) min(1, sqrt(D_KL^seq/2)) (paper, Sec. 3)."""
    return 4.0 * T * min(1.0, math.sqrt(delta / 2.0)) * min(1.0, math.sqrt(kl_seq / 2.0))


def mix_tv(T: int, eps: float, tv_seq: float) -> float:
    """Mixed TV: 4 T min(1, eps) min(1, D_TV^seq) (paper, Sec. 3)."""
    return 4.0 * T * min(1.0, eps) * min(1.0, tv_seq)


def _remaining(T: int) -> np.ndarray:
    return np.arange(T - 1, -1, -1, dtype=np.float64)  # T - t for t = 1..T


def _times(r: np.ndarray, x: float) -> np.ndarray:
    """(T - t) x, with 0 at t = T even for an infinite x (a zero-probability token gives delta = inf)."""
    with np.errstate(invalid="ignore"):
        return np.where(r > 0, r * x, 0.0)


def adaptive_kl(dbar: np.ndarray, delta: float) -> float:
    """Adaptive KL: 4 sum_t Dbar_t min(1, sqrt((T-t) delta/2)) (paper, Sec. 3); T = len(dbar)."""
    return 4.0 * float(np.sum(dbar * np.minimum(1.0, np.sqrt(_times(_remaining(len(dbar)), delta) / 2.0))))


def adaptive_tv(dbar: np.ndarray, eps: float) -> float:
    """Adaptive TV: 4 sum_t Dbar_t min(1, (T-t) eps) (paper, Sec. 3)."""
    return 4.0 * float(np.sum(dbar * np.minimum(1.0, _times(_remaining(len(dbar)), eps))))


def adaptive_hybrid(dbar: np.ndarray, eps: float, delta: float) -> float:
    """Adaptive hybrid: 4 sum_t Dbar_t min(1, (T-t) eps, sqrt((T-t) delta/2)) (paper, Sec. 3)."""
    r = _remaining(len(dbar))
    return 4.0 * float(np.sum(dbar * np.minimum(np.minimum(1.0, _times(r, eps)), np.sqrt(_times(r, delta) / 2.0))))


@dataclass(frozen=True)
class Bound:
    """One bound of the paper: its name everywhere, its label, the divergence route it takes, the inputs
    it needs (called with them in this order; 'T' is the horizon, 'dbar' the array Dbar_1..T) and
    whether it is a member of the unified minimum B* (DESIGN.md section 3)."""

    name: str
    label: str
    route: str
    inputs: tuple[str, ...]
    fn: Callable[..., float]
    unified: bool


BOUNDS: tuple[Bound, ...] = (
    Bound("classical", "Classical (TV)", "TV", ("T", "eps"), classical, False),
    Bound("classical_kl", "Classical (KL)", "KL", ("T", "delta"), classical_kl, False),
    Bound("coupling", "Coupling", "TV", ("T", "eps"), coupling, True),
    Bound("pm_kl", "Pinsker-Marginal KL", "KL", ("T", "delta"), pm_kl, True),
    Bound("pm_tv", "Pinsker-Marginal TV", "TV+KL", ("T", "eps", "delta"), pm_tv, True),
    Bound("mix_kl", "Mixed KL", "KL", ("T", "delta", "kl_seq"), mix_kl, True),
    Bound("mix_tv", "Mixed TV", "TV", ("T", "eps", "tv_seq"), mix_tv, True),
    Bound("adaptive_kl", "Adaptive KL", "KL", ("dbar", "delta"), adaptive_kl, False),
    Bound("adaptive_tv", "Adaptive TV", "TV", ("dbar", "eps"), adaptive_tv, False),
    Bound("adaptive_hybrid", "Adaptive hybrid", "TV+KL", ("dbar", "eps", "delta"), adaptive_hybrid, True),
)
UNIFIED = "unified"  # B*: the minimum of the members
BOUND_NAMES = (*(b.name for b in BOUNDS), UNIFIED)
UNIFIED_MEMBERS = tuple(b.name for b in BOUNDS if b.unified)
ROUTE = {**{b.name: b.route for b in BOUNDS}, UNIFIED: "min"}
LABEL = {**{b.name: b.label for b in BOUNDS}, UNIFIED: "Unified B*"}


@dataclass
class BoundInputs:
    """Inputs of the bounds and how each was obtained ('given', 'measured', 'modelled', 'heuristic').

    kl_rate / tv_rate: mean per-token KL and TV, used to model D_KL^seq(T) = T * kl_rate
    and Dbar_t beyond the observed positions. seq_T: the horizon at which kl_seq and
    tv_seq were measured (they are used as measured only at that horizon).
    """

    delta: float | None = None
    eps: float | None = None
    kl_seq: float | None = None
    tv_seq: float | None = None
    dbar: np.ndarray | None = None
    kl_rate: float | None = None
    tv_rate: float | None = None
    seq_T: int | None = None
    source: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    SAVED = ("delta", "eps", "kl_seq", "tv_seq", "kl_rate", "tv_rate", "seq_T", "source", "samples")

    def as_dict(self) -> dict[str, object]:
        """The inputs as summary.json keeps them (dbar as a list), so readers need not recompute them."""
        out: dict[str, object] = {k: getattr(self, k) for k in self.SAVED}
        out["dbar"] = None if self.dbar is None else [float(v) for v in self.dbar]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> BoundInputs | None:
        """Inputs saved by :meth:`as_dict`; None for a report written before they were saved."""
        if not isinstance(d, dict) or "dbar" not in d or "seq_T" not in d:
            return None

        def number(v: object) -> bool:
            return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

        dbar = d["dbar"]
        if not all(number(d.get(k)) for k in cls.SAVED[:7]) or not (
            dbar is None or (isinstance(dbar, list) and all(number(v) and v is not None for v in dbar))
        ):
            return None  # damaged: the caller recomputes the inputs from the tables
        kw = {k: d.get(k) for k in cls.SAVED}
        kw["source"], kw["samples"] = dict(d.get("source") or {}), dict(d.get("samples") or {})
        inp = cls(**kw)
        inp.dbar = None if d["dbar"] is None else np.asarray(d["dbar"], dtype=np.float64)
        return inp


def worst_case_dbar(eps: float | None, delta: float | None) -> float:
    """Dbar_t = min(1, eps, sqrt(delta/2)): the paper table's choice when Dbar_t is unknown."""
    vals = [1.0]
    if eps is not None:
        vals.append(eps)
    if delta is not None:
        vals.append(math.sqrt(delta / 2.0))
    return min(vals)


def inputs_at(T: int, inp: BoundInputs) -> tuple[dict[str, float | np.ndarray | None], dict[str, str]]:
    """Inputs at horizon T following DESIGN.md section 3 ('Bounds versus horizon')."""
    src: dict[str, str] = {}
    for k in ("delta", "eps"):
        if getattr(inp, k) is not None:
            src[k] = inp.source.get(k, "given")
    kl_seq, tv_seq = inp.kl_seq, inp.tv_seq
    measured_here = inp.seq_T is None or inp.seq_T == T
    if inp.kl_rate is not None and not (kl_seq is not None and measured_here):
        kl_seq = T * inp.kl_rate
        src["kl_seq"] = "modelled: T * per-token KL"
    elif kl_seq is not None:
        src["kl_seq"] = inp.source.get("kl_seq", "given")
    if tv_seq is not None and measured_here:
        src["tv_seq"] = inp.source.get("tv_seq", "given")
    elif kl_seq is not None:
        tv_seq = min(1.0, math.sqrt(kl_seq / 2.0))
        src["tv_seq"] = "modelled: Pinsker sqrt(D_KL^seq/2)"
    else:
        tv_seq = None
    if inp.dbar is not None:
        dbar = np.zeros(T)
        n = min(T, len(inp.dbar))
        dbar[:n] = inp.dbar[:n]
        if T > len(inp.dbar):
            fill = inp.tv_rate if inp.tv_rate is not None else worst_case_dbar(inp.eps, inp.delta)
            dbar[n:] = fill
            src["dbar"] = f"measured for t <= {len(inp.dbar)}, modelled (mean token TV) beyond"
        else:
            src["dbar"] = inp.source.get("dbar", "measured")
    elif inp.eps is not None or inp.delta is not None:
        dbar = np.full(T, worst_case_dbar(inp.eps, inp.delta))
        src["dbar"] = "worst case min(1, eps, sqrt(delta/2))"
    else:
        dbar = None
    return {"delta": inp.delta, "eps": inp.eps, "kl_seq": kl_seq, "tv_seq": tv_seq, "dbar": dbar}, src


def all_bounds(T: int, inp: BoundInputs) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every bound at horizon T (None where an input is missing), and the input sources."""
    x, src = inputs_at(T, inp)
    x["T"] = T
    b: dict[str, float | None] = {}
    for bound in BOUNDS:
        args = [x[k] for k in bound.inputs]
        b[bound.name] = None if any(a is None for a in args) else bound.fn(*args)
    members = [b[k] for k in UNIFIED_MEMBERS if b[k] is not None]
    b[UNIFIED] = min(members) if members else None
    return b, src


def bounds_table(horizons: list[int], inp: BoundInputs) -> list[dict]:
    """Long-format rows (T, bound, route, value, vacuous, inputs and their sources)."""
    rows = []
    for T in horizons:
        b, src = all_bounds(T, inp)
        x, _ = inputs_at(T, inp)
        for name in BOUND_NAMES:
            v = b[name]
            rows.append(
                {
                    "T": int(T),
                    "bound": name,
                    "route": ROUTE[name],
                    "value": v,
                    "vacuous": None if v is None else bool(v >= 1.0),
                    "delta": x["delta"],
                    "eps": x["eps"],
                    "kl_seq": x["kl_seq"],
                    "tv_seq": x["tv_seq"],
                    "sources": "; ".join(f"{k}: {s}" for k, s in src.items()),
                }
            )
    return rows


def max_delta_for_budget(T: int, budget: float = 1.0, kl_rate: float | None = None) -> float:
    """Largest delta with B*(T) <= budget, eps = sqrt(delta/2) (DESIGN.md section 3, inverse view).

    Sequence terms: D_KL^seq = T * kl_rate when a per-token rate is known, else its worst
    case T * delta; D_TV^seq by Pinsker; Dbar_t = min(1, eps, sqrt(delta/2)).
    """

    def unified_at(delta: float) -> float:
        rate = kl_rate if kl_rate is not None else delta
        inp = BoundInputs(delta=delta, eps=math.sqrt(delta / 2.0), kl_rate=min(rate, delta))
        value = all_bounds(T, inp)[0]["unified"]
        return math.inf if value is None else value

    lo, hi = -40.0, 2.0  # log10 delta
    if unified_at(10**lo) > budget:
        return 0.0
    if unified_at(10**hi) <= budget:
        return 10**hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if unified_at(10**mid) <= budget:
            lo = mid
        else:
            hi = mid
    return 10**lo
