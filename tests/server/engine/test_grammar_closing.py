"""Budget-aware closing (grammar_closing.py, GrammarBank): closing plans from real matchers on the
default model's vocabulary, and sequences sampled from random logits whose budget ends inside
the structure still parse, with finish_reason "length"."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from quantserve.server.engine import SamplingParams
from quantserve.server.engine.grammar import GrammarCompiler, StructuredOutput
from quantserve.server.engine.grammar_closing import closing_plan
from quantserve.server.engine.sampler import Sampler
from quantserve.server.engine.sequence import Sequence

CITY = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                         "population": {"type": "integer"},
                                         "landmarks": {"type": "array", "items": {"type": "string"}}}}
PATTERNED = {"type": "object", "properties": {
    "email": {"type": "string", "pattern": "^[a-z]{3,8}@example\\.com$"},
    "age": {"type": "integer", "minimum": 18, "maximum": 99}}, "required": ["email", "age"]}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


@pytest.mark.parametrize("spec,prefix,schema", [
    (StructuredOutput.json_schema(CITY, strict=True), '{"name": "Paris is the capital of the pop', CITY),
    (StructuredOutput.json_schema(CITY, strict=True), '{"name": "P", "country": "F", "population": 1, "landmarks": ["E',
     CITY),
    (StructuredOutput.json_schema({"type": "object"}), '{"population_per_inhabit', {"type": "object"}),
    (StructuredOutput.json_schema({"type": "object"}), '{"a": {"b": [1, 2, {"c": "x', {"type": "object"}),
    (StructuredOutput.json_schema(PATTERNED), '{"email": "ab', PATTERNED),
], ids=["strict-in-string", "in-list", "free-key", "nested", "pattern-and-minimum"])
def test_plans_close_the_structure(tokenizer, compiler, spec, prefix, schema):
    matcher = compiler.matcher(spec)
    assert matcher.consume_tokens(tokenizer.encode(prefix, add_special_tokens=False))
    plan = closing_plan(matcher, compiler.closing_tokens, 64)
    assert plan is not None and len(plan) <= 30
    assert not matcher.is_accepting()  # rolled back: the matcher is where it was
    jsonschema.validate(json.loads(prefix + tokenizer.decode(plan)), schema if schema is not CITY
                        else {**CITY, "required": list(CITY["properties"]), "additionalProperties": False})
    assert closing_plan(matcher, compiler.closing_tokens, 2) is None or len(plan) <= 2  # the limit holds


@pytest.mark.parametrize("max_tokens", [32, 48])  # more than the shortest answer (CITY: ~23)
@pytest.mark.parametrize("schema", [CITY, {"type": "object"}, PATTERNED], ids=["city", "object", "patterned"])
def test_budget_ending_inside_json_still_parses(tokenizer, compiler, schema, max_tokens):
    spec = StructuredOutput.json_schema(schema, strict=schema is CITY)
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.use_grammars(compiler)
    seq = Sequence("c", [1], SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=max_tokens, structured=spec),
                   eos_token_ids=frozenset({tokenizer.eos_token_id}))
    gen = torch.Generator().manual_seed(max_tokens)
    # Letters favoured: left alone, random logits keep a string open until the budget ends.
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.encode("abc", add_special_tokens=False)] = 8.0
    reason = None
    while reason is None:
        tokens, _ = sampler(torch.randn(1, len(tokenizer), generator=gen) + bias, [seq])
        reason = seq.append_token(tokens[0])
    text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert seq.num_output_tokens <= max_tokens
    if reason.value != "stop":
        assert reason.value == "length"
