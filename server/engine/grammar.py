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

import dataclasses
import functools
import hashlib
import json
import logging
import threading
from typing import Any, Iterable, Literal, Optional

import numpy as np

from .errors import InvalidRequestError
from .grammar_closing import ClosingTokens, closing_plan
from .grammar_pool import ByteLRU, CompilePool, GrammarLimits

logger = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "regex", "choice", "grammar", "lark", "llguidance"]

# JSON as json.dumps writes it: ", " and ": ", no other whitespace. A small model given free
# whitespace can spend its whole budget on newlines; this is also what models see most.
# Resident bytes of a compiled matcher per byte of its grammar text, measured: five 450 kB schemas
# (3,000 properties each) took 48 MB of RSS, ~22 bytes per grammar byte; rounded up.
_BYTES_PER_GRAMMAR_BYTE = 24
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


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
    def json_schema(cls, schema: Any, field: str = "response_format", strict: bool = False) -> "StructuredOutput":
        """strict: OpenAI's strict semantics (schema_strict.py: all properties required, no others)."""
        if strict:
            from .schema_strict import strict_schema

            schema = strict_schema(schema)
        # Key order kept: properties are generated in the order the schema gives them.
        return cls("json_schema", json.dumps(schema), field)

    @functools.cached_property
    def digest(self) -> bytes:
        """The cache key: a hash of (kind, value); computed once per spec (a 1 MB schema: ~2 ms)."""
        return hashlib.sha256(self.kind.encode() + b"\0" + self.value.encode("utf-8", "surrogatepass")).digest()

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


@dataclasses.dataclass(frozen=True)
class CompiledGrammar:
    """A spec compiled against the tokenizer: its grammar and a fresh matcher that sequences copy
    (LLMatcher.deep_copy shares the compiled lexer: ~5 us, or 4 ms for 30,000 choices), or the
    error that refuses it. nbytes: what the cache counts for it, from the grammar's length (see
    _BYTES_PER_GRAMMAR_BYTE)."""

    grammar: Optional[str]
    error: str
    template: Any = None
    nbytes: int = 0


