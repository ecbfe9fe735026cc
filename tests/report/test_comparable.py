"""Whether a row's prompt_ids are its prompt text's (report/comparable.py), with the bundled model's real tokenizer:
plain tokenisation, the chat template around a raw user message, a template with earlier turns, and ids that are
another text's or another tokenizer's."""

from __future__ import annotations

import pytest

from trm_diag.report.comparable import NotComparable, check_prompt_ids, prompt_ids_mismatch


@pytest.fixture(scope="module")
def tok(dense_model):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(dense_model)
    assert t.chat_template  # the bundled model has one: the chat cases below need it
    return t


def _chat(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_plain_tokenisation_with_or_without_special_tokens_agrees(tok):
    text = "Q: What is 436+760?\nA:"
    assert prompt_ids_mismatch(tok(text)["input_ids"], text, tok) is None
    assert prompt_ids_mismatch(tok(text, add_special_tokens=False)["input_ids"], text, tok) is None


def test_chat_templated_ids_of_a_raw_user_message_agree(tok):
    text = "What is 2+2?"
    ids = _chat(tok, [{"role": "user", "content": text}])
    assert ids != tok(text)["input_ids"]  # the template really adds tokens: not the plain form
    assert prompt_ids_mismatch(ids, text, tok) is None


def test_a_template_with_earlier_turns_agrees_when_the_ids_decode_to_the_text(tok):
    text = "And 3+3?"
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids = _chat(tok, [*msgs, {"role": "user", "content": text}])
    assert prompt_ids_mismatch(ids, text, tok) is None


def test_ids_of_another_text_or_another_tokenizer_are_refused(tok):
    text = "What is 2+2?"
    other = tok("What is 5+7?")["input_ids"]
    why = prompt_ids_mismatch(other, text, tok)
    assert why is not None and "position" in why
    shifted = [i + 1 for i in _chat(tok, [{"role": "user", "content": text}])]  # another vocabulary's numbering
    assert prompt_ids_mismatch(shifted, text, tok) is not None
    longer = tok(text + " and more")["input_ids"]
    assert prompt_ids_mismatch(tok(text)["input_ids"], text + " and more", tok) is not None
    assert prompt_ids_mismatch(longer, text + " and more", tok) is None
    with pytest.raises(NotComparable, match=r"NOT COMPARABLE: f\.jsonl:3: .*not the prompt's"):
        check_prompt_ids(other, text, tok, "f.jsonl:3")


def test_a_short_text_inside_another_prompt_is_refused(tok):
    """The text must be the prompt's last user message, not any part of it: "4" or "2+2" found inside another
    prompt's ids, and a blank text, are refused."""
    ids = _chat(tok, [{"role": "user", "content": "What is 2+2? Answer with 4 digits"}])
    assert prompt_ids_mismatch(ids, "4", tok) is not None
    assert prompt_ids_mismatch(ids, "2+2", tok) is not None
    assert prompt_ids_mismatch(_chat(tok, [{"role": "user", "content": "Solve 2+2 and 3+3"}]), "2+2", tok)
    assert prompt_ids_mismatch(ids, "   ", tok) is not None
    assert prompt_ids_mismatch(ids, "What is 2+2? Answer with 4 digits", tok) is None
