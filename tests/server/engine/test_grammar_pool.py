"""Where grammars compile (grammar_pool.py, GrammarCompiler.prepare): off the event loop, once per
request, within a time budget and size caps, cached by hash in a byte-bounded cache; and OpenAI's
strict schemas (schema_strict.py). The default model's real tokenizer, no model."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import jsonschema
import pytest

from quantserve.server.engine import InvalidRequestError
from quantserve.server.engine.grammar import GrammarCompiler, StructuredOutput
from quantserve.server.engine.grammar_pool import ByteLRU, GrammarLimits
from quantserve.server.engine.schema_strict import strict_schema


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _compiler(tokenizer, **limits) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, GrammarLimits(**limits))


def _choices(n: int, tag: str = "") -> StructuredOutput:
    return StructuredOutput("choice", json.dumps([f"item {tag}{i} of the list" for i in range(n)]), "structured_outputs")


def test_byte_lru_is_bounded_in_bytes():
    cache = ByteLRU(100)
    for i in range(10):
        cache.put(i, str(i), 30)
    assert cache.nbytes <= 100 and len(cache) == 3 and cache.get(9) == "9" and cache.get(0) is None
    cache.get(7)  # used: kept over 8
    cache.put("big", "x", 101)  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("big") is None and len(cache) == 3
    cache.put(10, "10", 30)
    assert cache.get(7) == "7" and cache.get(8) is None


def test_prepare_compiles_off_the_loop_and_once_per_request(tokenizer):
    compiler = _compiler(tokenizer)
    compiler.check(_choices(2, "warm"))  # the tokenizer's one-time build, out of the timing
    compiles = []
    real = compiler._compile
    compiler._compile = lambda spec: compiles.append(spec) or real(spec)
    spec = _choices(8000)  # ~0.2-1 s to compile on a 2-core machine

    async def run() -> float:
        ticks, worst = [], 0.0

        async def heartbeat() -> None:
            nonlocal worst
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                worst = max(worst, now - last)
                last = now
                ticks.append(now)

        beat = asyncio.ensure_future(heartbeat())
        start = time.perf_counter()
        await compiler.prepare(spec)
        took = time.perf_counter() - start
        beat.cancel()
        return took, worst

    took, worst = asyncio.run(run())
    assert took > 0.05  # a real compile happened meanwhile
    assert worst < 0.1, f"the event loop stalled {worst * 1e3:.0f} ms during a {took:.2f} s compile"
    # The engine's side reuses the request's compile: check and each sequence's matcher.
    compiler.check(spec)
    first, second = compiler.matcher(spec), compiler.matcher(spec)
    assert first is not second and len(compiles) == 1
    # Another request with the same grammar (a new spec object) finds it in the cache.
    compiler.check(_choices(8000))
    assert len(compiles) == 1


def test_compile_over_the_time_budget_is_a_400_naming_the_limit(tokenizer):
    compiler = _compiler(tokenizer, compile_timeout=0.05, compile_workers=1)
    compiler.check(_choices(2, "warm"))
    slow = _choices(9000, "slow")
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(compiler.prepare(slow))
    assert "0.05 s" in str(info.value) and "--grammar-compile-timeout" in str(info.value)
    assert info.value.field == "structured_outputs"
    # The same grammar again is refused at once (remembered), not compiled again.
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError):
        asyncio.run(compiler.prepare(_choices(9000, "slow")))
    assert time.perf_counter() - start < 0.05


@pytest.mark.parametrize("spec,limits,words", [
    (_choices(11), {"max_choices": 10}, ["11", "at most 10", "--max-grammar-choices"]),
    (StructuredOutput.json_schema({"type": "object", "description": "x" * 2000}), {"max_schema_bytes": 1000},
     ["JSON schema", "at most 1000", "--max-grammar-schema-bytes"]),
    (StructuredOutput("regex", "a" * 101, "structured_outputs"), {"max_regex_length": 100},
     ["regex is 101 characters", "--max-grammar-regex-length"]),
    (StructuredOutput("grammar", 'start: "' + "a" * 500 + '"', "structured_outputs"), {"max_grammar_bytes": 100},
     ["grammar", "at most 100", "--max-grammar-bytes"]),
], ids=["choices", "schema", "regex", "grammar"])
def test_size_caps_are_400s_naming_the_option(tokenizer, spec, limits, words):
    compiler = _compiler(tokenizer, **limits)
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(compiler.prepare(spec))
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(InvalidRequestError):
        compiler.check(spec)


def test_cache_is_bounded_in_bytes(tokenizer):
    compiler = _compiler(tokenizer, cache_bytes=8 * 2**20)
    for i in range(12):  # each ~45 kB of grammar: ~1.1 MB counted
        schema = {"type": "object", "properties": {f"k{i}_{j}": {"type": "string", "description": "d" * 120}
                                                    for j in range(300)}}
        compiler.check(StructuredOutput.json_schema(schema))
        assert compiler.cache_bytes <= 8 * 2**20
    assert 4 * 2**20 < compiler.cache_bytes  # it does keep what fits


def test_strict_schema_requires_every_property_and_no_others():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "string"}}}}}}},
        "$defs": {"E": {"type": "object", "properties": {"f": {"type": "boolean"}}}}}
    strict = strict_schema(schema)
    assert strict["required"] == ["a", "b"] and strict["additionalProperties"] is False
    assert strict["properties"]["b"]["required"] == ["c"]
    assert strict["properties"]["b"]["properties"]["c"]["items"] == {
        "type": "object", "properties": {"d": {"type": "string"}}, "required": ["d"], "additionalProperties": False}
    assert strict["$defs"]["E"]["required"] == ["f"]
    assert "required" not in schema  # a copy
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1, "b": {"c": []}, "x": 1}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1}, strict)


def test_strict_spec_is_enforced_by_the_grammar(tokenizer):
    compiler = _compiler(tokenizer)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    loose, strict = StructuredOutput.json_schema(schema), StructuredOutput.json_schema(schema, strict=True)
    for text, loose_ok, strict_ok in [('{"a": 1}', True, False), ('{"a": 1, "b": true}', True, True),
                                      ('{"a": 1, "b": true, "c": 2}', True, False)]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for spec, ok in ((loose, loose_ok), (strict, strict_ok)):
            matcher = compiler.matcher(spec)  # a fresh one: a matcher that refused a token stays failed
            assert (matcher.consume_tokens(ids) and matcher.is_accepting()) == ok, (text, ok)


def test_prepare_runs_on_the_pool_threads(tokenizer):
    compiler = _compiler(tokenizer, compile_workers=1)
    names = []
    real = compiler._compile
    compiler._compile = lambda spec: names.append(threading.current_thread().name) or real(spec)
    asyncio.run(compiler.prepare(_choices(3, "pool")))
    assert names and names[0].startswith("quantserve-compile")
