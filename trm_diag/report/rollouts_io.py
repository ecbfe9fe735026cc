"""Rollout files: the schema `trm-diag score` reads and `compare --save-rollouts` writes.

One row per rollout, JSONL or Parquet (docs/rollout-schema.md):

| field | type | required |
| --- | --- | --- |
| prompt_ids | list[int] | yes, unless `prompt` text is given |
| response_ids | list[int] | yes, unless `response` text is given |
| rollout_logprobs | list[float], log pi_roll(y_t) per response token | yes |
| topk_logprobs | per position: {token_id: logprob} or [[token_id, logprob], ...] | no (enables the top-K tier) |
| topk_k | int, K of the top-K (the sampled token may come on top); at most the entries of every position | no (default: smallest entry count) |
| prompt_idx, sample_idx | int | no |
| finish_reason | "stop" / "length" | no |
| reward, advantage | float | no (carried into sequences.parquet) |
| prompt, response | str | no (tokenised only when ids are missing) |
| temperature, top_p, top_k, min_p | sampling settings of the rollout | no |
| logprobs | "processed" (the distribution sampled from) or "raw" (untempered, untruncated softmax) | no (default processed) |

``mapping`` renames columns of the file to these names (``--map response_ids=output_ids``).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trm_diag.config import LOGPROBS, SamplingConfig
from trm_diag.errors import InputError, UsageError
from trm_diag.report.comparable import check_prompt_ids
from trm_diag.report.dumps import TEXT_ONLY
from trm_diag.report.rollout_source import (  # noqa: F401 (score and tests read them here too)
    INPUT_FORMATS,
    RolloutSource,
    as_source,
    first_row,
    forget_globs,
    input_format,
    matches,
    rename,
    source_rows,
)
from trm_diag.report.token_extras import TOKEN_EXTRAS, cut_extras, token_extras
from trm_diag.types import Rollout

FIELDS = (
    "prompt_ids", "response_ids", "rollout_logprobs", "topk_logprobs", "topk_k", "prompt_idx", "sample_idx",
    "finish_reason", "reward", "advantage", "prompt", "response", "temperature", "top_p", "top_k", "min_p",
    "logprobs", "weights_fingerprint", *TOKEN_EXTRAS,
)  # fmt: skip
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "logprobs")
GENERATION_ONLY = ("max_new_tokens", "samples_per_prompt", "seed")  # SamplingConfig fields imported rollouts lack
LOGPROB_SLACK = 1e-4  # engines report log-probs a hair above 0 for near-certain tokens
MASS_SLACK = 1e-3  # a position's top-K probabilities sum to at most 1, up to float32 rounding of K values


@dataclass
class RolloutFile:
    """Rollouts read from a file, and what the report should say about how they were read."""

    rollouts: list[Rollout]  # empty unless read with keep=True
    count: int = 0
    sampling_hints: dict[str, float] = field(default_factory=dict)
    retokenized: int = 0
    empty: int = 0
    has_topk: bool = False  # some row has topk_logprobs
    topk_rows: int = 0  # rows with topk_logprobs
    without_topk: str = ""  # where the first row without them is (when some row has them)
    topk_ks: set[int] = field(default_factory=set)  # the rows' K values
    duplicate_keys: int = 0  # rows whose (prompt_idx, sample_idx) an earlier row has
    duplicate_rows: int = 0  # of those, rows that repeat an earlier row's response too
    duplicate_where: str = ""  # where the first of them is
    after_eos_rollouts: int = 0  # rollouts with tokens after their first end-of-sequence token (padding)
    after_eos_tokens: int = 0
    left_pad_rollouts: int = 0  # rollouts whose prompt_ids start with the pad token (left padding of a batch)
    left_pad_tokens: int = 0
    train_logprob_rows: int = 0  # rows that carry the trainer's own recorded log-probs (a dump's)
    kept_rows: int = 0  # rows that carry the engine's kept set per token
    kept_ids: int = 0  # ids in all those kept sets (what a chunk holds of them)
    routed_rows: int = 0  # rows that carry the engine's routed experts
    without_train: str = ""  # where the first row without train_logprobs is
    temperatures: list[float] = field(default_factory=list)  # the rollouts' temperatures, when they differ
    temperature_rows: int = 0  # rows that carry a temperature
    appended_eos: int = 0  # rows whose last token's log-prob is a dump's placeholder (SkyRL's appended EOS)
    masked_rollouts: int = 0  # rows whose loss_mask leaves tokens unscored (tool output inside a response)
    masked_tokens: int = 0
    unscored_rollouts: int = 0  # rows whose loss_mask leaves no token of the policy to score
    longest: int = 0  # most tokens of prompt + response in one rollout
    weights: set[str] = field(default_factory=set)  # weights fingerprints the rows record (compare --save-rollouts)
    mapped_columns: set[str] = field(default_factory=set)  # the --map source columns some row has
    longest_where: str = ""


def parse_mapping(items: list[str]) -> dict[str, str]:
    """``canonical=source`` pairs -> {source: canonical}."""
    out: dict[str, str] = {}
    for item in items:
        canon, eq, src = item.partition("=")
        canon, src = canon.strip(), src.strip()
        if not eq or not canon or not src:
            raise UsageError(f"--map '{item}' is not canonical=source", "write e.g. --map response_ids=output_ids")
        if canon not in FIELDS:
            raise UsageError(f"--map: unknown field '{canon}'", f"fields: {', '.join(FIELDS)}")
        if src in out or canon in out.values():  # one column per field, one field per column
            clash = f"column '{src}' is mapped twice" if src in out else f"field '{canon}' is mapped twice"
            raise UsageError(f"--map {item}: {clash}", "give each field one column, and each column one field")
        out[src] = canon
    return out


def _is_int(x: Any) -> bool:
    """An integer, or a float holding one (Parquet stores some id columns as doubles); never a bool."""
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _int_list(v: Any, where: str, name: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or not all(_is_int(x) for x in v):
        raise InputError(f"{where}: '{name}' must be a list of integer token ids", "check the column mapping (--map)")
    return [int(x) for x in v]


def _span(vocab_width: int | None) -> str:
    return "" if vocab_width is None else f" (0..{vocab_width - 1})"


def _topk(v: Any, where: str, vocab_width: int | None) -> list[dict[int, float]]:
    """Per-position {token id: log-prob}; ids inside the vocabulary, log-probs <= 0 (-inf allowed), never NaN."""
    fix = "one entry per response token: {token_id: logprob} or [[token_id, logprob], ...] (docs/rollout-schema.md)"
    if not isinstance(v, (list, tuple)):
        raise InputError(f"{where}: 'topk_logprobs' must be a list", fix)
    out = []
    try:
        for pos in v:
            pairs = pos.items() if isinstance(pos, dict) else pos
            if not isinstance(pairs, (list, tuple)) and not isinstance(pos, dict):
                raise TypeError
            entry = {}
            for tid, lp in pairs:
                if isinstance(lp, bool) or not isinstance(lp, (int, float)) or isinstance(tid, bool):
                    raise TypeError
                if isinstance(tid, float) and not tid.is_integer():
                    raise ValueError
                entry[int(tid)] = float(lp)  # ids may be JSON object keys (str) or Parquet doubles
            out.append(entry)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: malformed 'topk_logprobs' entry", fix) from None
    for t, entry in enumerate(out):
        mass = math.fsum(math.exp(lp) for lp in entry.values() if lp <= LOGPROB_SLACK)
        if mass > 1 + MASS_SLACK:
            raise InputError(
                f"{where}: the top-K probabilities of response token {t} sum to {mass:.4g} > 1",
                "export log-probs of one normalised distribution per position (not logits, not several samples)",
            )
        for tid, lp in entry.items():
            if tid < 0 or (vocab_width is not None and tid >= vocab_width):
                raise InputError(
                    f"{where}: top-K token id {tid} is outside the model's vocabulary{_span(vocab_width)}",
                    "score with the model the rollouts came from",
                )
            if math.isnan(lp) or lp > LOGPROB_SLACK:
                raise InputError(
                    f"{where}: invalid top-K log-prob {lp} (log-probs are <= 0 and not NaN)",
                    "check the column holds log-probs, not probs or logits",
                )
    return out


def _number(v: Any, where: str, name: str) -> float:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float (JSON ints have no size limit)
        ok, v = False, f"an integer of {len(str(abs(v)))} digits"
    if not ok:
        shown = v if isinstance(v, str) else repr(v)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(
            f"{where}: '{name}' must be a finite number, not {shown}", f"write {name} as a number or drop it"
        )
    return float(v)


def _setting(v: Any, where: str, name: str) -> float:
    """A row's sampling setting. A float32 column's value reads as the decimal it was written as (0.7, not
    0.699999988), so it matches the option and the other files of a glob; top_k -1 is vLLM's "off" (0 here)."""
    x = _number(v, where, name)
    if name == "top_k":
        if not x.is_integer() or x < -1:
            raise InputError(
                f"{where}: 'top_k' must be an integer >= -1 (-1 or 0: off), not {v!r}", "write top_k as the engine's"
            )
        return max(x, 0.0)
    try:
        if _f32(x) != x:
            return x
    except OverflowError:  # beyond float32: not a float32 column's value
        return x
    return next(y for d in range(1, 10) if _f32(y := float(f"{x:.{d}g}")) == x)  # 9 digits always round-trip


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _index(v: Any, where: str, name: str, default: int) -> int:
    """A non-negative integer field (prompt_idx, sample_idx, topk_k); None means `default`."""
    if v is None:
        return default
    x = _number(v, where, name)
    if not x.is_integer() or not 0 <= x < 2**63:
        raise InputError(
            f"{where}: '{name}' must be a non-negative integer, not {v!r}", f"write {name} as 0, 1, 2, ... or drop it"
        )
    return int(x)


