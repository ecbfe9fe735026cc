"""prime-rl's rollout dump: the packed micro-batches its orchestrator hands the trainer through the filesystem
transport (``rollout_transport.type = "filesystem"``), one msgpack file per step and data rank,
``{output_dir}/rollouts/step_{N}/rank_{r}.bin``.

Layout (prime-rl since commit 289562d2e, read at 559b447: transports/rollouts/types.py ``MicroBatch``,
trainer/batch.py packing): each file is a msgpack array of micro-batches, each micro-batch an array of fields by
position (msgspec ``array_like``; trailing unset fields omitted): input_ids, loss_mask, advantages,
inference_logprobs, position_ids, sequence_lengths, temperatures, env_names, seq_lens, ref_logprobs,
routed_experts ([data, shape, dtype]), mm_kwargs, ... Samples are packed back to back (split by
``sequence_lengths``); the padding the packer appends to the last sample restarts its position_ids at 0 and is cut
there; a sample's prompt is its loss_mask-0 head and its response the rest. Sequences with no trained token
(the dummy micro-batches that even out the ranks, copies of real ones, and samples whose loss prime-rl
masked whole) are not scored: the trainer did not train on any of their tokens, and trm-diag scores trained
tokens only (docs/integrations.md).

Only the inference side is in the dump (no trainer log-probs, no rewards, no sample indices): ``prompt_idx``
numbers the distinct prompts of a step and ``sample_idx`` the samples of a step, over what is read (ranks in order,
micro-batches and samples in file order, which is the packer's, not the rollout order). msgpack is not a pickle:
``allow_pickle`` is ignored for this format.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trm_diag.errors import InputError, os_error

STEP_DIR = re.compile(r"step_(\d+)")
RANK_FILE = re.compile(r"rank_(\d+)\.bin")
# the MicroBatch fields by position (prime-rl 289562d2e and later)
FIELDS = (
    "input_ids", "loss_mask", "advantages", "inference_logprobs", "position_ids", "sequence_lengths",
    "temperatures", "env_names", "seq_lens", "ref_logprobs", "routed_experts", "mm_kwargs", "mm_token_type_ids",
    "rl_weights", "ce_weights", "ref_kl_weights",
)  # fmt: skip
REQUIRED = 9  # input_ids .. seq_lens; the rest default to None and may be omitted
PER_TOKEN = ("loss_mask", "advantages", "inference_logprobs", "position_ids", "temperatures", "env_names")
LAYOUT_FIX = (
    "write the dump with prime-rl 289562d2e (2026-08-08) or later, or export the samples as a rollout file "
    "(docs/rollout-schema.md)"
)


def detect(path: Path) -> bool:
    """A prime-rl rollout dump: a ``rank_N.bin`` file starting with a msgpack array, a ``step_N`` folder whose first
    rank file is one, the ``rollouts`` folder of those, or the run's output folder holding ``rollouts``."""
    try:
        if path.is_file():
            if not RANK_FILE.fullmatch(path.name):
                return False
            with path.open("rb") as f:
                head = f.read(1)
            return bool(head) and (0x90 <= head[0] <= 0x9F or head[0] in (0xDC, 0xDD))
        if not path.is_dir():
            return False
        if STEP_DIR.fullmatch(path.name) and (files := _rank_files(path)):
            return detect(files[0])
        root = path / "rollouts" if (path / "rollouts").is_dir() else path
        return any(detect(d) for d in _step_dirs(root)[:1])
    except OSError:
        return False


