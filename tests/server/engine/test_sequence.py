"""SamplingParams validation (pure Python)."""

from __future__ import annotations

import dataclasses

import pytest

from quantserve.server.engine.sequence import SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", -1), ("temperature", -0.1),
        ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5),
        ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("seed", -1),
        ("seed", 2**63), ("stop", ("",)), ("stop", (1,)), ("stop_token_ids", (-1,)), ("ignore_eos", 1),
        ("logprobs", -1), ("logprobs", 21), ("stop", tuple("abcdefghijklmnopq")),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_defaults_and_normalisation():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().n = 2  # frozen
