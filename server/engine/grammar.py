"""Grammar-constrained decoding: what a request asks for (StructuredOutput), its compilation
against the model's tokenizer (GrammarCompiler, cached), and each sequence's matcher state with
the batch's token bitmask (GrammarBank, owned by the sampler).

Backend: llguidance. Measured on the default model's 49,152-token vocabulary (2-core CPU, see
README): a JSON schema compiles in ~1 ms (xgrammar: 1 ms to 0.9 s, up front) and a mask costs
~15-40 us per token (xgrammar ~5-25 us): both far below a decode step. What decided it is
coverage: llguidance refuses what it cannot enforce ("Unimplemented keys: ['uniqueItems']"),
while xgrammar 0.1.27 silently ignores allOf, not, if/then, uniqueItems and dependentRequired
and lets the model break them. Lark grammars with embedded %json also express the tool-call
formats directly, and regex / choice / GBNF grammars come with it. One 3 MB wheel, no torch.

Everything here but GrammarCompiler/GrammarBank is pure Python; llguidance is imported lazily,
so sequence.py can name StructuredOutput without it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from typing import Any, Iterable, Literal, Optional

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "regex", "choice", "grammar", "lark", "llguidance"]

# JSON as json.dumps writes it: ", " and ": ", no other whitespace. A small model given free
# whitespace can spend its whole budget on newlines; this is also what models see most.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a sequence's output. `value` is the schema as JSON text (json_schema), a
    regex, a JSON list of strings (choice), a GBNF or Lark grammar (grammar), or a Lark grammar
    (lark: the server's own, e.g. tool calls), or llguidance's own JSON of several grammars
    (llguidance: the server's, e.g. a model's thinking and then the answer's grammar).
    `field` names the request field in errors."""

    kind: GrammarKind
    value: str
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "regex", "choice", "grammar", "lark", "llguidance"):
            raise InvalidRequestError(f"unknown structured output kind {self.kind!r}", self.field)
        if not isinstance(self.value, str):
            raise InvalidRequestError("a structured output is given as text", self.field)

    @classmethod
    def json_schema(cls, schema: Any, field: str = "response_format") -> "StructuredOutput":
        # Key order kept: properties are generated in the order the schema gives them.
        return cls("json_schema", json.dumps(schema), field)

    def to_grammar(self) -> str:
        """The llguidance grammar (not yet checked against a tokenizer). ValueError if malformed."""
        from llguidance import LLMatcher, grammar_from

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "choice":
            choices = json.loads(self.value)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("choice must be a non-empty list of strings")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "grammar":  # GBNF (llama.cpp) or Lark
            return grammar_from("grammar", self.value)
        if self.kind == "llguidance":
            return grammar_from("llguidance", self.value)
        return LLMatcher.grammar_from_lark(self.value)


