"""Whether a model_type is built into the installed transformers (imported only when needed)."""

from __future__ import annotations


def is_builtin_model_type(model_type: str) -> bool:
    """True when transformers ships code for ``model_type`` (so auto_map can be ignored)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING_NAMES


def is_builtin_tokenizer_class(name: object) -> bool:
    """True when transformers ships the tokenizer class ``name`` (so a tokenizer auto_map can be ignored)."""
    if not isinstance(name, str) or not name:
        return False
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    except ImportError:
        return False
    try:
        return (
            tokenizer_class_from_name(name.removesuffix("Fast")) is not None
            or tokenizer_class_from_name(name) is not None
        )
    except Exception:  # an unknown name may raise inside the lookup
        return False