class GrammarCompiler:
    """Compiles requests' grammars against the model's tokenizer, each once per request, and keeps
    them by a hash of (kind, text), bounded in bytes (limits.cache_bytes).

    `prepare` (async, where a request is admitted) compiles on a worker thread within the time
    budget and attaches the result to the spec, so a bad or too costly grammar is a 400 before any
    response is sent and neither the event loop nor the engine thread ever compiles. `check` and
    `matcher` are the synchronous sides (a spec not prepared compiles there: engine-level callers).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 limits: Optional[GrammarLimits] = None) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.limits = GrammarLimits() if limits is None else limits
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._closing: Optional[ClosingTokens] = None
        self._cache: ByteLRU[CompiledGrammar] = ByteLRU(self.limits.cache_bytes)
        self._pool: Optional[CompilePool] = None

    def warm(self) -> None:
        """Build the tokenizer view and import the mask kernels now (the engine's start), if the
        model has a tokenizer and llguidance is installed; otherwise the first request says why."""
        try:
            self._tokenizer()
            import llguidance.torch  # noqa: F401 - its imports take a while too
        except InvalidRequestError:
            pass

    def _tokenizer(self) -> Any:
        # ~0.4-0.7 s for a 50k vocabulary: built once, at the engine's start (warm).
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

    def close(self) -> None:
        """Stop the compile threads (the engine is unloaded)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def closing_tokens(self) -> ClosingTokens:
        if self._closing is None:
            hf = self._hf_tokenizer
            self._closing = ClosingTokens.from_tokenizer(lambda text: hf.encode(text, add_special_tokens=False))
        return self._closing

    async def prepare(self, spec: StructuredOutput) -> None:
        """Compile spec off the event loop (a worker thread, within limits.compile_timeout) and
        attach the result to it; InvalidRequestError naming spec.field if it is invalid or breaks
        a limit. Call from the event loop before submitting the request."""
        self._check_size(spec)
        if _attached(spec) is None:
            cached = self._cache.get(spec.digest)  # sha256 of the text: ~2 ms for a 1 MB schema
            if cached is not None:
                object.__setattr__(spec, "_compiled", cached)
        if _attached(spec) is not None:
            return _raise_if_error(_attached(spec), spec)
        if self._pool is None:
            self._pool = CompilePool(self.limits.compile_workers, self.limits.compile_timeout)
        try:
            compiled = await self._pool.run(lambda: self._compiled(spec), spec.field)
        except InvalidRequestError as exc:  # over the time budget: refused at once next time
            self._cache.put(spec.digest, CompiledGrammar(None, str(exc)), 256)
            raise
        object.__setattr__(spec, "_compiled", compiled)
        _raise_if_error(compiled, spec)

    def check(self, spec: StructuredOutput) -> str:
        """The checked grammar for spec; InvalidRequestError naming spec.field if it is not valid."""
        compiled = _attached(spec)
        if compiled is None:
            self._check_size(spec)
            compiled = self._compiled(spec)
            object.__setattr__(spec, "_compiled", compiled)
        _raise_if_error(compiled, spec)
        return compiled.grammar

    def matcher(self, spec: StructuredOutput) -> Any:
        """A new matcher for one sequence of spec (a copy of the compiled one)."""
        self.check(spec)
        return _attached(spec).template.deep_copy()

    def _check_size(self, spec: StructuredOutput) -> None:
        """The caps that need no parsing (on the caller's thread: constant time)."""
        limits, size = self.limits, len(spec.value)
        cap, what, flag = {
            "json_schema": (limits.max_schema_bytes, "JSON schema", "--max-grammar-schema-bytes"),
            "regex": (limits.max_regex_length, "regex", "--max-grammar-regex-length"),
        }.get(spec.kind, (limits.max_grammar_bytes, "grammar", "--max-grammar-bytes"))
        if size > cap:
            unit = "characters" if spec.kind == "regex" else "bytes"
            raise InvalidRequestError(f"the {what} is {size} {unit}; this server accepts at most {cap} ({flag})",
                                      spec.field)

    def _compiled(self, spec: StructuredOutput) -> CompiledGrammar:
        compiled = self._cache.get(spec.digest)
        if compiled is None:
            compiled = self._compile(spec)
            # Not over an entry made meanwhile: a compile that ran past the budget stays refused.
            compiled = self._cache.put_new(spec.digest, compiled, compiled.nbytes)
        return compiled

    def _compile(self, spec: StructuredOutput) -> CompiledGrammar:
        import llguidance

        what = {"json_schema": "JSON schema", "choice": "choice", "regex": "regex"}.get(spec.kind, "grammar")
        if spec.kind == "choice":
            count = len(json.loads(spec.value))
            if count > self.limits.max_choices:
                return CompiledGrammar(None, f"choice has {count} strings; this server accepts at most "
                                             f"{self.limits.max_choices} (--max-grammar-choices)")
        tokenizer = self._tokenizer()
        try:
            grammar = spec.to_grammar()
        except (ValueError, TypeError) as exc:
            return CompiledGrammar(None, f"invalid {what}: {exc}", nbytes=1024)
        if len(grammar) > 4 * self.limits.max_grammar_bytes:  # what the input grew into
            return CompiledGrammar(None, f"the {what} makes a grammar of {len(grammar)} bytes; this server accepts "
                                         f"at most {4 * self.limits.max_grammar_bytes} (4 x --max-grammar-bytes)")
        # Building the matcher checks the grammar too (the same messages as validate_grammar, which
        # would build it a second time).
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # drops the GIL while it builds
        if template.is_error():
            return CompiledGrammar(None, f"invalid or unsupported {what}: {template.get_error()[:500]}", nbytes=1024)
        # The lexer builds its states lazily, and the start state of a large grammar is most of it (a
        # 2,500-key schema: ~1 s): build it here, on the compile worker, not in the engine's first step
        # with this grammar, where it would hold every other request's token. Copies share the lexer.
        import llguidance.torch as llt

        llt.fill_next_token_bitmask(template, llt.allocate_token_bitmask(1, tokenizer.vocab_size), 0)
        return CompiledGrammar(grammar, "", template, _BYTES_PER_GRAMMAR_BYTE * len(grammar) + 65536)

    @property
    def mask_vocab_size(self) -> int:
        """Tokens a mask covers (the model's vocabulary, or the tokenizer's if that is larger)."""
        return self._tokenizer().vocab_size

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache of compiled grammars counts now (at most limits.cache_bytes)."""
        return self._cache.nbytes


def _attached(spec: StructuredOutput) -> Optional[CompiledGrammar]:
    return spec.__dict__.get("_compiled")


def _raise_if_error(compiled: CompiledGrammar, spec: StructuredOutput) -> None:
    if compiled.grammar is None:
        raise InvalidRequestError(compiled.error, spec.field)


class GrammarBank:
    """The sampler's grammar side: one matcher per constrained sequence (by seq_id), kept in step
    with the sequence's own output tokens, and the batch's bitmask of allowed tokens.

    A matcher consumes the tokens the sequence gained since it last looked (so preemption and
    recomputation never desynchronize it). `fill` can run on a worker thread while the model
    computes the logits: llguidance drops the GIL and fills the rows on its own thread pool.

    Budget-aware closing (grammar_closing.py): within CLOSING_HORIZON tokens of its budget, a
    sequence's closing plan is computed each step; once the plan needs all the tokens left, its
    row allows only the plan's next token, so the budget's last token closes the structure.
    """

    CLOSING_HORIZON = 96  # plans longer than this are not looked for (a step costs ~20 us per plan token)
    # Closing starts when the plan is within this many tokens of the budget: one free token can
    # lengthen the plan by several (", " in a free object adds a key and a value), and a plan
    # found too late does not fit. The budget then ends with the plan (see shorten_budgets).
    CLOSING_SLACK = 8

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._executor: Any = None  # llguidance's thread pool, made on first use
        self._states: dict[int, _SeqGrammar] = {}

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def fill(self, seqs: list[Any]) -> tuple[list[int], Any]:
        """(rows of seqs that are constrained, their bitmask [rows, ceil(V/32)] int32)."""
        import numpy as np
        import torch
        import llguidance.torch as llt

        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return rows, None
        width = (self.compiler.mask_vocab_size + 31) // 32
        bitmask = torch.zeros((len(rows), width), dtype=torch.int32)
        work = []
        for j, i in enumerate(rows):
            state = self._catch_up(seqs[i])
            forced = self._closing_token(state, seqs[i])
            if forced is None:
                work.append((state.matcher, j))
            else:  # one allowed token: bit `forced` of row j
                bitmask.numpy().view(np.uint32)[j, forced // 32] = 1 << (forced % 32)
        if work:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            llt.fill_next_token_bitmask_par(self._executor, work, bitmask)
        return rows, bitmask

    def _catch_up(self, seq: Any) -> "_SeqGrammar":
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _SeqGrammar(self.compiler.matcher(seq.params.structured))
        output = seq.token_ids[seq.num_prompt_tokens + state.consumed:]
        if output:
            if not state.matcher.consume_tokens(output) and not state.matcher.is_error():  # pragma: no cover
                raise RuntimeError("grammar matcher refused a token")
            state.consumed += len(output)
            if state.closing and state.closing[0] == output[0] and len(output) == 1:
                state.closing.pop(0)
            else:  # not where the plan led (recomputed, preempted): plan afresh
                state.closing = state.budget_end = None
        return state

    def _closing_token(self, state: "_SeqGrammar", seq: Any) -> Optional[int]:
        """The plan's next token when the closing plan needs every token left, else None."""
        left = seq.max_tokens - seq.num_output_tokens
        if state.closing:  # forcing already: follow the plan
            return state.closing[0]
        if left > self.CLOSING_HORIZON or state.matcher.is_error():
            return None
        if state.matcher.is_accepting():
            return self._end_if_no_room(state.matcher, left)
        plan = closing_plan(state.matcher, self.compiler.closing_tokens, left)
        if plan and len(plan) + self.CLOSING_SLACK >= left:
            state.closing = plan
            state.budget_end = seq.num_output_tokens + len(plan)
            return plan[0]
        return None

    def _end_if_no_room(self, matcher: Any, left: int) -> Optional[int]:
        """At a complete answer near the budget: EOS if something the grammar allows next (a
        second tool call, another list item) could not be closed within the budget; else None
        (free). More than a few continuations (free text, as tool_choice "auto" allows): free, the
        text needs no closing."""
        eos = next((t for t in self.compiler.eos_token_ids if t < self.compiler.mask_vocab_size), None)
        if eos is None:
            return None
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        nexts = [t for t in np.flatnonzero(bits).tolist() if t not in self.compiler.eos_token_ids]
        if not nexts:
            return None
        if len(nexts) > 16:
            return None
        for token in nexts:
            if not matcher.try_consume_tokens([token]):
                continue
            plan = closing_plan(matcher, self.compiler.closing_tokens, left - 1)
            matcher.rollback(1)
            if plan is None or 1 + len(plan) + self.CLOSING_SLACK > left:
                return eos
        return None

    def accepted_prefix(self, seq: Any, tokens: list[int]) -> int:
        """How many of `tokens` (drafts to follow seq's output) the grammar accepts in a row:
        speculative decoding verifies only those. The matcher is left where it was. While a
        closing plan forces the tokens, none."""
        state = self._catch_up(seq)
        if state.closing or state.matcher.is_error():
            return 0
        return int(state.matcher.validate_tokens(list(tokens)))

    def shorten_budgets(self, seqs: list[Any]) -> None:
        """Engine thread, after fill: a sequence being closed ends with its plan, as one whose
        max_tokens ran out ("length": its content was cut short, even though it parses)."""
        for seq in seqs:
            state = self._states.get(seq.seq_id)
            if state is not None and state.budget_end is not None:
                seq.max_tokens = min(seq.max_tokens, state.budget_end)

    def is_failed(self, seq: Any) -> Optional[str]:
        state = self._states.get(seq.seq_id)
        return state.matcher.get_error() if state is not None and state.matcher.is_error() else None

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


class _SeqGrammar:
    """One sequence's matcher, the output tokens it has consumed, and its closing plan once forced."""

    __slots__ = ("matcher", "consumed", "closing", "budget_end")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.consumed = 0
        self.closing: Optional[list[int]] = None
        self.budget_end: Optional[int] = None  # the output length at which the closing plan ends