def scan_rollouts(
    path: str | Path,
    mapping: dict[str, str],
    tokenizer: Any,
    vocab_width: int | None,
    keep: bool = False,
    eos_ids: frozenset[int] = frozenset(),
    strip_after_eos: bool = True,
    allow_duplicates: bool = False,
) -> RolloutFile:
    """Validate every row of a rollout file and gather what the report says about it (counts,
    sampling settings, top-K, repeated rows), keeping the rollouts only when asked: `score` scans a file
    once, then reads it again chunk by chunk (iter_rollout_chunks), so memory does not grow with it.
    A row that repeats an earlier one (same prompt_idx, sample_idx and response) is refused unless
    ``allow_duplicates``: it would be counted twice."""
    result = RolloutFile([])
    hints: dict[str, set] = {k: set() for k in SAMPLING_FIELDS}
    keys = array("q"), array("q"), array("q")  # prompt_idx, sample_idx, a digest of the response: 24 bytes a row
    steps = array("q")  # a dump's training step (0 for a rollout file): indices restart every step
    src = as_source(path)
    for _, rollout in _parse(src, mapping, tokenizer, vocab_width, result, hints, eos_ids, strip_after_eos):
        result.count += 1
        digest = hashlib.blake2b(array("q", rollout.response_ids).tobytes(), digest_size=8).digest()
        for column, value in zip(
            keys, (rollout.prompt_idx, rollout.sample_idx, int.from_bytes(digest, "little", signed=True))
        ):
            column.append(value)
        steps.append(int(rollout.extra.get("step", 0)))
        if keep:
            result.rollouts.append(rollout)
    unmatched = [f"{canon}={src}" for src, canon in mapping.items() if src not in result.mapped_columns]
    if unmatched and result.count:
        raise UsageError(
            f"--map {', '.join(unmatched)}: no row of '{path}' has that column",
            "check the column name (a typo maps nothing), or drop the --map",
        )
    same_key, same_row = _repeats(*keys, step=steps)
    if len(same_row) and not allow_duplicates:
        i = int(same_row[0])
        raise InputError(
            f"{_where(src, i)}: repeats an earlier row (prompt_idx {keys[0][i]}, sample_idx {keys[1][i]}, the same "
            f"response; {len(same_row)} such row(s)): it would be counted twice",
            "drop the repeated rows, or pass --allow-duplicates to score every row",
        )
    result.duplicate_keys, result.duplicate_rows = len(same_key), len(same_row)
    if len(same_key):
        result.duplicate_where = _where(src, int(same_key[0]))
    if not result.count:
        raise InputError(f"rollout file '{path}' holds no rollouts", "add at least one row")
    for key, values in hints.items():
        if key == "temperature" and len(values) > 1:  # per-rollout temperatures (prime-rl): each scored at its own
            if result.temperature_rows < result.count:
                raise InputError(
                    f"'{path}' mixes temperatures {sorted(values)} and {result.count - result.temperature_rows:,} "
                    "rollout(s) carry none",
                    "give every rollout its temperature, or pass --temperature for all",
                )
            result.temperatures = sorted(values)
            continue
        if len(values) > 1:
            raise InputError(
                f"'{path}' mixes {key} values {sorted(values)}",
                f"score rollouts of one {key} at a time, or pass --{key.replace('_', '-')}",
            )
        if values:
            result.sampling_hints[key] = values.pop()
    return result


