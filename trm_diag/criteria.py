"""The masking criteria (docs/design.md section 4), one record each: the per-sequence score a criterion
tests in a tier, and the threshold it compares with. Sequence statistics, masking tables, the gate's
`accept.<name>` metrics and the summary all read them here (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trm_diag.tiers import Tier


@dataclass(frozen=True)
class Criterion:
    name: str
    label: str
    threshold: str | None  # the Thresholds field it compares with (None: combines other criteria)
    score: Callable[[Tier], str] | None  # the sequences column it tests, in a tier (None: combined)
    requires: tuple[str, ...] = ()  # criteria that must all accept (a combined criterion)


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("trm_max", "TRM-Max", "trm_max", lambda t: t.trm_max),
        Criterion("trm_avg", "TRM-Avg", "trm_avg", lambda t: t.trm_avg),
        Criterion("combined", "TRM Max+Avg", None, None, requires=("trm_max", "trm_avg")),
        Criterion("ln_trm", "LN-TRM", "ln_trm", lambda t: "ln_trm"),
        Criterion("ser", "SER", "ser", lambda t: "ser"),
    )
}
SCORED = tuple(name for name, c in CRITERIA.items() if c.score is not None)  # criteria with a score of their own
