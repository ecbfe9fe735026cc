"""`trm-diag locate`'s words for a pair of checkpoints that differ in one layer: the layers before it agree to the
bit (or to float32 rounding), so the entry's growth is measured against the 1e-6 floor, not against a layer."""

from __future__ import annotations

import pytest

from trm_diag.run.locate import token_verdict


def _rows(layer_errors, mlp_at=None):
    rows = []
    for i, e in enumerate(layer_errors):
        rows.append({"layer": i, "component": "layer", "rel_err": e, "expert_flip": 0.0})
        rows.append({"layer": i, "component": "attn", "rel_err": 0.0 if i == mlp_at else e, "expert_flip": 0.0})
        rows.append({"layer": i, "component": "mlp", "rel_err": e, "expert_flip": 0.0})
    return rows


@pytest.mark.parametrize(
    ("errors", "words"),
    [([0.0, 0.0, 0.018, 0.0128], "the layers before are bit-equal"),
     ([4e-7, 6e-7, 0.018, 0.0128], "the layers before are below 1e-06, float32 rounding")],
)  # fmt: skip
def test_an_entry_after_agreeing_layers_names_no_growth_over_a_layer(errors, words):
    """A checkpoint pair differing only in layer 2's MLP read 'error 0.018, 1.8e+04x the layer before', while the
    layers before were bit-equal: the factor was 0.018 over the floor, not over any measured error."""
    text = token_verdict(_rows(errors, mlp_at=2))["text"]
    assert text.startswith("enters at layer 2, MLP (error 0.018; ") and words in text
    assert "the layer before" not in text


def test_an_entry_after_a_measured_error_keeps_its_growth():
    text = token_verdict(_rows([2e-6, 5e-6, 0.05, 0.05]))["text"]
    assert text.startswith("enters at layer 2, ") and "(error 0.05, 1e+04x the layer before)" in text
