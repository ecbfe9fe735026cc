"""Configuration dataclasses: backend specs, sampling settings and masking thresholds.

Everything here is plain data, validated in ``__post_init__`` with one-line errors,
and serialised into the report metadata with :func:`as_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trm_diag.errors import UsageError

# Keys every backend understands; each backend adds its own (see backends/__init__.py).
COMMON_KEYS = ("model", "dtype", "batch_size", "seed")

MIN_TEMPERATURE = 1e-5  # vLLM samples greedily below this (its _SAMPLING_EPS); logits / T overflow near 1e-38
MAX_HORIZON = 10_000_000  # longest horizon T evaluated: the adaptive bounds sum over t = 1..T (~1 s, ~0.5 GB)


def parse_horizons(
    text: str, what: str = "--horizons", fix: str = "write e.g. --horizons 256,1024,4096"
) -> tuple[int, ...]:
    """Comma-separated horizons T ('1024', '1e4', '256,4096'): positive integers up to MAX_HORIZON."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        floats = [float(x) for x in items]  # 1e4 is a fine way to write 10000
    except ValueError:
        raise UsageError(f"{what} '{text}' is not a list of integers", fix) from None
    if not floats or not all(math.isfinite(v) and v.is_integer() and v >= 1 for v in floats):
        raise UsageError(f"{what} '{text}' must hold positive integers", fix)
    if max(floats) > MAX_HORIZON:
        big = items[floats.index(max(floats))]
        raise UsageError(f"{what}: {big} is beyond {MAX_HORIZON:,} tokens", f"use horizons up to {MAX_HORIZON}")
    return tuple(dict.fromkeys(int(v) for v in floats))  # one T once: '8,8' is T = 8


DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")  # float64: transformers only (a sweep's reference)
DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}


@dataclass(frozen=True)
class BackendSpec:
    """One side of a comparison: ``name:key=value,key=value`` (e.g. ``hf:dtype=bfloat16``)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def model(self) -> str | None:
        return self.options.get("model")

    @property
    def dtype(self) -> str:
        return self.options.get("dtype", "float32")

    def get_int(self, key: str, default: int, minimum: int | None = None) -> int:
        raw = self.options.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise UsageError(
                f"backend spec '{self.text}': {key}={raw} is not an integer",
                f"write {key}=<integer>",
            ) from None
        if minimum is not None and value < minimum:
            raise UsageError(
                f"backend spec '{self.text}': {key}={raw} is below {minimum}", f"write {key}={minimum} or more"
            )
        return value

    def with_model(self, model: str) -> BackendSpec:
        """This spec with ``model`` filled in, unless the spec already names one."""
        if self.model:
            return self
        opts = {"model": model, **self.options}
        return BackendSpec(self.name, opts, self.text)

    def describe(self) -> str:
        """Canonical text form, as recorded in reports."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


