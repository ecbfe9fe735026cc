"""slime's debug dumps as rollout rows: ``--dump-details DIR`` writes, per rollout step N, ``DIR/rollout_data/N.pt``
(``torch.save({"rollout_id": N, "samples": [Sample.to_dict(), ...]})``) and ``DIR/train_data/N.pt`` (format_version 2:
the trainer's per-sample fields, ``sample_index`` joining the rollout side's ``index``); ``--save-debug-rollout-data``
/ ``--save-debug-train-data`` write the same files under a ``{rollout_id}`` path template.

A folder is read step by step in numeric order, training steps only: eval rollouts (``rollout_data/eval_N.pt``) have no
trainer side and sample another prompt set, so they are ignored there (pass one such file to score it alone). Old
per-rank train files (``train_data/N_RANK.pt``, slime before format_version 2) are not joined.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError, UsageError
from trm_diag.report.dumps._numpy_safe import builtin_dtype, numeric_scalar

TRAIN_FORMAT_VERSION = 2  # train_data payloads this reader knows (slime/observability/train_data_utils.py)
_STEP = re.compile(r"(eval_)?(\d+)\.pt")
_STATUS = {"completed": "stop", "truncated": "length"}  # Sample.Status value -> finish_reason


def detect(path: Path) -> bool:
    """A ``--dump-details`` folder (or its rollout_data/), or one step's ``rollout_data/N.pt``."""
    if path.is_dir():
        folder = path if path.name == "rollout_data" else path / "rollout_data"
        return folder.is_dir() and any(_STEP.fullmatch(p.name) for p in folder.iterdir())
    return path.parent.name == "rollout_data" and _STEP.fullmatch(path.name) is not None


def rows(path: Path, allow_pickle: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """One row per rollout sample of every step, joined with the trainer's samples where train_data holds the step."""
    for step, rollout_file, train_file in _steps(path):
        yield from _step_rows(step, rollout_file, train_file, allow_pickle)


def _steps(path: Path) -> list[tuple[int | None, Path, Path | None]]:
    """(step named by the file, rollout file, its train file or None) in step order."""
    if path.is_dir():
        folder = path if path.name == "rollout_data" else path / "rollout_data"
        if not folder.is_dir():
            raise InputError(f"'{path}' has no rollout_data/ folder", "pass the folder given to slime's --dump-details")
        found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name)) and not m.group(1)]
        steps = [s for s, _ in found]
        twice = sorted({s for s in steps if steps.count(s) > 1})
        if twice:  # 1.pt and 01.pt: one step, read twice otherwise
            names = sorted(p.name for s, p in found if s == twice[0])
            raise InputError(f"'{folder}' holds step {twice[0]} twice ({', '.join(names)})", "keep one file per step")
        if not found:
            raise InputError(
                f"'{folder}' holds no training step's N.pt file", "pass the folder given to slime's --dump-details"
            )
        return [(step, p, _train_file(p)) for step, p in sorted(found)]
    if not path.is_file():
        raise InputError(f"'{path}' does not exist", "pass slime's --dump-details folder or one rollout_data/N.pt file")
    if path.parent.name == "train_data":
        raise InputError(
            f"'{path}' is slime's train-side dump", "pass the rollout_data/N.pt file of that step, or the dump folder"
        )
    m = _STEP.fullmatch(path.name)
    step = int(m.group(2)) if m else None
    return [(step, path, _train_file(path) if m and not m.group(1) else None)]


def _train_file(rollout_file: Path) -> Path | None:
    """The train_data/N.pt beside rollout_data/N.pt, when the run wrote it (--dump-details layout)."""
    if rollout_file.parent.name != "rollout_data":
        return None
    train = rollout_file.parent.parent / "train_data" / rollout_file.name
    return train if train.is_file() else None


