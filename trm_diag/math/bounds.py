"""Upper bounds on the surrogate error |J(pi_theta) - J(pi_roll) - L(pi_theta)| (paper, Section 3).

Plain floats and numpy, no torch (docs/design.md section 3). R in [0, 1], sums over t = 1..T.
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
    """(T - t) x, with 0 at t = T even for an infinite x (a zero-probability token gives delta = inf);
    a product past the float range is inf, which every min(1, .) turns into 1."""
    with np.errstate(invalid="ignore", over="ignore"):
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


def adaptive_hybrid_flat(T: int, dbar: float, eps: float, delta: float) -> float:
    """Adaptive hybrid with the same Dbar_t at every t, in closed form (no length-T arrays):
    4 Dbar sum_{r=0}^{T-1} min(1, r eps, sqrt(r delta/2)), r = T - t. r eps is the smaller term
    exactly for r <= (delta/2) / eps^2, so the sum splits into a linear and a square-root part."""
    if T <= 1 or dbar <= 0 or eps <= 0 or delta <= 0:
        return 0.0
    c = delta / 2.0
    sq = eps * eps
    ratio = math.inf if sq == 0 else c / sq  # eps^2 below the float range: every r takes the linear term
    if math.isnan(ratio):  # eps and delta both infinite: every term with r >= 1 is 1
        n_lin = 1
    else:
        n_lin = T if ratio >= T else int(math.floor(ratio)) + 1  # r = 0 .. n_lin-1 take the linear term
    linear = sum_min1_linear(n_lin, eps)
    root = sum_min1_sqrt(T, c) - sum_min1_sqrt(n_lin, c) if n_lin < T else 0.0
    return 4.0 * dbar * (linear + root)


@dataclass(frozen=True)
class Bound:
    """One bound of the paper: its name everywhere, its label, the divergence route it takes, the inputs
    it needs (called with them in this order; 'T' is the horizon, 'dbar' the array Dbar_1..T) and
    whether it is a member of the unified minimum B* (docs/design.md section 3)."""

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
    tv_seq were measured (they are used as measured only at that horizon). kl_seq_mean: in
    the sampled tier, the k1 mean itself (unbiased, may be negative), of which kl_seq is the
    upper 95% confidence value the bounds take; None elsewhere (kl_seq is the mean there).
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
    kl_seq_mean: float | None = None

    SAVED = ("delta", "eps", "kl_seq", "tv_seq", "kl_rate", "tv_rate", "seq_T", "source", "samples", "kl_seq_mean")

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

        def number(v: object) -> bool:  # divergences and rates are >= 0 (+inf allowed), never NaN
            return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)

        dbar, seq_t = d["dbar"], d.get("seq_T")
        if (
            not all(number(d.get(k)) for k in cls.SAVED[:6])
            or not (d.get("kl_seq_mean") is None or type(d["kl_seq_mean"]) in (int, float))  # signed: a k1 mean
            or not (seq_t is None or (isinstance(seq_t, int) and not isinstance(seq_t, bool) and seq_t >= 1))
            or not (dbar is None or (isinstance(dbar, list) and all(number(v) and v is not None for v in dbar)))
        ):
            return None  # damaged: the caller recomputes the inputs from the tables
        kw = {k: d.get(k) for k in cls.SAVED}
        kw["source"], kw["samples"] = (
            {} if not isinstance(d.get(k), dict) else dict(d[k]) for k in ("source", "samples")
        )
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
    """Inputs at horizon T following docs/design.md section 3 ('Bounds versus horizon')."""
    src: dict[str, str] = {}
    for k in ("delta", "eps"):
        if getattr(inp, k) is not None:
            src[k] = inp.source.get(k, "given")
    kl_seq, tv_seq = inp.kl_seq, inp.tv_seq
    measured_here = inp.seq_T is None or inp.seq_T == T
    if inp.kl_rate is not None and not (kl_seq is not None and measured_here):
        kl_seq = T * inp.kl_rate
        src["kl_seq"] = f"modelled: T * per-token KL {inp.kl_rate:.3g}"
    elif kl_seq is not None:
        src["kl_seq"] = inp.source.get("kl_seq", "given")
    if tv_seq is not None and measured_here:
        src["tv_seq"] = inp.source.get("tv_seq", "given")
    elif kl_seq is not None:
        tv_seq = min(1.0, math.sqrt(kl_seq / 2.0))
        src["tv_seq"] = "modelled: Pinsker sqrt(D_KL^seq/2), at most 1"
    else:
        tv_seq = None
    if inp.dbar is not None:
        dbar = np.zeros(T)
        n = min(T, len(inp.dbar))
        dbar[:n] = inp.dbar[:n]
        if T > len(inp.dbar):
            if inp.tv_rate is not None:
                fill, how = inp.tv_rate, "mean token TV"
            else:
                fill, how = worst_case_dbar(inp.eps, inp.delta), "worst case min(1, eps, sqrt(delta/2))"
            dbar[n:] = fill
            src["dbar"] = f"measured for t <= {len(inp.dbar)}, modelled beyond ({how} {fill:.3g})"
        else:
            src["dbar"] = inp.source.get("dbar", "measured")
    elif inp.eps is not None or inp.delta is not None:
        fill = worst_case_dbar(inp.eps, inp.delta)
        dbar = np.full(T, fill)
        src["dbar"] = f"worst case min(1, eps, sqrt(delta/2)) = {fill:.3g}"
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


@dataclass(frozen=True)
class BudgetDelta:
    """The inverse view at one horizon (docs/design.md section 3): the largest TRM-Max delta with
    B*(T) <= budget. delta None: every delta keeps B* within the budget (T = 1, or a budget at or
    above B*'s ceiling). eps = min(1, sqrt(delta/2)). kl_rate: the per-token KL rate the sequence
    terms used (None: none was known, the worst case D_KL^seq = T * delta); assumption: that in words."""

    T: int
    budget: float
    delta: float | None
    eps: float | None
    kl_rate: float | None
    assumption: str


DELTA_FLAT = 2.0  # B* no longer grows with delta from here on: eps = 1 and every min(1, .) is saturated


def unified_for_threshold(T: int, delta: float, kl_rate: float | None = None) -> float:
    """B*(T) if TRM-Max masked at delta: eps = min(1, sqrt(delta/2)), D_KL^seq = T * min(kl_rate, delta)
    (T * delta without a rate), D_TV^seq by Pinsker, Dbar_t = min(1, eps, sqrt(delta/2)) at every t.

    The same inputs as :func:`all_bounds` gets from BoundInputs(delta, eps, kl_rate=min(kl_rate, delta)),
    with the adaptive hybrid in closed form, so one value costs O(1) at any T."""
    eps = min(1.0, math.sqrt(delta / 2.0))
    kl_seq = T * (delta if kl_rate is None else min(kl_rate, delta))
    x: dict[str, float] = {"T": T, "delta": delta, "eps": eps, "kl_seq": kl_seq}
    x["tv_seq"] = min(1.0, math.sqrt(kl_seq / 2.0))
    flat = {"adaptive_hybrid": lambda: adaptive_hybrid_flat(T, worst_case_dbar(eps, delta), eps, delta)}
    values = [flat[b.name]() if "dbar" in b.inputs else b.fn(*(x[k] for k in b.inputs)) for b in BOUNDS if b.unified]
    return min(values)


def usable_rate(kl_rate: float | None) -> float | None:
    """A per-token KL rate the inverse view can use (finite or +inf, >= 0); None otherwise."""
    if kl_rate is None or isinstance(kl_rate, bool) or not isinstance(kl_rate, (int, float)):
        return None
    return float(kl_rate) if kl_rate >= 0 else None  # NaN compares False


def delta_for_budget(T: int, budget: float = 1.0, kl_rate: float | None = None) -> BudgetDelta:
    """The largest delta with B*(T) <= budget (docs/design.md section 3, inverse view), with the measured
    per-token KL rate for the sequence terms when one is known: the one answer to "which TRM-Max
    threshold keeps the bound below the budget", for the verdict and `bounds --budget` alike.

    B* grows with delta (:func:`unified_for_threshold`), so a bisection on log delta finds it to a
    relative 1e-12; it starts from budget / (2 T^1.5), below which B* <= PM-KL <= 2 T^1.5 delta holds.
    """
    rate = usable_rate(kl_rate)
    if rate is None:
        assumption = "D_KL^seq = T * delta (worst case: no per-token KL rate known)"
    else:
        assumption = f"D_KL^seq = T * min({rate:.3g}, delta), {rate:.3g} the measured per-token KL rate"

    def result(delta: float | None) -> BudgetDelta:
        eps = None if delta is None else min(1.0, math.sqrt(delta / 2.0))
        return BudgetDelta(int(T), float(budget), delta, eps, rate, assumption)

    if unified_for_threshold(T, DELTA_FLAT, rate) <= budget:
        return result(None)
    lo, hi = budget / (2.0 * float(T) ** 1.5), DELTA_FLAT
    while lo > 0 and unified_for_threshold(T, lo, rate) > budget:  # rounding only: the bound above holds
        lo /= 2.0
    if lo <= 0:
        return result(0.0)
    for _ in range(200):
        if hi <= lo * (1.0 + 1e-12):
            break
        mid = math.sqrt(lo * hi)
        if unified_for_threshold(T, mid, rate) <= budget:
            lo = mid
        else:
            hi = mid
    return result(lo)


def pinsker_conflicts(delta: float | None, eps: float | None, kl_seq: float | None, tv_seq: float | None) -> list[str]:
    """Given inputs that no pair of distributions can have: Pinsker's TV <= sqrt(KL/2) holds at every
    token (so eps <= sqrt(delta/2)) and for the sequences, and a TV of 0 means a KL of 0."""
    out = []
    for tv, kl, tv_name, kl_name in ((eps, delta, "eps", "delta"), (tv_seq, kl_seq, "tv-seq", "kl-seq")):
        if tv is None or kl is None:
            continue
        if tv == 0 and kl > 0:
            out.append(
                f"--{tv_name} 0 with --{kl_name} {kl:g} contradict each other: a total variation of 0 means "
                f"identical distributions, whose KL is 0"
            )
        elif tv > math.sqrt(kl / 2.0) * (1.0 + 1e-9):
            out.append(
                f"--{tv_name} {tv:g} exceeds Pinsker's sqrt({kl_name}/2) = {math.sqrt(kl / 2.0):.3g}: no "
                f"distributions have TV {tv:g} with KL {kl:g}; check both values"
            )
    return out
