"""Forward hooks that keep, at chosen token positions only, what each decoder layer computes.

Per decoder layer l: the attention output (`attn`), the MLP / MoE output (`mlp`) and the hidden state
after the layer (`layer`: the residual stream); then the final norm (`final_norm`), and MoE router
logits per layer. Only the chosen positions are copied, so memory is O(layers x hidden) per token,
not O(T x layers x hidden). Works on transformers models and on vLLM's models (whose decoder layers
return (hidden, residual), added back here) through the same module names: ``<decoder>.layers[i]``,
``.self_attn``, ``.mlp``, ``.mlp.gate``, ``<decoder>.norm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trm_diag.errors import ModelError

LAYER_COMPONENTS = ("attn", "mlp", "layer")  # per decoder layer, in the order they are computed
FINAL = ("final_norm", "logits")  # after the last layer


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _residual_sum(output: Any) -> torch.Tensor:
    """A decoder layer's hidden state: vLLM's layers return (hidden, residual) with the add fused into the
    next norm; transformers' return the residual stream itself."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], torch.Tensor):
        return output[0] + output[1]
    return _first(output)


class LayerCapture:
    """Hooks on a decoder (``.layers``, ``.norm``); ``states`` maps (layer, component) -> {position: [H]}
    and ``router`` maps layer -> {position: [E]} for the positions asked for, across forward calls
    (a prefill split into chunks is followed by a running token offset per module)."""

    def __init__(self, positions: Sequence[int], num_experts: int | None = None) -> None:
        self.positions = sorted(set(positions))
        self.num_experts = num_experts
        self.states: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        self.router: dict[int, dict[int, torch.Tensor]] = {}
        self._offset: dict[Any, int] = {}
        self._handles: list[Any] = []

    def _keep(self, key: Any, x: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
        x = x.reshape(-1, x.shape[-1])  # [1, T, H] (transformers) or [tokens, H] (vLLM)
        off = self._offset.get(key, 0)
        self._offset[key] = off + x.shape[0]
        for p in self.positions:
            if off <= p < off + x.shape[0]:
                into[p] = x[p - off].detach().to("cpu", torch.float64, copy=True)

    def _hook(self, key: tuple[int, str], pick: Any):
        def hook(module: Any, args: Any, output: Any) -> None:
            self._keep(key, pick(output), self.states.setdefault(key, {}))

        return hook

    def _router_hook(self, layer: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            logits = _first(output)
            if self.num_experts and logits.shape[-1] == self.num_experts:
                self._keep(("router", layer), logits, self.router.setdefault(layer, {}))

        return hook

    def install(self, decoder: Any) -> int:
        """Hook the decoder's layers and final norm; returns the number of decoder layers."""
        layers = getattr(decoder, "layers", None)
        norm = getattr(decoder, "norm", None)
        if layers is None or norm is None:
            raise ModelError(
                f"{type(decoder).__name__} has no .layers and .norm to hook", "locate supports Llama-style decoders"
            )
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._hook((i, "layer"), _residual_sum)))
            for comp, name in (("attn", "self_attn"), ("mlp", "mlp")):
                sub = getattr(layer, name, None)
                if sub is not None:
                    self._handles.append(sub.register_forward_hook(self._hook((i, comp), _first)))
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and self.num_experts:
                self._handles.append(gate.register_forward_hook(self._router_hook(i)))
        self._handles.append(norm.register_forward_hook(self._hook((len(layers), "final_norm"), _first)))
        return len(layers)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
