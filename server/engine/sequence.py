"""SamplingParams (validated once) and Sequence, the engine's unit of work (pure Python, no torch).

A request with n choices becomes n Sequences sharing the request id (index 0..n-1); prefix
caching makes the choices share the prompt's KV blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from typing import Any, Optional

from .errors import InvalidRequestError
from .grammar import StructuredOutput

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# Each step scans a sequence's new text against every stop string and holds back as many
# characters as the longest is long: a cap keeps that work and memory bounded per request.
MAX_STOP_STRING_CHARS = 256


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the client, or the engine failed it

    def __str__(self) -> str:
        return self.value


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise InvalidRequestError(f"{field} must be {rule}, got {value!r}", field)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ValueError naming the field.

    temperature 0 is greedy decoding. top_k 0 and top_p 1 are off. Penalties follow the usual
    conventions: repetition_penalty (HF / CTRL) divides positive logits of tokens seen in the
    prompt or output (multiplies negative ones); presence_penalty and frequency_penalty (OpenAI)
    subtract from logits of tokens seen in the output. A seed makes the request's samples depend
    only on the seed, whatever else shares the batch. logprobs=k returns the chosen token's
    logprob and the k most likely alternatives (from the model's raw distribution, before
    penalties and temperature). logit_bias adds (token id, bias in [-100, 100]) to the logits
    (OpenAI); min_tokens keeps EOS and stop_token_ids out until that many tokens were generated;
    structured constrains the output to a grammar (a JSON schema, regex, ...): its EOS can only
    come when the grammar is complete, so stop strings, stop_token_ids and ignore_eos, which
    would end or extend it elsewhere, are refused with it.
    """

    n: int = 1
    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    structured: Optional[StructuredOutput] = None

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               "an integer >= 1 or None", self.max_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "> 0",
               self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
               "an integer in [0, 2**63) or None", self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check(isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop), "stop",
               "a sequence of non-empty strings", self.stop)
        _check(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings", len(stop))
        longest = max((len(s) for s in stop), default=0)
        _check(longest <= MAX_STOP_STRING_CHARS, "stop", f"at most {MAX_STOP_STRING_CHARS} characters per string",
               longest)
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        _check(isinstance(ids, (tuple, list)) and all(_is_int(t) and t >= 0 for t in ids), "stop_token_ids",
               "a sequence of token ids >= 0", ids)
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
               f"an integer in [0, {MAX_LOGPROBS}] or None", self.logprobs)
        self._check_constraints()

    def _check_constraints(self) -> None:
        bias = self.logit_bias
        bias = tuple(bias.items()) if isinstance(bias, dict) else bias
        _check(isinstance(bias, (tuple, list)) and all(
            isinstance(e, (tuple, list)) and len(e) == 2 and _is_int(e[0]) and e[0] >= 0 and _is_number(e[1])
            and -100 <= e[1] <= 100 for e in bias), "logit_bias", "token ids >= 0 with biases in [-100, 100]", bias)
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"at most max_tokens ({self.max_tokens})", self.min_tokens)
        spec = self.structured
        _check(spec is None or isinstance(spec, StructuredOutput), "structured", "a StructuredOutput or None", spec)
        if spec is not None:
            for name, value in (("stop", self.stop), ("stop_token_ids", self.stop_token_ids),
                                ("ignore_eos", self.ignore_eos)):
                if value:
                    raise InvalidRequestError(
                        f"{name} cannot be combined with {spec.field}: the grammar decides where the output ends",
                        name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


_seq_counter = itertools.count()


class Sequence:
    """One choice of one request: its tokens (prompt, then output), KV blocks and progress.

    `num_computed_tokens` counts tokens whose KV is in the cache; the scheduler gives each step
    the tokens from there on, and the sampled token is appended when a step reaches the end.
    """

    __slots__ = (
        "seq_id", "request_id", "index", "params", "token_ids", "num_prompt_tokens", "num_computed_tokens",
        "num_cached_tokens", "block_table", "block_hashes", "status", "finish_reason", "max_tokens",
        "eos_token_ids", "stop_token_ids", "arrival", "lora", "lora_id", "client", "priority", "admitted",
        "spec_token_ids", "spec_probs",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        max_model_len: Optional[int] = None,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival: float = 0.0,
        lora: Any = None,
        client: str = "",
        priority: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must have at least one token")
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache when first scheduled
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of this sequence's full blocks, in order
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[FinishReason] = None
        # The most output tokens: max_tokens, and what the context length leaves.
        limit = math.inf if max_model_len is None else max_model_len - self.num_prompt_tokens
        self.max_tokens = int(min(limit, params.max_tokens if params.max_tokens is not None else math.inf))
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.arrival = arrival
        # The LoRA adapter it runs with (engine/lora.py; None: the base) and its unique id (0: the
        # base), which the scheduler counts and the prefix cache keys on.
        self.lora = lora
        self.lora_id: int = 0 if lora is None else lora.uid
        # Who sent it (an API key's or an address's name; "" for all alike) and its priority
        # (lower first, as vLLM's): the scheduler's fairness and order (scheduler.py).
        self.client = client
        self.priority = priority
        self.admitted = 0  # the scheduler's admission count when it last started running
        # Speculative decoding (speculative.py): draft tokens proposed for the next step, verified
        # after the last token (never part of token_ids until accepted), and the distributions they
        # were drawn from (None: point masses).
        self.spec_token_ids: list[int] = []
        self.spec_probs: Any = None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> Optional[FinishReason]:
        """Add a sampled token; return why the sequence stops now, if it does."""
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= self.max_tokens:
            return FinishReason.LENGTH
        return None