class GrammarCompiler:
    """Checks requests' grammars against the model's tokenizer and keeps them, by (kind, value).

    `check` runs where a request is admitted (generate_many, on the caller's thread), so a bad
    grammar is a 400 before any response is sent; the engine thread later finds it cached.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._cache: collections.OrderedDict[tuple[str, str], tuple[Optional[str], str]] = collections.OrderedDict()

    def _tokenizer(self) -> Any:
        # ~0.7 s for a 50k vocabulary: built once, on first use.
        with self._lock:
            if self._lltokenizer is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise InvalidRequestError("structured outputs need the llguidance package on the server",
                                              None) from None
                if self._hf_tokenizer is None:
                    raise InvalidRequestError("structured outputs need the model's tokenizer", None)
                n_vocab = max(self.vocab_size, len(self._hf_tokenizer))
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=n_vocab, eos_token=self.eos_token_ids or None)
            return self._lltokenizer

    def check(self, spec: StructuredOutput) -> str:
        """The checked grammar for spec; InvalidRequestError naming spec.field if it is not valid."""
        key = (spec.kind, spec.value)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(spec)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        grammar, error = hit
        if grammar is None:
            raise InvalidRequestError(error, spec.field)
        return grammar

    def _compile(self, spec: StructuredOutput) -> tuple[Optional[str], str]:
        from llguidance import LLMatcher

        tokenizer = self._tokenizer()
        what = {"json_schema": "JSON schema", "choice": "choice", "regex": "regex"}.get(spec.kind, "grammar")
        try:
            grammar = spec.to_grammar()
        except (ValueError, TypeError) as exc:
            return None, f"invalid {what}: {exc}"
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            return None, f"invalid or unsupported {what}: {' '.join(messages)[:500]}"
        return grammar, ""

    @property
    def mask_vocab_size(self) -> int:
        """Tokens a mask covers (the model's vocabulary, or the tokenizer's if that is larger)."""
        return self._tokenizer().vocab_size

    def matcher(self, spec: StructuredOutput) -> Any:
        import llguidance

        return llguidance.LLMatcher(self._tokenizer(), self.check(spec), log_level=0)


class GrammarBank:
    """The sampler's grammar side: one matcher per constrained sequence (by seq_id), kept in step
    with the sequence's own output tokens, and the batch's bitmask of allowed tokens.

    A matcher consumes the tokens the sequence gained since it last looked (so preemption and
    recomputation never desynchronize it). `fill` can run on a worker thread while the model
    computes the logits: llguidance drops the GIL and fills the rows on its own thread pool.
    """

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._executor: Any = None  # llguidance's thread pool, made on first use
        self._states: dict[int, list[Any]] = {}  # seq_id -> [matcher, output tokens consumed]

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def fill(self, seqs: list[Any]) -> tuple[list[int], Any]:
        """(rows of seqs that are constrained, their bitmask [rows, ceil(V/32)] int32)."""
        import torch
        import llguidance.torch as llt

        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return rows, None
        width = (self.compiler.mask_vocab_size + 31) // 32
        bitmask = torch.zeros((len(rows), width), dtype=torch.int32)
        work = []
        for j, i in enumerate(rows):
            matcher = self._catch_up(seqs[i])
            work.append((matcher, j))
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        llt.fill_next_token_bitmask_par(self._executor, work, bitmask)
        return rows, bitmask

    def _catch_up(self, seq: Any) -> Any:
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = [self.compiler.matcher(seq.params.structured), 0]
        matcher, consumed = state
        output = seq.token_ids[seq.num_prompt_tokens + consumed:]
        if output:
            if not matcher.consume_tokens(output) and not matcher.is_error():  # pragma: no cover
                raise RuntimeError("grammar matcher refused a token")
            state[1] += len(output)
        return matcher

    def is_failed(self, seq: Any) -> Optional[str]:
        state = self._states.get(seq.seq_id)
        return state[0].get_error() if state is not None and state[0].is_error() else None

    def apply(self, logits: Any, rows: list[int], bitmask: Any) -> list[int]:
        """Set the disallowed tokens' logits to -inf in the constrained rows (in place). Returns
        the rows whose grammar allows no token at all (a failed matcher).

        The bits are unpacked by numpy (one pass, single-threaded): torch's elementwise ops on
        [rows, V] start OpenMP teams, which cost more than the work on a busy CPU.
        """
        if not rows:
            return []
        import numpy as np
        import torch

        vocab = logits.shape[1]
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # [rows, 32 * W]
        if bits.shape[1] < vocab:  # logits wider than the tokenizer: padding ids are never allowed
            bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
        banned = bits[:, :vocab] == 0
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            values = logits.numpy()
            for j, i in enumerate(rows):
                np.copyto(values[i], -np.inf, where=banned[j])
        else:
            mask = torch.from_numpy(banned).to(logits.device)
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(mask, float("-inf"))
        return [i for j, i in enumerate(rows) if banned[j].all()]
