"""Budget-aware closing: the tokens that finish a constrained output from where its matcher stands,
so that an answer whose max_tokens run out still parses.

The sampler asks, for a constrained sequence near its budget, for a closing plan: a short token
sequence that takes the matcher to an accepting state. When the plan needs every token the
budget has left, the sequence is forced along it (one allowed token per step) and its last
budgeted token completes the structure; finish_reason stays "length".

The plan is found greedily from the matcher itself, so it knows the grammar (required keys, enums,
patterns, minItems) without a grammar-specific model of it:
  1. the grammar's forced tokens (llguidance's fast-forward: a required key's name, ": ", ...);
  2. else the first of a few closing tokens the grammar allows, in an order that depends on
     whether the output is inside free text (a JSON string): there '"' first; elsewhere '}' and
     ']' first, then the shortest values ('0', '""', 'null'), then ',' (required keys remain);
  3. else the lowest-id allowed token (single characters have the lowest ids in BPE
     vocabularies), e.g. the letters a pattern still needs.
It is not always the shortest completion (greedy, one token of look-ahead), only a short one; it
never loops past `limit`. The matcher is rolled back: it is left as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

# The closing tokens' texts, by where the output is (the ids come from the model's tokenizer).
IN_TEXT = ('"',)
OUTSIDE_TEXT = ("}", "]", "0", '"', "null", ",", ", ")
PROBE = "a"  # a letter: allowed inside a JSON string, never where a JSON value or key starts


@dataclasses.dataclass(frozen=True)
class ClosingTokens:
    """The closing tokens of one tokenizer (ids of the texts that are single tokens)."""

    in_text: tuple[int, ...]
    outside_text: tuple[int, ...]
    probe: Optional[int]

    @classmethod
    def from_tokenizer(cls, encode: Any) -> "ClosingTokens":
        """encode(text) -> token ids (without special tokens)."""
        def single(texts: Sequence[str]) -> tuple[int, ...]:
            ids = []
            for text in texts:
                tokens = encode(text)
                if len(tokens) == 1 and tokens[0] not in ids:
                    ids.append(tokens[0])
            return tuple(ids)

        probe = single((PROBE,))
        return cls(single(IN_TEXT), single(OUTSIDE_TEXT), probe[0] if probe else None)


def _try(matcher: Any, token: int) -> bool:
    return matcher.try_consume_tokens([token]) == 1


def _first_allowed(matcher: Any) -> Optional[int]:
    mask = matcher.compute_bitmask()
    for i, byte in enumerate(mask):
        if byte:
            return i * 8 + (byte & -byte).bit_length() - 1
    return None


def closing_plan(matcher: Any, tokens: ClosingTokens, limit: int) -> Optional[list[int]]:
    """Token ids that bring `matcher` to an accepting state (end of the grammar), at most `limit`
    of them; [] if it is accepting already, None if none found within `limit`. The matcher is
    left as it was."""
    plan: list[int] = []
    try:
        while not matcher.is_accepting():
            if len(plan) >= limit or matcher.is_error():
                return None
            forced = matcher.compute_ff_tokens()[:limit - len(plan)]
            if forced:
                taken = matcher.try_consume_tokens(forced)
                if taken:
                    plan += forced[:taken]
                    continue
            in_text = tokens.probe is not None and _try(matcher, tokens.probe)
            if in_text:
                matcher.rollback(1)
            for token in tokens.in_text if in_text else tokens.outside_text:
                if _try(matcher, token):
                    plan.append(token)
                    break
            else:
                token = _first_allowed(matcher)
                if token is None or not _try(matcher, token):
                    return None
                plan.append(token)
        return plan
    finally:
        if plan:
            matcher.rollback(len(plan))
