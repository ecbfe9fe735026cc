"""SkyRL's training-batch dumps (``trainer.dump_data_batch=true``): one pickled ``TrainingInputBatch`` a step,
``{export_path}/dumped_data/global_step_{N}_training_input.pkl``, read without importing SkyRL.

The pickle holds the batch's ``__getstate__``: ``batch_dict`` (key -> ``{"format": "numpy", "data", "shape",
"dtype"}``, or ``{"format": "torch", "data"}`` holding a ``torch.save`` of a dtype numpy lacks, e.g. bf16),
``batch_size``, ``device`` and ``metadata``. A restricted unpickler maps the class to a stand-in that keeps
that state; the raw tensors older dumps also pickle as dict items are never rebuilt.
Each row is laid out by its masks (both SkyRL layouts, left-padded rows with right-aligned response
tensors, and the older left-padded prompt + right-padded response): response token j of ``response_mask``
sits at sequence column ``S - R + j``; the prompt is the rest of ``attention_mask``'s real tokens. The
``metadata["pad_size"]`` rows SkyRL appends (copies of row 0) are not samples and are skipped.
Only training batches are dumped; eval results (``dumped_evals/``) hold no token ids and are not read.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trm_diag.errors import InputError, UsageError
from trm_diag.report.dumps._numpy_safe import builtin_dtype, numeric_scalar

FRAMEWORK = "SkyRL"
DUMP_DIR = "dumped_data"
FILE_RE = re.compile(r"^global_step_(\d+)_training_input\.pkl$")
BATCH_MODULES = ("skyrl.backends.skyrl_train.training_batch", "skyrl_train.training_batch")
FORMATS = ("numpy", "torch", "tensor_list")  # TensorBatch's per-tensor serialisations
NEEDED = ("sequences", "attention_mask", "response_mask", "loss_mask")
LOGPROBS_FIX = "turn on the engine's log-probs (generator.sampling_params.logprobs=1) and dump again"


class _Batch(dict):
    """Stand-in for TrainingInputBatch: keeps the pickled state; drops the dict items older dumps pickle
    (raw tensors, the same values as the state's)."""

    state: Any = None

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_batch(cls: Any, state: Any) -> _Batch:
    """SkyRL's ``_rebuild_tensor_batch(cls, state)``."""
    obj = _Batch()
    obj.state = state
    return obj


def _ignored(*args: Any, **kwargs: Any) -> None:
    """What a raw tensor (or its storage) in an older dump's dict items becomes: nothing is loaded."""
    return None


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


# (module, name) -> what the restricted unpickler hands back instead
_TORCH_IGNORED = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.storage", "_load_from_bytes"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _Unpickler(pickle.Unpickler):
    """Loads only what a SkyRL dump holds; any other global (os.system, ...) stops the load."""

    def find_class(self, module: str, name: str) -> Any:
        if module in BATCH_MODULES and name in ("TrainingInputBatch", "TensorBatch"):
            return _Batch
        if module in BATCH_MODULES and name == "_rebuild_tensor_batch":
            return _rebuild_batch
        if (module, name) in _TORCH_IGNORED:
            return _ignored
        if (module, name) == ("torch", "device"):
            return _device
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in ("dtype", "scalar"):
            return builtin_dtype if name == "dtype" else numeric_scalar  # built-in numeric dtypes only
        raise pickle.UnpicklingError(f"asks to load {module}.{name}")


def detect(path: Path) -> bool:
    """One step's ``global_step_N_training_input.pkl``, a ``dumped_data/`` folder, or a run folder holding one."""
    path = Path(path)
    if path.is_file():
        return FILE_RE.match(path.name) is not None
    if path.is_dir():
        folder = path if path.name == DUMP_DIR else path / DUMP_DIR
        return folder.is_dir() and any(FILE_RE.match(p.name) for p in folder.iterdir())
    return False


def _files(path: Path) -> list[tuple[int, Path]]:
    """(step, file) pairs in step order."""
    if path.is_file():
        m = FILE_RE.match(path.name)
        if m is None:
            raise InputError(
                f"'{path}' is not a SkyRL dump file (global_step_N_training_input.pkl)",
                "pass the run's export folder, its dumped_data/ folder, or one global_step_N_training_input.pkl",
            )
        return [(int(m.group(1)), path)]
    if not path.is_dir():
        raise InputError(f"SkyRL dump '{path}' does not exist", "pass the run's trainer.export_path folder")
    folder = path if path.name == DUMP_DIR else path / DUMP_DIR
    found = []
    if folder.is_dir():
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := FILE_RE.match(p.name)) and p.is_file()]
    if not found:
        raise InputError(
            f"'{path}' holds no SkyRL dump ({DUMP_DIR}/global_step_N_training_input.pkl)",
            "run SkyRL with trainer.dump_data_batch=true and pass its trainer.export_path folder",
        )
    return sorted(found)