def parse_backend_spec(text: str, known: dict[str, tuple[str, ...]]) -> BackendSpec:
    """Parse ``name[:k=v,...]``; ``known`` maps backend name -> accepted keys."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in known:
        raise UsageError(f"unknown backend '{name}' in spec '{text}'", f"use one of: {', '.join(sorted(known))}")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise UsageError(
                f"backend spec '{text}': '{part}' is not key=value", "write e.g. hf:dtype=bfloat16,attn=sdpa"
            )
        accepted = known[name]
        if key not in accepted and not any(a.endswith(".*") and key.startswith(a[:-1]) for a in accepted):
            raise UsageError(
                f"backend spec '{text}': unknown key '{key}' for backend '{name}'",
                f"valid keys: {', '.join(accepted)}",
            )
        if key in options:  # the last one would win silently: hf:dtype=bfloat16,dtype=float32 is float32
            raise UsageError(
                f"backend spec '{text}': key '{key}' is given twice", f"keep one {key}= (each key once per spec)"
            )
        if key in ("dtype", "lm_head_dtype"):
            value = DTYPE_ALIASES.get(value.lower(), value.lower())
            if value not in DTYPES:
                raise UsageError(
                    f"backend spec '{text}': {key}={value} is not supported", f"use one of: {', '.join(DTYPES)}"
                )
        options[key] = value
    return BackendSpec(name, options, text)


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled; the same processing defines both sides' distributions.

    Order of processing (vLLM's): temperature -> min_p -> top_k -> top_p, then
    renormalisation. temperature=0 means greedy decoding; the compared distributions
    are then the untempered (temperature 1) ones, and the report says so. ``logprobs`` says what
    the rollout engine reports as the sampled token's log-prob (LOGPROBS): the distribution it
    sampled from (``processed``) or the untempered, untruncated softmax (``raw``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_new_tokens: int = 64
    samples_per_prompt: int = 1
    seed: int = 0
    topk: int = 20  # top-K log-probs recorded per sampled position (the top-K tier); 0 = none
    logprobs: str = "processed"  # what the rollout engine reports (LOGPROBS)

    def __post_init__(self) -> None:
        if self.logprobs not in LOGPROBS:
            raise UsageError(f"logprobs '{self.logprobs}' is unknown", f"use one of: {', '.join(LOGPROBS)}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature {self.temperature} is invalid", "use a value >= 0 (0 = greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UsageError(
                f"--temperature {self.temperature:g} is below {MIN_TEMPERATURE:g}: logits divided by it overflow",
                f"use 0 for greedy decoding, or a temperature >= {MIN_TEMPERATURE:g}",
            )
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} is out of range", "use 0 < top-p <= 1")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} is negative", "use 0 (off) or a positive integer")
        if not 0 <= self.min_p < 1:
            raise UsageError(f"--min-p {self.min_p} is out of range", "use 0 <= min-p < 1")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens} must be >= 1", "use a positive integer")
        if self.topk < 0:
            raise UsageError(f"--topk {self.topk} is negative", "use 0 (record none) or a positive integer")
        if self.samples_per_prompt < 1:
            raise UsageError(f"--samples {self.samples_per_prompt} must be >= 1", "use a positive integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncated(self) -> bool:
        """True when top-k / top-p / min-p change the support of the distribution."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def has_views(self) -> bool:
        """True when the pipeline, replay and full views differ (views.py): the sampler truncates, or the
        engine reports raw log-probs of a tempered sampler."""
        return not self.greedy and (self.truncated or (self.logprobs == "raw" and self.temperature != 1.0))

    def compared_distribution(self) -> str:
        """Which distribution the report compares, in words (recorded in summary.json)."""
        if self.greedy:
            return "untempered full softmax (greedy decoding: temperature 1 distributions compared)"
        text = f"softmax(logits / {self.temperature:g})"
        if self.truncated:
            text += f" truncated by min_p={self.min_p:g}, top_k={self.top_k}, top_p={self.top_p:g} and renormalised"
        if self.logprobs == "raw":
            text += "; the rollout engine reports raw log-probs (untempered, untruncated softmax)"
        return text


@dataclass(frozen=True)
class ThresholdSpec:
    """A masking threshold's default and its one line of help (docs/design.md section 4)."""

    default: float
    help: str
    upper: float = math.inf  # largest meaningful value


THRESHOLDS: dict[str, ThresholdSpec] = {
    "trm_max": ThresholdSpec(0.05, "TRM-Max threshold on max_t KL (paper: 0.05)."),
    "trm_avg": ThresholdSpec(0.001, "TRM-Avg threshold on mean_t KL (paper: 0.001)."),
    "ln_trm": ThresholdSpec(0.05, "LN-TRM threshold on the weighted mean of |rho-1|."),
    "ser": ThresholdSpec(0.05, "SER threshold on mean_t |rho-1| (suggested 0.03-0.10)."),
    "dppo_tv": ThresholdSpec(0.2, "DPPO binary-TV token threshold (paper: 0.2).", upper=1.0),
    "dppo_kl": ThresholdSpec(0.05, "DPPO binary-KL token threshold (paper: 0.05)."),
}
DEFAULT_HORIZONS = (1024, 4096, 16384)  # horizons T of bounds.parquet (the observed max length is added)