def score_tier(data: RolloutFile, path: str | Path, requested: str | None) -> tuple[str, str | None]:
    """The tier `score` runs and, when it falls back, the warning that says why. The top-K tier needs
    top-K data on every row: asked for (--fidelity topk) on a file where some rows lack it, refused
    naming the first; chosen by default, the sampled tier with a warning."""
    if requested not in (None, "topk"):
        return requested, None
    if not data.has_topk:
        if requested is None:
            return "sampled", None
        raise InputError(f"'{path}' has no topk_logprobs", "use --fidelity sampled, or export the top-K log-probs")
    if data.topk_rows == data.count:
        return "topk", None
    some = f"{data.topk_rows:,} of {data.count:,} rows have topk_logprobs"
    if requested == "topk":
        raise InputError(
            f"{data.without_topk}: no topk_logprobs, while {some}: the top-K tier needs them on every row",
            "export the top-K log-probs of every row, or use --fidelity sampled",
        )
    return "sampled", f"only {some} (first without: {data.without_topk}): scored in the sampled tier"


def _repeats(prompt: array, sample: array, digest: array, step: array | None = None) -> tuple[Any, Any]:
    """Row numbers (ascending) of the rows whose (step, prompt_idx, sample_idx) an earlier row has, and of
    those whose response is that earlier row's too (``step``: a dump's training step; none for a file)."""
    import numpy as np

    p, s, d = (np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64) for a in (prompt, sample, digest))
    if step is not None and len(step):
        p = p + (np.frombuffer(step, dtype=np.int64) << 40)  # a (step, prompt_idx) key: indices restart per step
    rows = np.arange(len(p))

    def later(*columns: Any) -> Any:
        order = np.lexsort((rows, *reversed(columns)))  # ties in row order: the later row repeats the earlier
        ties = np.ones(max(len(order) - 1, 0), dtype=bool)
        for c in columns:
            ties &= c[order[1:]] == c[order[:-1]]
        return np.sort(order[1:][ties])

    return later(p, s), later(p, s, d)


