"""Checks on a local checkpoint folder before any engine touches it (safe loading).

Reads only config.json and file names: no torch, no transformers. Safetensors only,
unless the user passes --allow-pickle; no remote code unless --trust-remote-code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from trm_diag.errors import ModelError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict, with clear errors for bad folders."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ModelError(
            f"model path '{path}' is a broken symlink or a symlink loop", "point --model at the real folder"
        )
    if not p.exists():
        raise ModelError(f"model path '{path}' does not exist", "pass --model with a local checkpoint folder")
    if not p.is_dir():
        raise ModelError(f"model path '{path}' is not a folder", "pass the folder that holds config.json")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"'{path}' has no config.json", "point --model at a transformers checkpoint folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {cfg_file}: {e}", "repair or re-download the checkpoint") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_file} is not a JSON object", "repair or re-download the checkpoint")
    return cfg


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip


def check_safetensors(files: list[Path]) -> set[str]:
    """Each file's header parses, each tensor's shape matches its byte range, and the tensors fit in the
    file: catches truncated or partial downloads in milliseconds (headers only). Returns the tensor names."""
    fix = "re-download the checkpoint (the file is truncated or damaged)"
    names: set[str] = set()
    for f in files:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                raise ModelError(f"'{f}' is not a complete safetensors file (bad header)", fix)
            try:
                header = json.loads(fh.read(n))
                tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                end = 0
                for k, v in tensors.items():
                    begin, stop = (int(x) for x in v["data_offsets"])
                    count = math.prod(int(d) for d in v["shape"])
                    width = DTYPE_BYTES.get(v["dtype"])
                    if any(int(d) < 0 for d in v["shape"]) or (width and count * width != stop - begin) or begin > stop:
                        raise ModelError(f"'{f}': tensor '{k}' has shape {v['shape']} but {stop - begin:,} bytes", fix)
                    end = max(end, stop)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise ModelError(f"'{f}' is not a complete safetensors file (unreadable header)", fix) from None
        if 8 + n + end > size:
            raise ModelError(f"'{f}' is truncated: {size:,} bytes, its header needs {8 + n + end:,}", fix)
        names.update(tensors)
    return names


LAYER_KEY = re.compile(r"^(?P<stack>.*?\.layers)\.(?P<i>\d+)\.(?P<rest>.+)$")


def check_weight_names(path: Path, cfg: dict, names: set[str]) -> None:
    """The checkpoint holds every tensor the config's model needs, and no layer it does not: an engine
    would otherwise initialise the missing ones at random (or leave them uninitialised) and score noise.

    From the headers alone: the layer indices must be 0 .. num_hidden_layers - 1, and no layer may
    lack a tensor that another layer of the same kind has (dense and MoE layers differ, so only a
    layer whose tensors are a strict subset of another's is incomplete). Tensors outside the layers are
    compared with the model transformers builds from the config on the meta device (no weights).
    """
    fix = "re-download or re-export the checkpoint, or fix num_hidden_layers in config.json"
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n_layers = text.get("num_hidden_layers")
    layers: dict[int, set[str]] = {}
    for name in names:
        m = LAYER_KEY.match(name)
        if m:
            layers.setdefault(int(m["i"]), set()).add(m["rest"])
    if isinstance(n_layers, int) and layers:
        missing = sorted(set(range(n_layers)) - set(layers))
        if missing:
            raise ModelError(
                f"'{path}': config.json names {n_layers} layers but the weights hold no tensors for layer(s) "
                f"{', '.join(map(str, missing[:8]))}", fix,
            )  # fmt: skip
        extra = sorted(set(layers) - set(range(n_layers)))
        if extra:
            raise ModelError(
                f"'{path}': the weights hold layer(s) {', '.join(map(str, extra[:8]))} beyond the "
                f"{n_layers} layers config.json names (unexpected tensors)", fix,
            )  # fmt: skip
    for i, own in sorted(layers.items()):
        fuller = next((other for j, other in sorted(layers.items()) if own < other), None)
        if fuller is not None:
            lost = sorted(fuller - own)
            raise ModelError(
                f"'{path}': layer {i} lacks {len(lost)} tensor(s) the other layers have, e.g. "
                f"'layers.{i}.{lost[0]}'", "re-download or re-export the checkpoint",
            )  # fmt: skip
    outside = {n for n in names if not LAYER_KEY.match(n)}
    from trm_diag.backends.transformers_info import parameters_outside_layers

    expected = parameters_outside_layers(cfg, LAYER_KEY)
    if expected is not None:
        lost = sorted(expected - outside)
        if lost:
            raise ModelError(f"'{path}' lacks the tensor(s) {', '.join(lost[:4])}", "re-download the checkpoint")


def _check_index(p: Path) -> None:
    """Every shard a sharded checkpoint's index names is present."""
    index = p / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise ModelError(f"cannot read {index}", "repair or re-download the checkpoint") from None
    missing = sorted(str(s) for s in shards if not (p / str(s)).is_file())
    if missing:
        raise ModelError(
            f"'{p}' lacks {len(missing)} weight shard(s) its index names, e.g. {missing[0]}",
            "check that the download finished",
        )


def check_checkpoint(path: str | Path, *, trust_remote_code: bool, allow_pickle: bool) -> dict:
    """Validate a checkpoint folder; returns its config. Raises ModelError on unsafe or broken input."""
    cfg = read_config(path)
    p = Path(path)
    safetensors = sorted(p.glob("*.safetensors"))
    has_safetensors = bool(safetensors)
    has_pickle = any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir())
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelError(
                f"'{path}' holds only pickle weights (.bin/.pt), which can run code when loaded",
                "convert them to safetensors, or pass --allow-pickle if you trust the checkpoint",
            )
        if not has_pickle:
            raise ModelError(f"'{path}' holds no weight files", "check that the download finished")
    else:
        _check_index(p)
        check_weight_names(p, cfg, check_safetensors(safetensors))
    if "auto_map" in cfg and not trust_remote_code:
        from trm_diag.backends.transformers_info import is_builtin_model_type

        if not is_builtin_model_type(cfg.get("model_type", "")):
            raise ModelError(
                f"'{path}' needs custom model code (config.json has auto_map)",
                "pass --trust-remote-code if you trust this checkpoint's code",
            )
    _check_tokenizer_code(p, trust_remote_code)
    return cfg