def _load(file: Path, allow_pickle: bool) -> dict[str, Any]:
    """The pickled batch's state, read with the restricted unpickler."""
    if not allow_pickle:
        raise UsageError(
            f"'{file}' is a pickle ({FRAMEWORK}'s dump), which can run code when loaded",
            "pass --allow-pickle if you trust this run's files (they are then read with a restricted unpickler)",
        )
    try:
        with open(file, "rb") as f:
            obj = _Unpickler(f).load()
    except OSError as e:
        raise InputError(f"cannot read '{file}': {e.strerror or e}", "check the file's permissions") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("asks to load "):
            raise InputError(
                f"'{file}' {e}, which a SkyRL dump never holds; nothing was run",
                "read only SkyRL's own global_step_N_training_input.pkl files",
            ) from None
        raise InputError(f"'{file}' is damaged ({e})", "dump the step again") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as e:
        raise InputError(f"'{file}' is truncated or damaged ({type(e).__name__})", "dump the step again") from None
    state = obj.state if isinstance(obj, _Batch) else None
    if not isinstance(state, dict) or not isinstance(state.get("batch_dict"), dict):
        raise InputError(
            f"'{file}' does not hold a SkyRL TrainingInputBatch", "pass SkyRL's global_step_N_training_input.pkl"
        )
    return state


def _tensor(entry: Any, file: Path, key: str) -> np.ndarray | None:
    """One serialised tensor of ``batch_dict`` as a numpy array (bf16 as float32)."""
    if entry is None:
        return None
    if isinstance(entry, (bytes, bytearray)):  # the oldest dumps: a bare torch.save
        return _torch_load(bytes(entry), file, key)
    if not isinstance(entry, dict):
        raise InputError(f"'{file}': tensor '{key}' is not a serialised tensor", "dump the step again")
    fmt = entry.get("format", "numpy")  # SkyRL reads an entry without "format" as numpy
    if fmt not in FORMATS:
        raise InputError(
            f"'{file}': tensor '{key}' is in unknown format '{fmt}' (this reader knows {', '.join(FORMATS[:2])})",
            "dump with a SkyRL version whose TensorBatch writes numpy or torch entries, or update trm-diag",
        )
    if fmt == "torch":
        return _torch_load(entry.get("data", b""), file, key)
    if fmt == "tensor_list":
        raise InputError(f"'{file}': tensor '{key}' is a per-sample list", "only padded tensors are read")
    try:
        dtype = entry["dtype"]
        dtype = builtin_dtype(dtype if isinstance(dtype, str) else getattr(dtype, "str", None))
        return np.frombuffer(entry["data"], dtype=dtype).reshape(tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError, pickle.UnpicklingError):
        raise InputError(
            f"'{file}': tensor '{key}' is damaged (its bytes do not fill its shape and dtype)", "dump the step again"
        ) from None


def _torch_load(data: bytes, file: Path, key: str) -> np.ndarray:
    import torch

    try:
        t = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for a damaged zip or a forbidden global
        raise InputError(f"'{file}': tensor '{key}' is damaged ({type(e).__name__})", "dump the step again") from None
    if not isinstance(t, torch.Tensor):
        raise InputError(f"'{file}': tensor '{key}' is not a tensor", "dump the step again")
    return (t.float() if t.is_floating_point() and t.dtype != torch.float64 else t).numpy()


def _indices(metadata: dict[str, Any], rows: int) -> list[tuple[int, int]]:
    """(prompt_idx, sample_idx) per row: from uids (the prompt each row came from) when the dump keeps them,
    else from ``policy_prompt_boundaries`` (one (start, end) per prompt), else (row, 0)."""
    uids = metadata.get("uids")
    if isinstance(uids, list) and len(uids) >= rows and all(isinstance(u, (str, int)) for u in uids[:rows]):
        order: dict[Any, int] = {}
        seen: dict[Any, int] = {}
        out = []
        for uid in uids[:rows]:
            p = order.setdefault(uid, len(order))
            out.append((p, seen.get(uid, 0)))
            seen[uid] = seen.get(uid, 0) + 1
        return out
    bounds = metadata.get("policy_prompt_boundaries")
    if isinstance(bounds, (list, tuple)) and bounds:
        out = []
        try:
            for p, (start, end) in enumerate(bounds):
                out.extend((p, r - start) for r in range(int(start), int(end)))
        except (TypeError, ValueError):
            out = []
        if len(out) == rows and all(s >= 0 for _, s in out):
            return out
    return [(r, 0) for r in range(rows)]


