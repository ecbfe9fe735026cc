"""Checks on a local checkpoint folder before any engine touches it (safe loading).

Reads only config.json and file names: no torch, no transformers. Safetensors only,
unless the user passes --allow-pickle; no remote code unless --trust-remote-code.
"""

from __future__ import annotations

import json
from pathlib import Path

from trm_diag.errors import ModelError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict, with clear errors for bad folders."""
    p = Path(path)
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


def check_safetensors(files: list[Path]) -> None:
    """Each file's header parses and its tensors fit in the file: catches truncated or partial
    downloads in milliseconds (headers only), before an engine fails on them with a vaguer error."""
    fix = "re-download the checkpoint (the file is truncated or damaged)"
    for f in files:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                raise ModelError(f"'{f}' is not a complete safetensors file (bad header)", fix)
            try:
                header = json.loads(fh.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise ModelError(f"'{f}' is not a complete safetensors file (unreadable header)", fix) from None
        if 8 + n + end > size:
            raise ModelError(f"'{f}' is truncated: {size:,} bytes, its header needs {8 + n + end:,}", fix)


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
        check_safetensors(safetensors)
    if "auto_map" in cfg and not trust_remote_code:
        from trm_diag.checkpoint_types import is_builtin_model_type

        if not is_builtin_model_type(cfg.get("model_type", "")):
            raise ModelError(
                f"'{path}' needs custom model code (config.json has auto_map)",
                "pass --trust-remote-code if you trust this checkpoint's code",
            )
    return cfg


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
