"""The three fidelity tiers, one record each: what a tier measures, which columns it fills, which
of them bound the divergences from above (and so may feed the paper's bounds), and what the
masking criteria test in it. Every module reads the tier's facts here (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    help: str  # one line for --fidelity
    columns: tuple[str, ...]  # divergence columns of tokens.parquet this tier fills
    also: tuple[str, ...]  # other columns only this tier has (tokens.parquet holds no column that is NaN throughout)
    kl: str | None  # column that bounds KL(p||q) per token from above (feeds delta, D_KL^seq); None: no bound input
    tv: str | None  # column that bounds TV per token from above (feeds eps, Dbar_t)
    trm_max: str  # sequences column TRM-Max tests (its max over t)
    trm_avg: str  # sequences column TRM-Avg tests (its mean over t)
    locate: str  # token column whose maximum locates a sequence's worst token
    importable: bool  # `score` can give it from a rollout file
    rollout_distributions: str  # summary.json: what the rollout side's numbers come from
    criteria_basis: str  # summary.json: what the masks test, in words
    bound_how: str  # summary.json: how the bound inputs were measured ("" = exact values)


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier(
            name="exact",
            help="full next-token distributions of both sides (exact kl, tv)",
            columns=("kl", "kl_rev", "tv"),
            also=("ent_roll", "lp_roll_prefill", "prefill_gap"),
            kl="kl",
            tv="tv",
            trm_max="kl_max",
            trm_avg="kl_mean",
            locate="kl",
            importable=False,
            rollout_distributions=(
                "exact kl/tv use a teacher-forced (prefill) re-pass of the rollout backend; lp_roll is the "
                "decode-step log-prob recorded while sampling; prefill_gap = lp_roll_prefill - lp_roll"
            ),
            criteria_basis="exact kl (TRM-Max: max_t kl, TRM-Avg: mean_t kl)",
            bound_how="",
        ),
        Tier(
            name="topk",
            help="certified [lo, hi] intervals from the rollout's top-K log-probs",
            columns=("kl_lo", "kl_hi", "tv_lo", "tv_hi"),
            also=(),
            kl="kl_hi",
            tv="tv_hi",
            trm_max="kl_hi_max",  # certified upper ends: conservative masks
            trm_avg="kl_hi_mean",
            locate="kl_hi",
            importable=True,
            rollout_distributions=(
                "kl/tv intervals from the rollout's decode-step top-K log-probs and the training side's full rows"
            ),
            criteria_basis="certified upper ends kl_hi (TRM-Max: max_t kl_hi, TRM-Avg: mean_t kl_hi)",
            bound_how=", certified top-K upper ends",
        ),
        Tier(
            name="sampled",
            help="only the sampled token's log-probs",
            columns=(),
            also=(),
            kl=None,
            tv=None,
            trm_max="k2_max",  # heuristic stand-ins
            trm_avg="k3_mean",
            locate="k2",
            importable=True,
            rollout_distributions="only the decode-step log-prob of each sampled token (lp_roll) and its training log-prob",
            criteria_basis="heuristic k2 max / k3 mean (the guarantee needs exact KL from full logits)",
            bound_how="",  # no upper-valid column: metrics.bound_inputs uses the k2 / k3 heuristics
        ),
    )
}
FIDELITIES = tuple(TIERS)
IMPORTABLE = tuple(name for name, t in TIERS.items() if t.importable)


def tier(name: str) -> Tier:
    """The tier called ``name`` (KeyError for unknown names: callers validate user input first)."""
    return TIERS[name]
