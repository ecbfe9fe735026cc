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
    tv_token: str  # token column whose 2x stands in for |rho_t - 1| in SER and LN-TRM (E|rho - 1| = 2 TV untruncated)
    locate: str  # token column whose maximum locates a sequence's worst token
    importable: bool  # `score` can give it from a rollout file
    rollout_distributions: str  # summary.json: what the rollout side's numbers come from
    criteria_basis: str  # summary.json: what the masks test, in words
    bound_how: str  # summary.json: how the bound inputs were measured ("" = exact values)
    estimators: dict[str, str]  # summary.json `estimators`: what each criterion and bound input uses here, and why


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
            tv_token="tv",
            locate="kl",
            importable=False,
            rollout_distributions=(
                "exact kl/tv use a teacher-forced (prefill) re-pass of the rollout backend; lp_roll is the "
                "decode-step log-prob recorded while sampling; prefill_gap = lp_roll_prefill - lp_roll"
            ),
            criteria_basis="exact kl (TRM-Max: max_t kl, TRM-Avg: mean_t kl; SER, LN-TRM: 2 tv)",
            bound_how="",
            estimators={
                "trm_max": "exact: max_t kl from both sides' full rows",
                "trm_avg": "exact: mean_t kl",
                "ser": "exact: mean_t 2 tv, the value mean_t |rho_t - 1| estimates without truncation (with "
                "top-p / top-k / min-p, E|rho - 1| = 2 TV - (1 - Q_t) misses the trainer's mass outside the kept set)",
                "ln_trm": "exact: the weighted mean of 2 tv (the same reason as SER)",
                "delta": "exact kl, empirical max over the sampled positions",
                "eps": "exact tv, empirical max over the sampled positions",
                "kl_seq": "exact kl summed over each rollout, Monte-Carlo mean over rollouts",
            },
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
            tv_token="tv_hi",
            locate="kl_hi",
            importable=True,
            rollout_distributions=(
                "kl/tv intervals from the rollout's decode-step top-K log-probs and the training side's full rows"
            ),
            criteria_basis="certified upper ends kl_hi (TRM-Max: max_t kl_hi, TRM-Avg: mean_t kl_hi; SER, LN-TRM: "
            "2 tv_hi)",
            bound_how=", certified top-K upper ends",
            estimators={
                "trm_max": "upper: max_t kl_hi, the certified upper end (a conservative mask)",
                "trm_avg": "upper: mean_t kl_hi",
                "ser": "upper: mean_t 2 tv_hi (certified; |rho_t - 1| would miss the trainer's mass outside the "
                "sampler's kept set under truncation)",
                "ln_trm": "upper: the weighted mean of 2 tv_hi",
                "delta": "upper: kl_hi, empirical max over the sampled positions",
                "eps": "upper: tv_hi, empirical max over the sampled positions",
                "kl_seq": "upper: kl_hi summed over each rollout, Monte-Carlo mean over rollouts",
            },
        ),
        Tier(
            name="sampled",
            help="only the sampled token's log-probs",
            columns=(),
            also=(),
            kl=None,
            tv=None,
            trm_max="k2_max",  # heuristic: a second-order proxy, no estimate of KL
            trm_avg="k1_mean",  # unbiased under any truncation (k3 is not: E[k3] = KL - (1 - Q_t))
            tv_token="tv_mc",
            locate="k2",
            importable=True,
            rollout_distributions="only the decode-step log-prob of each sampled token (lp_roll) and its training log-prob",
            criteria_basis="estimates: k2 max (heuristic), k1 mean (unbiased), SER and LN-TRM on 2 (1 - rho)^+ "
            "(unbiased); the guarantee needs exact KL from full logits",
            bound_how="",  # no upper-valid column: metrics.bound_inputs uses the k2 / k1 estimates
            estimators={
                "trm_max": "heuristic: max_t k2 = (log rho)^2 / 2, a second-order proxy that neither bounds nor "
                "estimates KL",
                "trm_avg": "unbiased estimate: mean_t k1 = -log rho; E[k1] = KL(pi_roll || pi_theta) under any "
                "truncation, while E[k3] = KL - (1 - Q_t) is low by the trainer's mass outside the kept set",
                "ser": "unbiased estimate: mean_t 2 (1 - rho_t)^+; E[(1 - rho)^+] = TV(pi_roll, pi_theta) exactly "
                "under any truncation, while E|rho - 1| = 2 TV - (1 - Q_t)",
                "ln_trm": "unbiased estimate: the weighted mean of 2 (1 - rho_t)^+ (the same reason as SER)",
                "delta": "heuristic: max_t k2 (exact KL needs full logits)",
                "kl_seq": "estimate: k1 summed over each rollout (unbiased), the bounds take the mean's upper "
                "one-sided 95% Student-t value over the rollouts (bound_inputs.kl_seq_mean: the mean)",
            },
        ),
    )
}
FIDELITIES = tuple(TIERS)
IMPORTABLE = tuple(name for name, t in TIERS.items() if t.importable)


def tier(name: str) -> Tier:
    """The tier called ``name`` (KeyError for unknown names: callers validate user input first)."""
    return TIERS[name]
