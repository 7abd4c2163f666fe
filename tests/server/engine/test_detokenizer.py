"""Incremental detokenization and stop strings, with the default model's tokenizer."""

from __future__ import annotations

import pytest

from quantserve.server.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello there, café 你好 world! Ünïcödé and emoji 🙂 too.",
    "def f(x):\n    return x  # two  spaces\n\n",
    "  leading spaces and\ttabs",
]


@pytest.fixture(scope="module")
def tokenizer(smollm_folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm_folder)


def stream(tok, text, prompt="User: hi\nAssistant:", stop=(), finish_at_end=True):
    ids = tok.encode(text, add_special_tokens=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids, tuple(stop))
    pieces = []
    stopped = False
    for i, t in enumerate(ids):
        piece, stopped = detok.update([t], finish_at_end and i == len(ids) - 1)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_decoding_the_whole(tokenizer, text):
    pieces, stopped = stream(tokenizer, text)
    expected = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    assert "".join(pieces) == expected and not stopped
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_token_boundaries_is_not_emitted(tokenizer):
    text = "The answer is forty-two. END OF STORY and more"
    pieces, stopped = stream(tokenizer, text, stop=("END OF",))
    assert stopped
    assert "".join(pieces) == "The answer is forty-two. "
    # nothing that is part of the stop string ever went out, even before it was complete
    assert not any("END" in p for p in pieces)


def test_earliest_of_several_stop_strings_wins(tokenizer):
    pieces, stopped = stream(tokenizer, "one two three four", stop=("four", "two"))
    assert stopped and "".join(pieces) == "one "


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    # "EN" could start "END" until the text goes elsewhere; at the end everything comes out.
    pieces, stopped = stream(tokenizer, "It is EN", stop=("END",))
    assert not stopped and "".join(pieces) == "It is EN"
    pieces, _ = stream(tokenizer, "It is EN", stop=("END",), finish_at_end=False)
    assert "".join(pieces) == "It is "  # still held: it may yet become END


def test_special_tokens_are_not_text(tokenizer):
    eos = tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    a, _ = detok.update(tokenizer.encode("Hi", add_special_tokens=False), False)
    b, _ = detok.update([eos], True)
    assert a == "Hi" and b == ""