@dataclass(frozen=True)
class Thresholds:
    """Masking thresholds (docs/design.md section 4); defaults are the paper's values (THRESHOLDS).

    ln_delta, the delta inside the LN-TRM weights w_t, is the TRM-Max threshold unless given.
    """

    trm_max: float = THRESHOLDS["trm_max"].default
    trm_avg: float = THRESHOLDS["trm_avg"].default
    ln_trm: float = THRESHOLDS["ln_trm"].default
    ln_delta: float | None = None
    ser: float = THRESHOLDS["ser"].default
    dppo_tv: float = THRESHOLDS["dppo_tv"].default
    dppo_kl: float = THRESHOLDS["dppo_kl"].default

    def __post_init__(self) -> None:
        if self.ln_delta is None:
            object.__setattr__(self, "ln_delta", self.trm_max)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (v > 0 and math.isfinite(v)):
                raise UsageError(
                    f"threshold {f.name}={v} is out of range", "thresholds must be positive finite numbers"
                )
            upper = THRESHOLDS[f.name].upper if f.name in THRESHOLDS else math.inf
            if v > upper:
                raise UsageError(f"threshold {f.name}={v} exceeds {upper:g}", "binary TV lies in [0, 1]")


def as_dict(obj: Any) -> Any:
    """JSON-ready form of a config dataclass (recursively)."""
    if dataclasses.is_dataclass(obj):
        return {k: as_dict(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------ views of truncated sampling (views.py)
# what the rollout engine reports as a sampled token's log-prob (vLLM's logprobs_mode; rollout files' `logprobs`)
LOGPROBS = {
    "processed": "the distribution it sampled from: tempered, truncated, renormalised (vLLM processed_logprobs)",
    "raw": "the untempered, untruncated softmax of its logits (vLLM's default raw_logprobs)",
}
VIEWS = ("pipeline", "replay", "full")
DEFAULT_VIEW = "pipeline"
VIEW_HELP = {
    "pipeline": "the engine's truncated distribution vs the trainer's full softmax (verl/TRL/OpenRLHF defaults)",
    "replay": "both restricted to the rollout's kept set (the trainer replays the sampler's mask)",
    "full": "both untruncated: the pure numerical mismatch",
}


def view_help(view: str, sampling: SamplingConfig) -> str:
    """What the view compares, in words; with raw log-probs the pipeline's rollout side is the raw softmax."""
    if view == "pipeline" and sampling.logprobs == "raw":
        return "the engine's raw log-probs (untempered, untruncated) vs the trainer's tempered full softmax"
    return VIEW_HELP[view]


def sampler_differs(view: str, sampling: SamplingConfig) -> str | None:
    """Why the view's pi_roll is not the distribution the rollouts were drawn from (p~), or None when it is.

    Monte-Carlo averages over rollouts (D_KL^seq, D_TV^seq, Dbar_t, the sampled-token estimators) are unbiased
    only under the sampler; under `full` (p, untruncated), raw log-probs (the untempered softmax) or greedy
    decoding (the argmax path) they are estimates under another sampler (docs/design.md section 9)."""
    if sampling.greedy:
        return "greedy decoding: the rollouts are the argmax path, not draws from pi_roll (no Monte-Carlo average)"
    if view == "pipeline" and sampling.logprobs == "raw" and (sampling.truncated or sampling.temperature != 1.0):
        return (
            "the rollouts were drawn from the engine's processed distribution p~, while this view's pi_roll is its "
            "raw softmax (untempered, untruncated)"
        )
    if view == "full" and sampling.truncated:
        return "the rollouts were drawn from the truncated p~, while the full view's pi_roll is the untruncated p"
    return None


def check_view(view: str, fidelity: str, sampling: SamplingConfig) -> None:
    """--view must name a view the tier's data can give: replay and full need the rollout's kept set,
    which only the exact tier's full rows carry (without truncation every view is the same)."""
    if view not in VIEWS:
        raise UsageError(f"--view {view} is unknown", f"use one of: {', '.join(VIEWS)}")
    if view != DEFAULT_VIEW and fidelity != "exact" and sampling.has_views:
        raise UsageError(
            f"--view {view} needs the rollout's kept set (its full rows), which the {fidelity} tier does not have",
            f"use --view {DEFAULT_VIEW} (the {fidelity} tier gives that view exactly), or compare with --fidelity exact",
        )


# ratio bands of clipped policy-gradient objectives: a token whose rho leaves one through the mismatch alone
# has its gradient clipped before the policy has moved (PPO: eps = 0.2; DAPO: 0.28 on the high side)
CLIP_BANDS = {"ppo": (0.2, 0.2), "dapo": (0.2, 0.28)}
