"""Incremental detokenization and stop strings, per sequence (pure Python).

Text is decoded over a sliding window of tokens (as TGI and vLLM do): a new token's text is
what decoding the window with it adds to decoding the window without it, so tokenizers whose
tokens carry a leading space, or whose characters span several byte tokens, come out right;
nothing is emitted while the text ends in an incomplete UTF-8 character.

Stop strings may span token boundaries. Text that could be the beginning of a stop string is
held back until it is known not to be one, and a stop string is never emitted (nor anything
after it).
"""

from __future__ import annotations

from typing import Any, Optional

# Prompt tokens kept as context for the first output tokens' leading spaces.
_PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.tokens = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
        self.text = ""  # decoded output text (stop string excluded once found)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self, token_ids: list[int]) -> str:
        new_text = []
        for token in token_ids:
            self.tokens.append(token)
            prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new_text.append(full[len(prefix) :])
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.tokens)
        return "".join(new_text)

    def update(self, token_ids: list[int], finished: bool) -> tuple[str, bool]:
        """Decode newly sampled tokens. Returns (text to emit now, whether a stop string was hit).

        finished: the sequence ends with these tokens (for another reason): flush what was held.
        """
        if self.stopped:
            return "", True
        checked_from = max(0, len(self.text) - self.hold)
        self.text += self._decode_new(token_ids)
        if self.stop:
            hit = self._find_stop(checked_from)
            if hit is not None:
                self.text = self.text[:hit]
                self.stopped = True
                finished = True
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, self.stopped

    def _find_stop(self, start: int) -> Optional[int]:
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best):
                best = i
        return best