def _load(file: Path, allow_pickle: bool) -> Any:
    """A torch.save file read with torch's weights-only unpickler (tensors, containers, numbers, strings, numpy)."""
    if not allow_pickle:
        raise UsageError(
            f"'{file}' is a pickle (slime's dump), which can run code when loaded",
            "pass --allow-pickle if you trust this run's files (they are then read with a restricted unpickler)",
        )
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        refused = re.search(r"GLOBAL (\S+)", text)
        if "Weights only load failed" in text and refused:
            raise InputError(
                f"'{file}' holds a {refused.group(1)} object, which the restricted unpickler refuses (it could run code)",
                "slime's own fields are lists, numbers, strings and tensors: drop custom objects a generate or reward "
                "function stored in the samples (metadata, multimodal inputs) before dumping",
            ) from None
        if "Weights only load failed" in text:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            raise InputError(
                f"'{file}' is not a file the restricted unpickler reads ({detail.group(1) if detail else 'refused'})",
                "pass the .pt files slime writes with torch.save",
            ) from None
        raise _damaged(file, e) from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, AttributeError, TypeError) as e:
        raise _damaged(file, e) from None


def _damaged(file: Path, e: BaseException) -> InputError:
    reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:160]  # torch's first sentence
    return InputError(
        f"'{file}' is damaged or truncated ({reason})",
        "copy it again from the run, or move this step's files out of the dump folder to score the others",
    )


