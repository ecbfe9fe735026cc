"""The layout of a report folder, as data: fidelity tiers, token columns, required fields.

No heavy imports, so the gate and other readers can validate a report without torch.
"""

from __future__ import annotations

from trm_diag.tiers import TIERS

TOKEN_COLUMNS = (
    "seq_id", "pos", "token_id", "lp_roll", "lp_train", "log_ratio", "k1", "k2", "k3", "abs_rho_m1",
    "kl", "kl_rev", "tv", "tv_bin", "kl_bin", "kl_lo", "kl_hi", "tv_lo", "tv_hi", "ent_roll", "ent_train",
    "lp_roll_prefill", "prefill_gap", "nonfinite", "zero_prob",
)  # fmt: skip
# columns that only some tiers fill; a report holds those of its own tier (Tier.columns, Tier.also)
TIER_ONLY = frozenset(c for t in TIERS.values() for c in (*t.columns, *t.also))
# identifiers, not measurements: no statistic of them is a metric (`gate --list-metrics` leaves them out)
ID_COLUMNS = frozenset(("seq_id", "pos", "token_id", "prompt_idx", "sample_idx", "kl_argmax", "worst_pos"))
TEXT_COLUMNS = {"tokens": ("token_text",), "sequences": ("prompt_text", "response_text")}  # decoded for reading


# exact tier with truncated sampling (views.py): the rollout's kept set, and every view side by side
VIEW_COLUMNS = (
    "kept_mass", "kept_count", "train_kept_mass", "support_differs", "lr_pipeline", "lr_replay", "lr_full",
    "kl_pipeline", "kl_replay", "kl_full",
)  # fmt: skip


def tier_columns(fidelity: str, views: bool = False) -> tuple[str, ...]:
    """tokens.parquet's measured columns in a tier: the common ones and the tier's own, in TOKEN_COLUMNS order,
    then VIEW_COLUMNS when ``views`` (exact tier, truncated sampling)."""
    t = TIERS[fidelity]
    own = tuple(c for c in TOKEN_COLUMNS if c not in TIER_ONLY or c in t.columns or c in t.also)
    return own + (VIEW_COLUMNS if views else ())


# sequences.parquet columns every reader relies on (statistics columns beyond these are optional)
SEQUENCE_COLUMNS = (
    "seq_id", "prompt_idx", "sample_idx", "prompt_token_ids", "response_token_ids", "finish_reason", "length",
    "log_seq_ratio", "lp_roll_mean", "lp_train_mean",
)  # fmt: skip
# the statistics of one breakdown row (breakdowns.py; the gate's breakdown.<bucket>.<stat>)
BREAKDOWN_STATS = ("n", "token_share", "kl_mean", "kl_p99", "kl_share", "abs_log_ratio_mean", "outside_band")
WORST_K = 5  # worst sequences summary.json keeps (with the text around their worst token)
# summary.json: key -> the JSON type it must have
SUMMARY_FIELDS: dict[str, type] = {
    "command": str, "fidelity": str, "metrics": dict, "sampling": dict, "thresholds": dict, "bound_inputs": dict,
}  # fmt: skip
