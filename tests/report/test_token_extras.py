"""Per-token extras of a rollout row (trainer log-probs, kept sets, routed experts, loss mask): each malformed
one is a one-line error naming the row and the fix; well-formed ones come back as arrays."""

from __future__ import annotations

import numpy as np
import pytest

from trm_diag.errors import InputError
from trm_diag.report.token_extras import cut_extras, token_extras

RESP = [5, 7, 9]


def _err(row: dict, needle: str, vocab: int | None = 100) -> None:
    with pytest.raises(InputError) as e:
        token_extras(row, RESP, "f.jsonl:3", vocab)
    msg = str(e.value)
    assert needle in msg and msg.startswith("f.jsonl:3") and "Fix:" in msg and "\n" not in msg, msg


def test_well_formed_extras():
    got = token_extras(
        {"train_logprobs": [-0.1, -2.0, float("nan")], "kept_ids": [[5, 1, 5], [7], [9, 99]],
         "routed_experts": [[[0, 1]], [[2, 3]], [[1, 0]]], "loss_mask": [1, 1, 1]},
        RESP, "w", 100,
    )  # fmt: skip
    assert got["train_logprobs"][:2] == [-0.1, -2.0] and np.isnan(got["train_logprobs"][2])
    assert [a.tolist() for a in got["kept_ids"]] == [[1, 5], [7], [9, 99]]  # sorted, unique
    assert got["routed_experts"].shape == (3, 1, 2) and "loss_mask" not in got  # all ones: no mask kept
    masked = token_extras({"loss_mask": [1, 0, 1], "kept_ids": [[5], [], [9]]}, RESP, "w", None)
    assert masked["loss_mask"].tolist() == [True, False, True] and masked["kept_ids"][1].size == 0
    cut_extras(masked, 1)
    assert "loss_mask" not in masked and len(masked["kept_ids"]) == 1


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"train_logprobs": [-0.1, -0.2]}, "3 response tokens but 2 'train_logprobs' entries"),
        ({"train_logprobs": [-0.1, 0.5, -0.2]}, "invalid train log-prob 0.5"),
        ({"train_logprobs": [-0.1, "x", -0.2]}, "'train_logprobs' must be a list of numbers"),
        ({"kept_ids": [[5], [8], [9]]}, "response token 1 (id 7) is not in its own kept set"),
        ({"kept_ids": [[5], [], [9]]}, "kept_ids of response token 1 is not a non-empty list"),
        ({"kept_ids": [[5], [7, 100], [9]]}, "hold id 100, outside the vocabulary"),
        ({"routed_experts": [[0, 1], [2, 3], [1, 0]]}, "shape [3 response tokens, layers, k], not shape [3, 2]"),
        ({"routed_experts": [[[0, 1]], [[2, -3]], [[1, 0]]]}, "must be non-negative integer expert ids"),
        ({"routed_experts": [[[0, 1]], [[2, 2**70]], [[1, 0]]]}, "not values of type object"),
        ({"kept_ids": [[5], [7, 2**70], [9]]}, "hold id 1180591620717411303424, outside the vocabulary"),
        ({"kept_ids": [[5], [7, True], [9]]}, "kept_ids of response token 1 is not a non-empty list"),
        ({"loss_mask": [1, 2, 1]}, "'loss_mask' must hold 0 or 1"),
    ],
)
def test_malformed_extras_are_one_line_errors(row, needle):
    _err(row, needle)