def _where(src: RolloutSource, i: int) -> str:
    """The location (FILE:LINE or 'FILE row N') of row i of a rollout file, read again to name it."""
    return next(where for j, (where, _) in enumerate(source_rows(src)) if j == i)


def iter_rollout_chunks(
    path: str | Path,
    mapping: dict[str, str],
    tokenizer: Any,
    vocab_width: int | None,
    size: int,
    eos_ids: frozenset[int] = frozenset(),
    strip_after_eos: bool = True,
    unused: tuple[str, ...] = (),
) -> Iterator[list[Rollout]]:
    """The file's rollouts, `size` at a time, in file order (seq ids 0, 1, ... across chunks); the extras named in
    ``unused`` (kept sets, routed experts a run does not use) are dropped as each row is read."""
    chunk: list[Rollout] = []
    hints: dict[str, set] = {k: set() for k in SAMPLING_FIELDS}
    rows = _parse(as_source(path), mapping, tokenizer, vocab_width, RolloutFile([]), hints, eos_ids, strip_after_eos)
    for _, rollout in rows:
        for key in unused:
            rollout.extra.pop(key, None)
        chunk.append(rollout)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parse(
    path: RolloutSource,
    mapping: dict[str, str],
    tokenizer: Any,
    vocab_width: int | None,
    result: RolloutFile,
    hints: dict[str, set],
    eos_ids: frozenset[int],
    strip_after_eos: bool,
) -> Iterator[tuple[str, Rollout]]:
    """Each row as (where, validated Rollout); counts what was re-tokenised, empty, left-padded or padded after its
    first end-of-sequence token, and which rows have top-K data, into `result` (padding dropped when
    strip_after_eos)."""
    pad = _left_pad_id(tokenizer)
    for i, (where, raw) in enumerate(source_rows(path)):
        row = rename(raw, mapping)
        result.mapped_columns.update(k for k in mapping if k in raw)
        if row.get("prompt_ids") is None and row.get("rollout_logprobs") is None and (text := _text_only(row)):
            raise InputError(
                f"{where}: {text} (no token ids, no log-probs): re-tokenising decoded text is lossy",
                "audit the pipeline with trm-diag compare, or export token ids and the engine's log-probs",
            )
        given_ids = row.get("prompt_ids") is not None
        if row.get("prompt_ids") is None:
            if not isinstance(row.get("prompt"), str):
                raise InputError(f"{where}: no 'prompt_ids' (or 'prompt' text)", _map_fix("prompt_ids", mapping, raw))
            row["prompt_ids"] = tokenizer(row["prompt"])["input_ids"]
            result.retokenized += 1
        if row.get("response_ids") is None:
            if not isinstance(row.get("response"), str):
                raise InputError(
                    f"{where}: no 'response_ids' (or 'response' text)", _map_fix("response_ids", mapping, raw)
                )
            row["response_ids"] = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            result.retokenized += 1
        prompt = _int_list(row["prompt_ids"], where, "prompt_ids")
        resp = _int_list(row["response_ids"], where, "response_ids")
        lead = next((t for t, tok in enumerate(prompt) if tok != pad), len(prompt)) if pad is not None else 0
        if lead:  # a batch's left padding: the engine was fed the prompt without it
            result.left_pad_rollouts += 1
            result.left_pad_tokens += lead
            if strip_after_eos:
                prompt = prompt[lead:]
        if given_ids and isinstance(row.get("prompt"), str):  # the ids fed must be the text's (comparable.py)
            check_prompt_ids(prompt, row["prompt"], tokenizer, where)
        if isinstance(row.get("weights_fingerprint"), str):
            result.weights.add(row["weights_fingerprint"])
        if not prompt:
            what = f"prompt_ids hold only pad tokens (id {pad})" if lead else "empty prompt"
            raise InputError(f"{where}: {what}", "every rollout needs at least one prompt token")
        lps = row.get("rollout_logprobs")
        if lps is None:
            raise InputError(f"{where}: no 'rollout_logprobs'", _map_fix("rollout_logprobs", mapping, raw))
        if not isinstance(lps, (list, tuple)) or not all(isinstance(x, (int, float)) for x in lps):
            raise InputError(
                f"{where}: 'rollout_logprobs' must be a list of numbers", "one log-prob per response token"
            )
        lps = [float(x) for x in lps]
        if len(lps) != len(resp):
            raise InputError(
                f"{where}: {len(resp)} response tokens but {len(lps)} log-probs",
                "give one rollout log-prob per response token (re-tokenised text can differ from the engine's ids)",
            )
        bad = next((x for x in lps if math.isnan(x) or x > LOGPROB_SLACK), None)
        if bad is not None:
            raise InputError(
                f"{where}: invalid rollout log-prob {bad} (log-probs are <= 0 and not NaN)",
                "check the column holds log-probs, not probs or logits",
            )
        top = vocab_width if vocab_width is not None else 2**62  # no model (recorded log-probs): ids unchecked above
        out_of_vocab = next((t for t in prompt + resp if t < 0 or t >= top), None)
        if out_of_vocab is not None:
            raise InputError(
                f"{where}: token id {out_of_vocab} is outside the model's vocabulary{_span(vocab_width)}",
                "score with the model the rollouts came from",
            )
        extra: dict[str, Any] = {}
        if row.get("topk_logprobs") is not None:
            topk = _topk(row["topk_logprobs"], where, vocab_width)
            if len(topk) != len(resp):
                raise InputError(
                    f"{where}: {len(topk)} top-K entries for {len(resp)} response tokens",
                    "one entry per response token",
                )
            fewest = min(range(len(topk)), key=lambda t: len(topk[t]), default=None)
            k = _index(row.get("topk_k"), where, "topk_k", 0 if fewest is None else len(topk[fewest]))
            if fewest is not None and k > len(topk[fewest]):
                raise InputError(
                    f"{where}: topk_k is {k} but response token {fewest} has {len(topk[fewest])} top-K entries",
                    "give topk_k as the K the engine returned (every position holds at least K entries), or drop it",
                )
            extra.update(topk=topk, topk_k=k)
            result.has_topk = True
            result.topk_rows += 1
            result.topk_ks.add(k)
        elif not result.without_topk:
            result.without_topk = where
        for key in ("reward", "advantage"):
            if row.get(key) is not None:  # a verifier's true / false reads as 1 / 0
                v = row[key]
                extra[key] = float(v) if isinstance(v, bool) else _number(v, where, key)
        if row.get("step") is not None:
            extra["step"] = _index(row["step"], where, "step", 0)
        extra.update(token_extras(row, resp, where, vocab_width))
        if "train_logprobs" in extra:
            result.train_logprob_rows += 1
        elif not result.without_train:
            result.without_train = where
        if "kept_ids" in extra:
            result.kept_rows += 1
            result.kept_ids += sum(len(a) for a in extra["kept_ids"])
        if "routed_experts" in extra:
            result.routed_rows += 1
        if row.get("appended_eos"):
            result.appended_eos += 1
        for key in SAMPLING_FIELDS:
            if row.get(key) is not None:
                hints[key].add(_logprobs(row[key], where) if key == "logprobs" else _setting(row[key], where, key))
        if row.get("temperature") is not None:  # a rollout's own: scored at it when the input's rollouts differ
            extra["temperature"] = _setting(row["temperature"], where, "temperature")
            result.temperature_rows += 1
        end = next((t for t, tok in enumerate(resp) if tok in eos_ids), len(resp))
        if end < len(resp) - 1:  # tokens after the first EOS: padding of a right-padded export
            result.after_eos_rollouts += 1
            result.after_eos_tokens += len(resp) - 1 - end
            if strip_after_eos:
                resp, lps = resp[: end + 1], lps[: end + 1]
                if "topk" in extra:
                    extra["topk"] = extra["topk"][: end + 1]
                cut_extras(extra, end + 1)
        result.empty += not resp
        if "loss_mask" in extra:  # counted after the cut: what is left out of the scored response
            result.masked_rollouts += 1
            result.masked_tokens += int((~extra["loss_mask"]).sum())
            result.unscored_rollouts += not extra["loss_mask"].any()
        if len(prompt) + len(resp) > result.longest:
            result.longest, result.longest_where = len(prompt) + len(resp), where
        reason = row.get("finish_reason") or "unknown"
        yield (
            where,
            Rollout(
                i,
                _index(row.get("prompt_idx"), where, "prompt_idx", i),
                _index(row.get("sample_idx"), where, "sample_idx", 0),
                prompt,
                resp,
                lps,
                str(reason),
                extra,
            ),
        )