def _numpy_globals() -> list[Any]:
    """numpy arrays and scalars (a reward function may return numpy numbers), under numpy 1 and 2 names."""
    import numpy as np

    # dtype and scalar through wrappers that give numpy's shared built-in numeric dtypes only (_numpy_safe)
    out: list[Any] = [np.ndarray, (builtin_dtype, "numpy.dtype"), *(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG")]
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for name, fn in (("_reconstruct", core._reconstruct), ("scalar", numeric_scalar)):
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return out


def _step_rows(
    step: int | None, rollout_file: Path, train_file: Path | None, allow_pickle: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
    payload = _load(rollout_file, allow_pickle)
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        raise InputError(
            f"'{rollout_file}' is not a slime rollout dump (no 'samples' list)",
            "pass the rollout_data/N.pt files slime's --save-debug-rollout-data writes",
        )
    step = _step_of(payload, rollout_file, step)
    samples: list[Any] = payload["samples"]
    train = _train_samples(train_file, step, samples, allow_pickle) if train_file else None
    for pos, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise InputError(f"'{rollout_file}': sample {pos} is not a dict", "pass an unmodified slime dump")
        index = _opt_int(sample.get("index"))
        where = f"{rollout_file}: sample {pos if index is None else index}"
        row = _row(sample, where, step, pos, index)
        if train is not None:
            _join(row, train, pos, index, where, train_file)  # type: ignore[arg-type]
        yield where, row


def _step_of(payload: dict, file: Path, named: int | None) -> int:
    rid = payload.get("rollout_id")
    if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0:
        raise InputError(f"'{file}' has no integer rollout_id", "pass an unmodified slime dump")
    if named is not None and rid != named:
        raise InputError(
            f"'{file}' holds rollout_id {rid}, not the step its name says", "give the file its slime name back: N.pt"
        )
    return rid


def _opt_int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v) if float(v).is_integer() else None
    except (TypeError, ValueError):
        return None


def _ints(v: Any, where: str, name: str) -> list[int]:
    """A list / 1-D tensor / array of integers as a Python list."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: '{name}' is not a list of integers", "pass an unmodified slime dump")
    return list(v)


def _floats(v: Any, where: str, name: str) -> list[float]:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: '{name}' is not a list of numbers", "pass an unmodified slime dump")
    return [float(x) for x in v]


def _row(sample: dict, where: str, step: int, pos: int, index: int | None) -> dict[str, Any]:
    """The schema row of one Sample.to_dict(): tokens split at response_length, the engine's log-probs, kept sets."""
    tokens = _ints(sample.get("tokens"), where, "tokens")
    n = sample.get("response_length")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(tokens):
        raise InputError(
            f"{where}: response_length {n!r} does not fit its {len(tokens)} tokens (prompt + response)",
            "pass an unmodified slime dump",
        )
    cut = len(tokens) - n
    if sample.get("rollout_log_probs") is None:
        raise InputError(
            f"{where}: no rollout_log_probs (the engine's log-probs)",
            "keep slime's default generate (it asks SGLang for log-probs), or store them in Sample.rollout_log_probs",
        )
    lps = _floats(sample["rollout_log_probs"], where, "rollout_log_probs")
    if len(lps) != n:
        raise InputError(
            f"{where}: {n} response tokens but {len(lps)} rollout_log_probs", "pass an unmodified slime dump"
        )
    mask = _loss_mask(sample.get("loss_mask"), n, where)
    row: dict[str, Any] = {
        "prompt_ids": tokens[:cut],
        "response_ids": tokens[cut:],
        "rollout_logprobs": lps,
        "sample_idx": pos if index is None else index,
        "step": step,
    }
    group = _opt_int(sample.get("group_index"))
    if group is not None:
        row["prompt_idx"] = group
    reward = sample.get("reward")
    if hasattr(reward, "item") and getattr(reward, "ndim", 1) == 0:
        reward = reward.item()  # a numpy or torch scalar
    if isinstance(reward, (int, float)) and not isinstance(reward, bool):
        row["reward"] = float(reward)  # a dict of rewards (--reward-key) names no single one: left out
    status = sample.get("status")
    if isinstance(status, str):
        row["finish_reason"] = _STATUS.get(status, status)
    if mask is not None and not all(mask):
        row["loss_mask"] = mask  # 0: a tool's output or an older policy's tokens inside the response: not scored
    kept = _kept(sample, n, where)
    if kept is not None:
        row["kept_ids"] = kept
    experts = sample.get("rollout_routed_experts")
    if experts is not None:
        row["routed_experts"] = _experts(experts, len(tokens), cut, where)
    return row


def _loss_mask(mask: Any, n: int, where: str) -> list[int] | None:
    """The response's loss mask: 0 marks a token the policy did not sample under this policy (a tool's output in
    a multi-turn sample, an older policy's tokens of a masked partial rollout), whose log-prob is not the engine's."""
    if mask is None:
        return None
    mask = _ints(mask, where, "loss_mask")
    if len(mask) != n:
        raise InputError(f"{where}: {len(mask)} loss_mask entries for {n} response tokens", "pass an unmodified dump")
    return mask


def _kept(sample: dict, n: int, where: str) -> list[list[int]] | None:
    """The engine's kept top-p set per response token: ids[offsets[t]:offsets[t + 1]]."""
    ids, offsets = sample.get("rollout_top_p_token_ids"), sample.get("rollout_top_p_token_offsets")
    if ids is None and offsets is None:
        return None
    fix = "pass an unmodified slime dump (the offsets start at 0, never decrease, and end at the number of ids)"
    if ids is None or offsets is None:
        raise InputError(f"{where}: rollout_top_p_token_ids and _offsets come in pairs, one is missing", fix)
    ids, offsets = _ints(ids, where, "rollout_top_p_token_ids"), _ints(offsets, where, "rollout_top_p_token_offsets")
    if len(offsets) != n + 1:
        raise InputError(
            f"{where}: {len(offsets)} rollout_top_p_token_offsets for {n} response tokens (expected {n + 1})", fix
        )
    if offsets[0] != 0 or offsets[-1] != len(ids) or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise InputError(
            f"{where}: rollout_top_p_token_offsets {offsets[:3]}...{offsets[-1:]} do not split its {len(ids)} ids", fix
        )
    return [ids[offsets[t] : offsets[t + 1]] for t in range(n)]


def _experts(value: Any, length: int, cut: int, where: str) -> list:
    """Routed experts of the input positions that predict the response tokens: slime keeps one row per input
    position 0..L-2 ([L-1, layers, k]); rows cut-1 .. L-2 are the response's (as trm-diag's routing is)."""
    import torch

    try:
        experts = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        experts = None
    if experts is None or experts.ndim != 3 or experts.shape[0] != length - 1 or experts.is_floating_point():
        shape = None if experts is None else tuple(experts.shape)
        raise InputError(
            f"{where}: rollout_routed_experts of shape {shape}, expected integer ids of shape ({length - 1}, layers, k)",
            "pass an unmodified slime dump",
        )
    return experts[cut - 1 :].tolist()


def _train_samples(file: Path, step: int, rollout: list, allow_pickle: bool) -> dict[str, Any]:
    """The trainer's samples of a step, keyed by sample_index (the rollout side's index), else rollout_position."""
    payload = _load(file, allow_pickle)
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        raise InputError(
            f"'{file}' is not a slime train dump (no 'samples' list)",
            "pass the train_data/N.pt files slime's --save-debug-train-data writes",
        )
    version = payload.get("format_version")
    if version != TRAIN_FORMAT_VERSION:
        raise InputError(
            f"'{file}' has format_version {version!r}; this reader knows {TRAIN_FORMAT_VERSION}",
            "upgrade trm-diag, or move train_data/ aside to score the rollout side alone",
        )
    _step_of(payload, file, step)
    samples = payload["samples"]
    if not all(isinstance(s, dict) for s in samples):
        raise InputError(f"'{file}': a train sample is not a dict", "pass an unmodified slime dump")
    indices = [_opt_int(s.get("index")) if isinstance(s, dict) else None for s in rollout]
    by_index = [_opt_int(s.get("sample_index")) for s in samples]
    if None not in indices and None not in by_index and len(set(indices)) == len(indices):
        key, keys = "index", by_index
    else:  # custom rollouts leave Sample.index None: the position in the rollout dump joins them
        key, keys = "position", [_opt_int(s.get("rollout_position")) for s in samples]
        if None in keys:
            raise InputError(
                f"'{file}': train samples carry neither sample_index nor rollout_position for every sample",
                "dump with a slime that writes format_version 2 with the rollout positions",
            )
    table: dict[int, dict] = {}
    for k, s in zip(keys, samples):
        if k in table:
            raise InputError(f"'{file}': two train samples with {key} {k}", "pass an unmodified slime dump")
        table[k] = s  # type: ignore[index]
    expected = set(range(len(rollout))) if key == "position" else set(indices)
    extra = sorted(set(table) - expected)  # type: ignore[arg-type]
    if extra:
        raise InputError(
            f"'{file}': train sample with {key} {extra[0]} has no rollout sample in rollout_data/{file.name}",
            "pass the rollout_data and train_data of the same run and step",
        )
    return {"key": key, "table": table}


def _join(row: dict, train: dict, pos: int, index: int | None, where: str, train_file: Path) -> None:
    """The trainer's recorded log-probs of a rollout sample (its train sample must exist and hold its tokens)."""
    k = pos if train["key"] == "position" else index
    sample = train["table"].get(k)
    if sample is None:
        raise InputError(
            f"{where}: step {row['step']} sample {k} has no train sample in '{train_file}'",
            "pass the rollout_data and train_data of the same run and step, or move train_data/ aside",
        )
    n = len(row["response_ids"])
    if sample.get("tokens") is not None:
        tokens = _ints(sample["tokens"], where, "train tokens")
        if tokens != row["prompt_ids"] + row["response_ids"]:
            raise InputError(
                f"{where}: its train sample in '{train_file}' holds other tokens (the dumps do not join)",
                "pass the rollout_data and train_data of the same run and step",
            )
    if sample.get("log_probs") is None:
        return  # a loss that records no actor log-probs
    lps = _floats(sample["log_probs"], where, "train log_probs")
    if len(lps) != n:
        raise InputError(
            f"{where}: {n} response tokens but {len(lps)} train log_probs in '{train_file}'",
            "pass the rollout_data and train_data of the same run and step",
        )
    row["train_logprobs"] = lps
