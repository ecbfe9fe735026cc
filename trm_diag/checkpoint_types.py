"""Whether a model_type is built into the installed transformers (imported only when needed)."""

from __future__ import annotations


def is_builtin_model_type(model_type: str) -> bool:
    """True when transformers ships code for ``model_type`` (so auto_map can be ignored)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING_NAMES