def rows(path: Path, allow_pickle: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of every sample of the dump, steps in numeric order, each step's ranks merged.
    ``allow_pickle`` is ignored: msgpack cannot run code when read."""
    del allow_pickle
    for step, files in _steps(path):
        prompts: dict[tuple[int, ...], int] = {}
        counter = [0]
        for file in files:
            yield from _file_rows(file, step, prompts, counter)


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` folders of a rollouts folder, in numeric order."""
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := STEP_DIR.fullmatch(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def _rank_files(step_dir: Path) -> list[Path]:
    """The ``rank_N.bin`` files of a step folder in rank order (``.bin.tmp`` files are still being written)."""
    found = [(int(m.group(1)), f) for f in step_dir.iterdir() if (m := RANK_FILE.fullmatch(f.name))]
    return [f for _, f in sorted(found)]


def _step_files(step_dir: Path) -> list[Path]:
    """A step's rank files, refused when one is missing (ranks 0, 1, ... without a gap)."""
    files = _rank_files(step_dir)
    if not files:
        raise InputError(
            f"'{step_dir}' holds no rank_N.bin file (still being written?)",
            "wait for the step to be written, or pass the complete step folders",
        )
    ranks = [int(RANK_FILE.fullmatch(f.name).group(1)) for f in files]  # type: ignore[union-attr]
    if ranks != list(range(len(ranks))):
        missing = min(set(range(max(ranks) + 1)) - set(ranks))
        raise InputError(
            f"'{step_dir}' has no rank_{missing}.bin (ranks found: {ranks})",
            "copy every rank's file of the step, or pass one .bin file",
        )
    return files


def _step_of(folder: Path) -> int:
    m = STEP_DIR.fullmatch(folder.name)
    if m is None:
        raise InputError(
            f"cannot tell the step of '{folder}' (prime-rl writes rollouts/step_N/rank_R.bin)",
            "keep the file in its step_N folder",
        )
    return int(m.group(1))


def _steps(path: Path) -> list[tuple[int, list[Path]]]:
    """(step, rank files) of the dump at ``path``: a .bin file, a step folder, a rollouts folder or an output folder."""
    if path.is_file():
        return [(_step_of(path.parent), [path])]
    if not path.is_dir():
        raise InputError(
            f"prime-rl dump '{path}' does not exist", "pass the run's output_dir, a step folder or a .bin file"
        )
    if STEP_DIR.fullmatch(path.name) and _rank_files(path):
        return [(_step_of(path), _step_files(path))]
    root = path / "rollouts" if (path / "rollouts").is_dir() else path
    steps = [(_step_of(d), _step_files(d)) for d in _step_dirs(root)]
    if not steps:
        raise InputError(
            f"no prime-rl rollout dump in '{path}' (no rollouts/step_N/rank_R.bin)",
            "pass the run's output_dir, one step folder or one .bin file; prime-rl writes them only with "
            'rollout_transport.type = "filesystem"',
        )
    counts = {len(files) for _, files in steps}
    if len(counts) > 1:
        step, files = min(steps, key=lambda s: len(s[1]))
        raise InputError(
            f"step_{step} of '{path}' has {len(files)} rank file(s) while other steps have {max(counts)} "
            "(a step still being written?)",
            "wait for the step to be written, or pass the complete step folders one at a time",
        )
    return steps


def _unpack(file: Path) -> list[Any]:
    """The decoded micro-batches of one rank file."""
    try:
        import msgpack
    except ModuleNotFoundError:
        raise InputError(f"reading prime-rl's '{file}' needs the msgpack package", "pip install msgpack") from None
    try:
        data = file.read_bytes()
    except OSError as e:
        raise os_error(e) from None
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise InputError(
            f"'{file}' is not a complete msgpack file ({type(e).__name__}: truncated or damaged)",
            "copy the file again from the run (prime-rl renames rank_R.bin.tmp when it is complete)",
        ) from None
    if not isinstance(obj, list) or not all(isinstance(mb, list) for mb in obj):
        raise InputError(f"'{file}' is not a list of prime-rl micro-batches", LAYOUT_FIX)
    return obj


def _array(v: Any, kinds: str, where: str, name: str) -> np.ndarray:
    """A list field as a numpy array whose dtype kind is one of ``kinds`` (b bool, i/u int, f float, U str)."""
    if not isinstance(v, list):
        raise InputError(
            f"{where}: field '{name}' is {type(v).__name__}, not a list: not the MicroBatch layout", LAYOUT_FIX
        )
    try:
        a = np.asarray(v)
    except (ValueError, TypeError):  # ragged or mixed entries
        raise InputError(
            f"{where}: field '{name}' is not a flat list of values: not the MicroBatch layout", LAYOUT_FIX
        ) from None
    if a.ndim != 1 or (len(a) and a.dtype.kind not in kinds):
        raise InputError(f"{where}: field '{name}' has {a.dtype} values: not the MicroBatch layout", LAYOUT_FIX)
    return a


def _routed(v: Any, n: int, where: str) -> np.ndarray | None:
    """``routed_experts`` ([data, shape, dtype], or None) as an integer array (n, layers, k)."""
    if v is None:
        return None
    ok = isinstance(v, list) and len(v) == 3 and isinstance(v[0], bytes) and isinstance(v[2], str)
    shape = v[1] if ok else None
    if not ok or not isinstance(shape, list) or len(shape) != 3 or not all(type(x) is int and x >= 0 for x in shape):
        raise InputError(f"{where}: 'routed_experts' is not [data, [tokens, layers, k], dtype]", LAYOUT_FIX)
    try:
        dtype = np.dtype(v[2])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "iu":
        raise InputError(f"{where}: 'routed_experts' has dtype {v[2]!r}, not an integer type", LAYOUT_FIX)
    if shape[0] != n or len(v[0]) != shape[0] * shape[1] * shape[2] * dtype.itemsize:
        raise InputError(
            f"{where}: 'routed_experts' holds {len(v[0])} bytes of shape {shape} for {n} tokens (mismatched lengths)",
            "copy the file again from the run",
        )
    return np.frombuffer(v[0], dtype=dtype).reshape(shape)


def _fields(mb: list[Any], where: str) -> dict[str, Any]:
    """A micro-batch's fields by name, checked for the layout and per-token lengths."""
    if not REQUIRED <= len(mb) <= len(FIELDS):
        raise InputError(f"{where}: a micro-batch of {len(mb)} fields, not {REQUIRED}..{len(FIELDS)}", LAYOUT_FIX)
    raw = dict(zip(FIELDS, mb + [None] * (len(FIELDS) - len(mb))))
    f: dict[str, Any] = {
        "input_ids": _array(raw["input_ids"], "iu", where, "input_ids"),
        "loss_mask": _array(raw["loss_mask"], "b", where, "loss_mask"),
        "advantages": _array(raw["advantages"], "iuf", where, "advantages"),
        "inference_logprobs": _array(raw["inference_logprobs"], "iuf", where, "inference_logprobs"),
        "position_ids": _array(raw["position_ids"], "iu", where, "position_ids"),
        "sequence_lengths": _array(raw["sequence_lengths"], "iu", where, "sequence_lengths"),
        "temperatures": _array(raw["temperatures"], "iuf", where, "temperatures"),
        "env_names": _array(raw["env_names"], "U", where, "env_names"),
        "seq_lens": _array(raw["seq_lens"], "iu", where, "seq_lens"),
    }
    if raw["ref_logprobs"] is not None:
        _array(raw["ref_logprobs"], "iuf", where, "ref_logprobs")
    if raw["mm_kwargs"] is not None and not isinstance(raw["mm_kwargs"], dict):
        raise InputError(f"{where}: field 'mm_kwargs' is not a map: not the MicroBatch layout", LAYOUT_FIX)
    if raw["mm_kwargs"] is not None or raw["mm_token_type_ids"] is not None:
        raise InputError(
            f"{where}: multimodal samples (images) are not supported yet", "score the run's text-only samples"
        )
    n = len(f["input_ids"])
    for name in PER_TOKEN:
        if len(f[name]) != n:
            raise InputError(
                f"{where}: '{name}' has {len(f[name])} entries for {n} input_ids (mismatched lengths)",
                "copy the file again from the run",
            )
    lengths = f["sequence_lengths"]
    if not len(lengths) or lengths.min() <= 0 or int(lengths.sum()) != n:
        raise InputError(
            f"{where}: sequence_lengths {lengths.tolist()} do not split its {n} tokens (mismatched lengths)",
            "copy the file again from the run",
        )
    if not np.array_equal(f["seq_lens"], lengths):
        raise InputError(
            f"{where}: seq_lens {f['seq_lens'].tolist()} differ from sequence_lengths {lengths.tolist()} "
            "(a packing this reader does not know)",
            LAYOUT_FIX,
        )
    f["routed_experts"] = _routed(raw["routed_experts"], n, where)
    return f


def _file_rows(
    file: Path, step: int, prompts: dict[tuple[int, ...], int], counter: list[int]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The samples of one rank file; ``prompts`` and ``counter`` number prompts and samples across the step."""
    for m, mb in enumerate(_unpack(file)):
        mb_where = f"{file}: step {step}, micro-batch {m}"
        f = _fields(mb, mb_where)
        ends = np.cumsum(f["sequence_lengths"])
        for s, (start, end) in enumerate(zip((0, *ends[:-1].tolist()), ends.tolist())):
            where = f"{mb_where}, sequence {s}"
            stop = _padding_start(f, start, end, last=s == len(ends) - 1, where=where)
            mask = f["loss_mask"][start:stop]
            trained = np.flatnonzero(mask)
            if not len(trained):
                continue  # a dummy micro-batch's copy (loss_mask all 0): not a sample
            first = start + int(trained[0])
            sample_idx = counter[0]
            counter[0] += 1
            where = f"{file}: step {step}, sample {sample_idx} (micro-batch {m}, sequence {s})"
            temps = f["temperatures"][first:stop]
            if not np.all(temps == temps[0]):
                raise InputError(
                    f"{where}: the temperature varies within the response ({float(temps.min())} to "
                    f"{float(temps.max())}); varying temperature within one sample is not supported yet",
                    "score runs sampled at one temperature per sample",
                )
            prompt = tuple(f["input_ids"][start:first].tolist())
            row: dict[str, Any] = {
                "prompt_ids": list(prompt),
                "response_ids": f["input_ids"][first:stop].tolist(),
                "rollout_logprobs": f["inference_logprobs"][first:stop].astype(np.float64).tolist(),
                "prompt_idx": prompts.setdefault(prompt, len(prompts)),
                "sample_idx": sample_idx,
                "step": step,
                "temperature": float(temps[0]),
            }
            trained = f["loss_mask"][first:stop]  # 0 after the first trained token: a tool's output, not scored
            if not trained.all():
                row["loss_mask"] = trained.tolist()
            adv = f["advantages"][first:stop]
            if np.all(adv == adv[0]):
                row["advantage"] = float(adv[0])
            if f["routed_experts"] is not None:
                row["routed_experts"] = f["routed_experts"][first:stop].tolist()
            yield where, row


def _padding_start(f: dict[str, Any], start: int, end: int, last: bool, where: str) -> int:
    """Where the packer's padding begins in sequence [start, end) (``end`` when it has none): its position_ids
    restart at 0, which only the last sequence of a micro-batch may do; padding is never trained."""
    pos = f["position_ids"][start:end]
    resets = np.flatnonzero(pos[1:] == 0)
    stop = end if not len(resets) else start + 1 + int(resets[0])
    real, pad = pos[: stop - start], pos[stop - start :]
    if (
        not np.array_equal(real, np.arange(len(real)))
        or not np.array_equal(pad, np.arange(len(pad)))
        or (len(pad) and not last)
    ):
        raise InputError(
            f"{where}: position_ids do not count 0, 1, 2, ... within the sample (then its padding)",
            "copy the file again from the run, " + LAYOUT_FIX,
        )
    if f["loss_mask"][stop:end].any():
        raise InputError(
            f"{where}: padding tokens with loss_mask 1 (position_ids restart inside trained tokens)", LAYOUT_FIX
        )
    return stop
