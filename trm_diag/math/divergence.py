"""Per-token divergences between the rollout policy p and the training policy q.

Pure tensor functions, no I/O (docs/design.md section 2). Sign convention everywhere:
log_ratio l_t = log q(y_t) - log p(y_t) = lp_train - lp_roll, rho_t = exp(l_t).
"""

from __future__ import annotations

import math

import torch

from trm_diag.kernels import DIVERGENCES, OUTPUTS, choice

# Rows of a [rows, V] chunk are chosen so one chunk holds about this many elements;
# memory of exact_divergences is then bounded independently of N.
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M floats = 16 MB per temporary

EXACT_KEYS = DIVERGENCES  # the exact tier's per-token divergences and entropies


def _kl_terms(lp: torch.Tensor, lq: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row sums of KL(p||q) [n], written as sum_{p>0} p (r - 1 - log r) + q(p = 0), r = q/p.

    Each term is non-negative, so rounding never makes KL negative, and supports that
    differ (top-k / top-p truncation) give the exact value, +inf when q = 0 < p.
    """
    d = lq - lp  # (n, V) log r; nan where both are -inf
    big = d > 40.0  # exp would overflow: use q - p - p d directly
    phi = torch.expm1(d.clamp(max=40.0)) - d
    term = torch.where(big, q - p - p * d, p * phi)
    term = torch.where(p > 0, term, torch.where(torch.isnan(p), p, q))  # q mass outside the support of p; NaN stays
    return term.sum(dim=-1)


def _entropy(lp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Row entropies -sum p log p [n] (NaN for a row holding a NaN)."""
    return -torch.where((p > 0) | torch.isnan(p), p * lp, torch.zeros((), dtype=p.dtype)).sum(dim=-1)


def exact_divergences(
    logp_roll: torch.Tensor, logp_train: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> dict[str, torch.Tensor]:
    """Exact kl = KL(p||q), kl_rev = KL(q||p), tv = 1/2 sum|p-q| and both entropies, each [N].

    Paper eq. for D_KL^tok and D_TV^tok (docs/design.md section 2); inputs are normalised
    log-probs [N, V] of the two sides. Works in row chunks so extra memory is bounded.
    """
    if logp_roll.shape != logp_train.shape:
        raise ValueError(f"shape mismatch {tuple(logp_roll.shape)} vs {tuple(logp_train.shape)}")
    n, v = logp_roll.shape
    rows = max(1, chunk_elements // max(v, 1))
    dtype = torch.float64 if logp_roll.dtype == torch.float64 else torch.float32
    out = {k: torch.empty(n, dtype=dtype) for k in EXACT_KEYS}
    for s in range(0, n, rows):
        lp = logp_roll[s : s + rows].to(dtype)  # (n, V)
        lq = logp_train[s : s + rows].to(dtype)  # (n, V)
        p, q = lp.exp(), lq.exp()
        out["kl"][s : s + rows] = _kl_terms(lp, lq, p, q)
        out["kl_rev"][s : s + rows] = _kl_terms(lq, lp, q, p)
        out["tv"][s : s + rows] = 0.5 * (p - q).abs().sum(dim=-1)
        out["ent_roll"][s : s + rows] = _entropy(lp, p)
        out["ent_train"][s : s + rows] = _entropy(lq, q)
    out["tv"].clamp_(0.0, 1.0)
    return out


FUSED_CHUNK_ELEMENTS = 1 << 19
# the C kernel keeps no [rows, V] temporaries (one row buffer per thread): larger chunks split evenly over
# the threads and cost fewer calls (3 rows per call at V = 151,936 left a thread idle half the time)
NATIVE_CHUNK_ELEMENTS = 1 << 23


def _exact_rows(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernels' OUTPUTS [len(OUTPUTS), n] from normalised rows: the support-aware path for rows
    holding -inf (truncated supports), NaN, or an infinite divergence."""
    d = {k: v.double() for k, v in exact_divergences(torch.log_softmax(a, -1), torch.log_softmax(b, -1)).items()}
    d["lp_roll"], d["lp_train"] = (sampled_logprob(x, y) for x in (a, b))
    return torch.stack([d[k] for k in OUTPUTS])


def sampled_logprob(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(scores)[y] in float64 [n], from scores [n, V] known up to a constant per row."""
    return gather_logprobs(scores, y).double() - torch.logsumexp(scores.double(), -1)


def logit_divergences(
    logits_roll: torch.Tensor,
    logits_train: torch.Tensor,
    token_ids: torch.Tensor | None = None,
    rows_per_chunk: int | None = None,
    kernel: str | None = None,
    used: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact kl, kl_rev, tv and both entropies, each [N] (float64), from two logit tensors [N, V].

    Paper eq. for D_KL^tok / D_TV^tok (docs/design.md section 2), computed a few rows at a time by the
    kernel kernel_for picks (see kernels/eager.py), so memory is bounded whatever N; its name is added to
    ``used`` (summary.json records the kernels of a run). Logits need not be
    normalised (log-probs work too). With token_ids [N] it also returns lp_roll and lp_train,
    the two sides' normalised log-probs of those tokens. Rows whose fused result is not finite
    (-inf from truncated supports, NaN, infinite KL) are recomputed by the support-aware path.
    Results are on the CPU.
    """
    n, v = logits_roll.shape
    out = torch.empty((len(OUTPUTS), n), dtype=torch.float64)
    name, fn = choice.kernel_for(v, logits_roll.device, kernel)
    if rows_per_chunk is None:  # ~2 MB per temporary: cache-sized at V = 151,936, few Python steps at small V
        per = NATIVE_CHUNK_ELEMENTS if name == "native" else FUSED_CHUNK_ELEMENTS
        rows_per_chunk = max(1, per // max(v, 1))
    if used is not None:
        used.add(name)
    if name == "eager":
        choice.EAGER_ENTRIES[0] += n * v
    ids = torch.zeros(n, dtype=torch.long) if token_ids is None else token_ids.long()
    for s in range(0, n, rows_per_chunk):
        a = logits_roll[s : s + rows_per_chunk].float()
        b = logits_train[s : s + rows_per_chunk].to(a.device).float()
        y = ids[s : s + rows_per_chunk].to(a.device)
        vals = fn(a, b, y)  # (len(OUTPUTS), n) float64
        bad = ~torch.isfinite(vals).all(0)  # (n,)
        if bool(bad.any()):
            vals[:, bad] = _exact_rows(a[bad], b[bad], y[bad]).to(vals.device)
        out[:, s : s + rows_per_chunk] = vals.cpu()
    res = dict(zip(OUTPUTS, out))
    res["kl"].clamp_(min=0.0)
    res["kl_rev"].clamp_(min=0.0)
    res["tv"].clamp_(0.0, 1.0)
    if token_ids is None:
        del res["lp_roll"], res["lp_train"]
    return res


def _log1mexp(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(lp)) for lp <= 0, accurate near 0 and near -inf."""
    return torch.where(lp > -math.log(2.0), torch.log(-torch.expm1(lp)), torch.log1p(-torch.exp(lp)))


def sampled_token_metrics(lp_roll: torch.Tensor, lp_train: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantities from the sampled token's two log-probs alone, each [N] (float64).

    log_ratio = l_t, k1 = -l_t, k2 = l_t^2/2, k3 = rho_t - 1 - l_t, abs_rho_m1 = |rho_t - 1|
    (docs/design.md section 2), and the binary (DPPO) divergences on the partition {y_t, rest}:
    tv_bin = |p(y_t) - q(y_t)|, kl_bin = KL(Bern(p(y_t)) || Bern(q(y_t))).
    """
    a = lp_roll.double()
    b = lp_train.double()
    lr = b - a
    rho_m1 = torch.expm1(lr)
    k3 = torch.where(torch.isposinf(lr), math.inf, rho_m1 - lr)  # rho = inf: k3 = inf (not inf - inf)
    pa, pb = a.exp(), b.exp()
    tv_bin = (pa - pb).abs()
    la, lb = _log1mexp(a), _log1mexp(b)
    t1 = torch.where(pa > 0, pa * (a - b), torch.zeros_like(pa))
    t2 = torch.where(pa < 1, (1 - pa) * (la - lb), torch.zeros_like(pa))
    kl_bin = (t1 + t2).clamp_min(0.0)  # rounding only; exact value is >= 0
    return {
        "log_ratio": lr,
        "k1": -lr,
        "k2": 0.5 * lr * lr,
        "k3": k3,
        "abs_rho_m1": rho_m1.abs(),
        "tv_bin": tv_bin,
        "kl_bin": kl_bin,
    }


def topk_intervals(
    lp_top: torch.Tensor, top_ids: torch.Tensor, in_topk: torch.Tensor, logp_train: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Certified [lo, hi] intervals for kl = KL(p||q) and tv when p is known only on a set S.

    lp_top [N, K]: the rollout's log-probs on S (its top-K plus the sampled token; -inf
    pads unused slots), top_ids [N, K] their token ids, in_topk [N, K] marks the top-K
    members (the sampled token may lie outside), logp_train [N, V]: q in full.
    Lower ends coarsen the vocabulary into S + one "rest" bucket (data processing).
    Upper ends: tv <= 1/2 (sum_S |p - q| + p_rest + q_rest); for kl, every token outside
    the top-K has p_v <= m = min over the top-K of p, and sum p_v = p_rest, so the rest
    term is maximised by filling m on the tokens of smallest q (docs/design.md section 2).
    Returns kl_lo, kl_hi, tv_lo, tv_hi, each [N] (float64).
    """
    lp = lp_top.double()
    valid = torch.isfinite(lp)
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))  # (N, K)
    lq_full = logp_train.double()  # (N, V)
    safe_ids = torch.where(valid, top_ids.long(), torch.zeros_like(top_ids.long()))
    lq = lq_full.gather(-1, safe_ids)  # (N, K)
    q = torch.where(valid, lq.exp(), torch.zeros_like(lq))
    outside = torch.ones_like(lq_full, dtype=torch.bool)  # (N, V) tokens outside S
    row = torch.arange(lp.shape[0]).unsqueeze(-1).expand_as(safe_ids)
    outside[row[valid], safe_ids[valid]] = False
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = torch.where(outside, lq_full.exp(), torch.zeros_like(lq_full)).sum(-1)  # exact: q is known in full
    diff = (p - q).abs().sum(-1)
    tv_hi = (0.5 * (diff + p_rest + q_rest)).clamp(max=1.0)
    tv_lo = torch.minimum(0.5 * (diff + (p_rest - q_rest).abs()), tv_hi)  # lo <= TV <= hi; equal up to rounding
    kl_s = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)  # +inf when q = 0 < p
    rest_lo = torch.where(
        p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), torch.zeros_like(p_rest)
    )
    kl_lo = (kl_s + rest_lo).clamp_min(0.0)
    # upper end of the rest term: greedy fill of m = min top-K p on the smallest q outside S
    m = torch.where(in_topk & valid, p, torch.full_like(p, 2.0)).min(-1).values.clamp(max=1.0)  # (N,)
    n_out = outside.sum(-1)  # (N,)
    q_sorted = torch.where(outside, lq_full.exp(), torch.full_like(lq_full, torch.inf)).sort(-1).values  # (N, V)
    cum_log_q = torch.cat([torch.zeros_like(m)[:, None], q_sorted.log().cumsum(-1)], dim=-1)  # (N, V+1)
    j = torch.where(m > 0, torch.floor(p_rest / m), torch.zeros_like(m)).clamp(max=n_out.double()).long()  # full slots
    full = j * m * m.log() - m * cum_log_q.gather(-1, j[:, None]).squeeze(-1)
    full = torch.where(j > 0, full, torch.zeros_like(full))
    r = (p_rest - j * m).clamp_min(0.0)
    has_part = (r > 0) & (j < n_out)
    q_next = q_sorted.gather(-1, j.clamp(max=q_sorted.shape[-1] - 1)[:, None]).squeeze(-1)
    part = torch.where(has_part, r * (r.clamp_min(1e-300).log() - q_next.log()), torch.zeros_like(r))
    hi_rest = torch.where(p_rest > 0, full + part, torch.zeros_like(full))
    kl_hi = torch.maximum(kl_s + hi_rest, kl_lo)
    return {"kl_lo": kl_lo, "kl_hi": kl_hi, "tv_lo": tv_lo, "tv_hi": tv_hi}


def gather_logprobs(logp: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each row's token: logp [N, V], token_ids [N] -> [N]."""
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
