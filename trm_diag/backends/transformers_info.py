"""What the installed transformers knows about a checkpoint: built-in model types and tokenizers, and
the parameters a config builds (transformers is imported only when needed)."""

from __future__ import annotations

import re


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


def parameters_outside_layers(cfg: dict, layer_key: re.Pattern) -> set[str] | None:
    """Names of the parameters outside the decoder layers of the model the config builds (tied output
    embeddings left out), from a weightless model on the meta device; None when it cannot be built."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build from config alone: layers checked only
        return None
    tied = set()
    text = config.get_text_config()
    if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if head is not None and p is head.weight}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n for n in params - tied if not layer_key.match(n)}