def _left_pad_id(tokenizer: Any) -> int | None:
    """The pad id a left-padded prompt starts with; None without one, or when it is also the BOS (GPT-2's
    <|endoftext|>), which a prompt may rightly start with."""
    pad = getattr(tokenizer, "pad_token_id", None)
    ok = isinstance(pad, int) and not isinstance(pad, bool) and pad != getattr(tokenizer, "bos_token_id", None)
    return pad if ok else None


def _map_fix(name: str, mapping: dict[str, str], raw: dict[str, Any]) -> str:
    """The fix for a row without a required field: the --map that names it (and the column the row lacks), or
    the mapping to write, with the columns the row has."""
    columns = ", ".join(sorted(map(str, raw))[:20]) or "none"
    given = next((src for src, canon in mapping.items() if canon == name), None)
    if given is not None:
        return f"--map {name}={given} names a column this row does not have (its columns: {columns})"
    return f"map your column with --map {name}=COLUMN (the row's columns: {columns})"


def _text_only(row: dict[str, Any]) -> str | None:
    """Which framework's decoded-text dump a row looks like (verl's rollout_data_dir, TRL's completions)."""
    if {"input", "output"} <= row.keys():
        return TEXT_ONLY["verl"]
    if "completion" in row and "prompt" in row:
        return TEXT_ONLY["trl"]
    return None