def _check_tokenizer_code(p: Path, trust_remote_code: bool) -> None:
    """A tokenizer whose auto_map names code shipped with the checkpoint needs --trust-remote-code
    (unless its tokenizer_class is one transformers has: then transformers ignores the auto_map)."""
    f = p / "tokenizer_config.json"
    if trust_remote_code or not f.is_file():
        return
    try:
        tc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ModelError(f"cannot read {f}", "repair or re-download the checkpoint") from None
    if not isinstance(tc, dict) or not tc.get("auto_map"):
        return
    from trm_diag.backends.transformers_info import is_builtin_tokenizer_class

    if not is_builtin_tokenizer_class(tc.get("tokenizer_class")):
        raise ModelError(
            f"'{p}' ships its own tokenizer code (tokenizer_config.json has auto_map)",
            "pass --trust-remote-code if you trust this checkpoint's code",
        )


def eos_token_ids(path: str | Path, tokenizer: Any = None) -> frozenset[int]:
    """Every end-of-sequence id the checkpoint names: config.json (and text_config),
    generation_config.json and the tokenizer's eos_token_id."""
    found: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int) and not isinstance(v, bool):
            found.add(v)
        elif isinstance(v, list):
            found.update(x for x in v if isinstance(x, int) and not isinstance(x, bool))

    cfg = read_config(path)
    for d in (cfg, cfg.get("text_config")):
        if isinstance(d, dict):
            add(d.get("eos_token_id"))
    gen = Path(path) / "generation_config.json"
    try:
        g = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        g = {}
    if isinstance(g, dict):
        add(g.get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(found)


def max_positions(cfg: dict) -> int | None:
    """max_position_embeddings of a config dict (text_config for multimodal models), if it names one."""
    for d in (cfg, cfg.get("text_config")):
        if isinstance(d, dict) and isinstance(d.get("max_position_embeddings"), int):
            return int(d["max_position_embeddings"])
    return None


def vocab_size(cfg: dict) -> int | None:
    """vocab_size of a config dict, looking into text_config for multimodal models."""
    for d in (cfg, cfg.get("text_config")):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
            return int(d["vocab_size"])
    return None


def spec_checkpoint(spec, *, trust_remote_code: bool, allow_pickle: bool) -> tuple[str, dict]:
    """The model path of a backend spec, validated (safe loading); raises for a missing model."""
    if not spec.model:
        raise UsageError(f"no model given for the {spec.name} backend", "pass --model PATH or model=PATH in the spec")
    return spec.model, check_checkpoint(spec.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
