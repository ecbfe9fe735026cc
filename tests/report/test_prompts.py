"""Prompt files to token ids (trm_diag/report/prompts.py): PromptIds packs what encode_prompt gives."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trm_diag.errors import InputError
from trm_diag.report.prompts import Prompt, PromptIds, encode_prompt, load_prompts


def test_packed_ids_equal_the_encoded_prompts(dense_model, prompts_file):
    tok = AutoTokenizer.from_pretrained(dense_model)
    prompts = load_prompts(prompts_file)
    packed = PromptIds(prompts, tok)
    want = [encode_prompt(p, tok) for p in prompts]
    assert len(packed) == len(prompts) and packed[0 : len(prompts)] == want
    assert packed[3:7] == want[3:7] and packed[5:5] == [] and packed[len(prompts) - 2 : len(prompts) + 9] == want[-2:]
    assert packed.flat.dtype.name == "int32" and packed.flat.nbytes == 4 * sum(map(len, want))


def test_a_prompt_that_encodes_to_nothing_is_named(dense_model):
    tok = AutoTokenizer.from_pretrained(dense_model)
    with pytest.raises(InputError, match="prompt 1 encodes to zero tokens"):
        PromptIds([Prompt(text="2+2="), Prompt(text="")], tok)


@pytest.mark.parametrize(
    "name,body", [("p.jsonl", '{"prompt": "2+2="}\n{"prompt": "3+3="}\n'), ("p.txt", "2+2=\n3+3=\n")]
)
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, name, body):
    """Files saved by Windows editors start with a UTF-8 BOM: read past, not refused or kept in the text."""
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_prompts(f) == [Prompt(text="2+2="), Prompt(text="3+3=")]


def test_a_number_beyond_json_limits_is_a_one_line_error_with_its_line(tmp_path):
    """json refuses integers of over 4,300 digits with a plain ValueError, not a JSONDecodeError."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "n": 1' + "0" * 5000 + "}\n")
    with pytest.raises(InputError, match=r"p\.jsonl:2: not valid JSON \(Exceeds the limit"):
        load_prompts(str(f))