ROLLOUT_SUFFIXES = (".jsonl", ".json", ".parquet")


def _logprobs(value: Any, where: str) -> str:
    """A row's ``logprobs`` field: what its rollout_logprobs are (config.LOGPROBS)."""
    if value not in LOGPROBS:
        raise InputError(f"{where}: logprobs {value!r} is unknown", f"use one of: {', '.join(LOGPROBS)}")
    return value


def _rollout_rows(rollouts: list[Rollout], sampling: SamplingConfig, weights: str | None) -> list[dict[str, Any]]:
    rows = []
    for r in rollouts:
        row: dict[str, Any] = {
            "prompt_ids": r.prompt_ids, "response_ids": r.response_ids, "rollout_logprobs": r.lp_roll,
            "prompt_idx": r.prompt_idx, "sample_idx": r.sample_idx, "finish_reason": r.finish_reason,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "min_p": sampling.min_p,
            "logprobs": sampling.logprobs,
        }  # fmt: skip
        if weights is not None:  # the rollout engine's weights fingerprint (backends/fingerprint.py)
            row["weights_fingerprint"] = weights
        if "topk" in r.extra:
            row["topk_logprobs"] = [[[int(k), float(v)] for k, v in d.items()] for d in r.extra["topk"]]
            row["topk_k"] = r.extra["topk_k"]
        rows.append(row)
    return rows


