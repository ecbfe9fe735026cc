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
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {cfg_file}: {e}", "repair or re-download the checkpoint") from None


def check_checkpoint(path: str | Path, *, trust_remote_code: bool, allow_pickle: bool) -> dict:
    """Validate a checkpoint folder; returns its config. Raises ModelError on unsafe or broken input."""
    cfg = read_config(path)
    p = Path(path)
    has_safetensors = any(p.glob("*.safetensors"))
    has_pickle = any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir())
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelError(
                f"'{path}' holds only pickle weights (.bin/.pt), which can run code when loaded",
                "convert them to safetensors, or pass --allow-pickle if you trust the checkpoint",
            )
        if not has_pickle:
            raise ModelError(f"'{path}' holds no weight files", "check that the download finished")
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
    if "vocab_size" in cfg:
        return int(cfg["vocab_size"])
    text = cfg.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text:
        return int(text["vocab_size"])
    return None


def spec_checkpoint(spec, *, trust_remote_code: bool, allow_pickle: bool) -> tuple[str, dict]:
    """The model path of a backend spec, validated (safe loading); raises for a missing model."""
    if not spec.model:
        raise UsageError(f"no model given for the {spec.name} backend", "pass --model PATH or model=PATH in the spec")
    return spec.model, check_checkpoint(spec.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
