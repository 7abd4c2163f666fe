"""Grammar-constrained sampling without the model: random logits over the default model's real
vocabulary, the sampler's masks, and jsonschema / re / json as the independent judges."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from quantserve.server.engine import InvalidRequestError, SamplingParams
from quantserve.server.engine.grammar import GrammarCompiler, StructuredOutput
from quantserve.server.engine.sampler import Sampler
from quantserve.server.engine.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False},
    },
    "required": ["id", "code", "tags", "inner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def _sampler(compiler) -> Sampler:
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.use_grammars(compiler)
    return sampler


def _generate(sampler, seqs, vocab, steps, logits_seed=0, prepare=False):
    """Sample up to `steps` tokens per sequence from random logits (the same logits for every
    row each step, so rows differ only by their constraints); stops a sequence at EOS/length."""
    gen = torch.Generator().manual_seed(logits_seed)
    live = list(seqs)
    for _ in range(steps):
        if not live:
            break
        logits = torch.randn(1, vocab, generator=gen).expand(len(live), vocab).contiguous() * 3
        if prepare:
            sampler.prepare(live)
        tokens, _ = sampler(logits, live)
        for seq, token in zip(list(live), tokens):
            if seq.append_token(token) is not None:
                live.remove(seq)
    return live


def test_constrained_and_free_sequences_share_a_batch(tokenizer, compiler):
    eos = frozenset({tokenizer.eos_token_id})
    spec = StructuredOutput.json_schema(SCHEMA)
    constrained = [Sequence("c", [1, 2, 3], SamplingParams(max_tokens=200, temperature=1.0, seed=s, structured=spec),
                            eos_token_ids=eos) for s in range(3)]
    free = Sequence("f", [1, 2, 3], SamplingParams(max_tokens=30, temperature=1.0, seed=7), eos_token_ids=eos)
    sampler = _sampler(compiler)
    live = _generate(sampler, [*constrained, free], len(tokenizer), 200, prepare=True)
    assert not [s for s in live if s in constrained], "a constrained sequence did not finish its JSON"
    for seq in constrained:
        assert seq.output_token_ids[-1] == tokenizer.eos_token_id  # ended by the grammar allowing only EOS
        text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)
    # The free sequence is untouched by its constrained neighbours: same tokens as alone.
    alone = Sequence("f", [1, 2, 3], SamplingParams(max_tokens=30, temperature=1.0, seed=7), eos_token_ids=eos)
    _generate(_sampler(compiler), [alone], len(tokenizer), 200)
    assert free.output_token_ids == alone.output_token_ids
    # Oracle that the mask did something: random logits alone do not write JSON.
    assert not tokenizer.decode(alone.output_token_ids).startswith('{"id": ')


@pytest.mark.parametrize("kind,value,check", [
    ("regex", r"[a-z]{3}-[0-9]{2}", lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
    ("choice", json.dumps(["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
    ("grammar", 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"', lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
])
def test_regex_choice_and_gbnf_grammars(tokenizer, compiler, kind, value, check):
    eos = frozenset({tokenizer.eos_token_id})
    seq = Sequence("r", [1], SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                                            structured=StructuredOutput(kind, value, "structured_outputs")),
                   eos_token_ids=eos)
    _generate(_sampler(compiler), [seq], len(tokenizer), 40)
    text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    assert check(text), text


def test_budget_running_out_is_length_never_stop(tokenizer, compiler):
    seq = Sequence("l", [1], SamplingParams(max_tokens=4, temperature=0,
                                            structured=StructuredOutput.json_schema(SCHEMA)),
                   eos_token_ids=frozenset({tokenizer.eos_token_id}))
    sampler = _sampler(compiler)
    reason = None
    gen = torch.Generator().manual_seed(1)
    while reason is None:
        tokens, _ = sampler(torch.randn(1, len(tokenizer), generator=gen), [seq])
        reason = seq.append_token(tokens[0])
    assert reason.value == "length" and seq.num_output_tokens == 4
    text = tokenizer.decode(seq.output_token_ids)
    assert text.startswith('{"id": ')
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("schema,words", [
    ({"type": "objekt"}, "objekt"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "(unclosed"}, "regex"),
    ({"$ref": "#/$defs/Missing"}, "Missing"),
    ({"type": "integer", "minimum": 10, "maximum": 1}, "minimum"),
    ({"not": {"type": "string"}}, "not"),
])
def test_bad_or_unsupported_schemas_are_refused_by_name(compiler, schema, words):
    with pytest.raises(InvalidRequestError) as info:
        compiler.check(StructuredOutput.json_schema(schema, "response_format"))
    assert info.value.field == "response_format" and words in str(info.value)


def test_grammars_are_cached_by_schema(compiler):
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"cached": {"type": "integer"}}})
    first = compiler.check(spec)
    assert compiler.check(StructuredOutput.json_schema({"type": "object", "properties": {"cached": {"type": "integer"}}})) is first
    with pytest.raises(InvalidRequestError):  # the verdict on a bad one is cached too
        compiler.check(StructuredOutput("regex", "(", "structured_outputs"))
    with pytest.raises(InvalidRequestError) as info:
        compiler.check(StructuredOutput("regex", "(", "structured_outputs"))
    assert info.value.field == "structured_outputs"


def test_logit_bias_and_min_tokens(tokenizer, compiler):
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    logits = torch.zeros(2, vocab)
    logits[:, eos] = 5.0  # the model wants to stop
    logits[:, 100] = 4.0
    plain = Sequence("a", [1], SamplingParams(max_tokens=5, temperature=0), eos_token_ids=frozenset({eos}))
    sampler = _sampler(compiler)
    assert sampler(logits[:1].clone(), [plain])[0] == [eos]
    banned = Sequence("b", [1], SamplingParams(max_tokens=5, temperature=0, logit_bias={eos: -100}),
                      eos_token_ids=frozenset({eos}))
    forced = Sequence("c", [1], SamplingParams(max_tokens=5, temperature=0, logit_bias={200: 100}),
                      eos_token_ids=frozenset({eos}))
    assert sampler(logits.clone(), [banned, forced])[0] == [100, 200]
    early = Sequence("d", [1], SamplingParams(max_tokens=5, temperature=0, min_tokens=2),
                     eos_token_ids=frozenset({eos}))
    picks = []
    for _ in range(3):
        token = sampler(logits[:1].clone(), [early])[0][0]
        picks.append(token)
        early.append_token(token)
    assert picks == [100, 100, eos]
    # Logprobs stay those of the model's raw logits, whatever the bias.
    lp = Sequence("e", [1], SamplingParams(max_tokens=5, temperature=0, logit_bias={200: 100}, logprobs=0))
    _, logprobs = sampler(logits[:1].clone(), [lp])
    assert logprobs[0].token_id == 200
    assert logprobs[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[200]))


def test_sampling_params_refuse_what_would_break_a_grammar():
    spec = StructuredOutput.json_schema({"type": "object"})
    for kwargs, field in (({"stop": ("}",)}, "stop"), ({"stop_token_ids": (5,)}, "stop_token_ids"),
                          ({"ignore_eos": True}, "ignore_eos")):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(structured=spec, **kwargs)
        assert info.value.field == field
    for kwargs, field in (({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
                          ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"), ({"min_tokens": -1}, "min_tokens")):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**kwargs)
        assert info.value.field == field