def _rollout_schema(topk: bool, weights: bool = False) -> Any:
    import pyarrow as pa

    fields = [
        ("prompt_ids", pa.list_(pa.int64())), ("response_ids", pa.list_(pa.int64())),
        ("rollout_logprobs", pa.list_(pa.float64())), ("prompt_idx", pa.int64()), ("sample_idx", pa.int64()),
        ("finish_reason", pa.string()), ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()),
        ("min_p", pa.float64()), ("logprobs", pa.string()),
    ]  # fmt: skip
    if weights:
        fields.append(("weights_fingerprint", pa.string()))
    if topk:
        # per response token, a list of [token_id, logprob] pairs (ids are exact in float64 up to 2^53)
        fields += [("topk_logprobs", pa.list_(pa.list_(pa.list_(pa.float64())))), ("topk_k", pa.int64())]
    return pa.schema(fields)


def check_rollouts_path(path: str | Path) -> None:
    """--save-rollouts must name a .jsonl or .parquet file (checked before any work is done)."""
    if Path(path).suffix.lower() not in ROLLOUT_SUFFIXES:
        raise UsageError(f"--save-rollouts {path}: unsupported file type", "use a .jsonl or .parquet file name")


def write_rollouts(
    path: str | Path, chunks: Iterable[list[Rollout]], sampling: SamplingConfig, weights: str | None = None
) -> None:
    """Write rollouts, chunk by chunk, in the schema above (JSONL or Parquet by suffix), atomically; ``weights``:
    the rollout engine's weights fingerprint, on every row."""
    from trm_diag.report.tables import atomic_write

    check_rollouts_path(path)
    p = Path(path)

    def parquet(tmp: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            for rollouts in chunks:
                rows = _rollout_rows(rollouts, sampling, weights)
                if writer is None:
                    schema = _rollout_schema(any("topk_logprobs" in r for r in rows), weights is not None)
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))
            if writer is None:
                pq.write_table(_rollout_schema(False).empty_table(), tmp)
        finally:
            if writer is not None:
                writer.close()

    def jsonl(tmp: str) -> None:
        with open(tmp, "w") as f:
            for rollouts in chunks:
                f.writelines(json.dumps(row) + "\n" for row in _rollout_rows(rollouts, sampling, weights))

    atomic_write(p, parquet if p.suffix.lower() == ".parquet" else jsonl)