def _step_rows(file: Path, step: int, state: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    batch = state["batch_dict"]
    for key in (*NEEDED, "rollout_logprobs"):
        if batch.get(key) is None:
            fix = LOGPROBS_FIX if key == "rollout_logprobs" else "dump the step again"
            raise InputError(f"'{file}' has no '{key}' tensor", fix)
    t = {k: _tensor(batch.get(k), file, k) for k in (*NEEDED, "rollout_logprobs", "action_log_probs", "advantages")}
    experts = _tensor(batch.get("rollout_expert_indices"), file, "rollout_expert_indices")
    no_route = _tensor(batch.get("router_padding_mask"), file, "router_padding_mask")
    seq, attn, resp = t["sequences"], t["attention_mask"], t["response_mask"]
    if no_route is not None and no_route.shape != seq.shape:
        raise InputError(
            f"'{file}': router_padding_mask {no_route.shape} does not fit sequences {seq.shape}", "dump the step again"
        )
    if seq.ndim != 2 or attn.shape != seq.shape or resp.ndim != 2 or resp.shape[1] > seq.shape[1]:
        raise InputError(
            f"'{file}': sequences {seq.shape}, attention_mask {attn.shape} and response_mask {resp.shape} "
            "do not fit together",
            "dump the step again",
        )
    n, width = resp.shape
    for key in ("loss_mask", "rollout_logprobs", "action_log_probs", "advantages"):
        if t[key] is not None and t[key].shape != (n, width):
            raise InputError(
                f"'{file}': '{key}' has shape {t[key].shape} but response_mask {resp.shape} (mismatched lengths)",
                "dump the step again",
            )
    if seq.shape[0] != n or (experts is not None and (experts.ndim != 4 or experts.shape[:2] != seq.shape)):
        raise InputError(f"'{file}': its tensors hold different numbers of rows or columns", "dump the step again")
    metadata = state.get("metadata") if isinstance(state.get("metadata"), dict) else {}
    pad = metadata.get("pad_size", 0)
    if not isinstance(pad, int) or not 0 <= pad < n:
        raise InputError(f"'{file}': metadata pad_size {pad!r} does not fit its {n} rows", "dump the step again")
    rows = n - pad
    offset = seq.shape[1] - width  # sequence column of response column 0
    for r, (prompt_idx, sample_idx) in enumerate(_indices(metadata, rows)):
        where = f"{file}: step {step}, sample {r}"
        cols = np.flatnonzero(resp[r])
        n_resp = len(cols)
        if n_resp and cols[-1] - cols[0] + 1 != n_resp:
            raise InputError(f"{where}: its response_mask has gaps", "dump the step again")
        pos = cols + offset
        real = np.flatnonzero(attn[r])
        prompt_pos = np.setdiff1d(real, pos, assume_unique=True)
        start = pos[0] if n_resp else (real[-1] + 1 if len(real) else 0)
        if len(real) != len(prompt_pos) + n_resp or (
            len(prompt_pos) and (prompt_pos[-1] != start - 1 or prompt_pos[-1] - prompt_pos[0] + 1 != len(prompt_pos))
        ):
            raise InputError(
                f"{where}: attention_mask and response_mask do not lay out one prompt followed by its response",
                "dump the step again",
            )
        trained = t["loss_mask"][r, cols] > 0  # 0: context inside the response (a tool's output): not scored
        row: dict[str, Any] = {
            "prompt_ids": seq[r, prompt_pos].tolist(),
            "response_ids": seq[r, pos].tolist(),
            "rollout_logprobs": t["rollout_logprobs"][r, cols].tolist(),
            "prompt_idx": prompt_idx,
            "sample_idx": sample_idx,
            "step": step,
        }
        if n_resp and trained[-1] and row["rollout_logprobs"][-1] == 0.0:
            # the EOS SkyRL appends after a stop string carries a placeholder log-prob 0.0, not the engine's:
            # kept as context, not scored (a sampled token of probability exactly 1 is lost with it, and counted)
            trained = trained.copy()
            trained[-1] = False
            row["appended_eos"] = True
        if not trained.all():
            row["loss_mask"] = trained.tolist()
        if t["action_log_probs"] is not None:
            row["train_logprobs"] = t["action_log_probs"][r, cols].tolist()
        if t["advantages"] is not None and n_resp:
            adv = t["advantages"][r, cols]
            if np.all(adv == adv[0]):  # outcome advantages (GRPO, RLOO): one value per sample
                row["advantage"] = float(adv[0])
        if experts is not None and n_resp and start >= 1:
            producing = pos - 1  # the forward whose logits gave response token t its distribution
            if no_route is None or not no_route[r, producing].any():
                row["routed_experts"] = experts[r, producing].tolist()
        yield where, row


def rows(path: Path, allow_pickle: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) per sample of every step's batch, steps in numeric order."""
    for step, file in _files(Path(path)):
        yield from _step_rows(file, step, _load(file, allow_pickle))
