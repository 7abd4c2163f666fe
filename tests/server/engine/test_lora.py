"""LoRA adapters on the engine (default model, NF4): greedy outputs equal peft's unmerged LoRA
forward on transformers over the same 4-bit weights, for adapters on attention, on the MLP and on
both, alone and mixed in one batch with the base; the prefix cache never crosses adapters;
bad adapters are refused at load naming why; unknown names at request time."""

from __future__ import annotations

import asyncio
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantserve.kernels.cpu import decode as fused_decode
from quantserve.server.engine import InvalidRequestError, SamplingParams
from quantserve.server.engine.lora import AdapterError, AdapterNotFoundError

from ..lora_helpers import check_greedy
from .conftest import run
from .helpers import Result, assert_blocks_all_free, make_prompts, started

MAX_NEW = 12  # the real-server tests ask for as many: peft's outputs are computed once


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters  # tests/server/conftest.py: attention, MLP, all (rslora, r=4), big (r=16)


async def collect(engine, prompt, params, request_id, lora=None) -> Result:
    res = Result([[]], [""], [None], [[]], [])
    async for out in engine.generate(prompt, params, request_id, lora=lora):
        res.outputs.append(out)
        res.num_cached_tokens = out.num_cached_tokens
        for c in out.outputs:
            res.token_ids[0] += c.token_ids
            if c.finish_reason is not None:
                res.finish_reason[0] = c.finish_reason
    return res


async def _mixed(model, tokenizer, adapters, prompts, names, **config):
    # float32 KV cache: compared with peft's generations on transformers (float32 cache)
    engine = await started(model, tokenizer, **{"kv_cache_dtype": "float32", **config})
    try:
        for name in ("attn", "mlp", "all"):
            engine.loras.load(name, str(adapters[name]))
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
        jobs = [collect(engine, p, params, f"r{i}-{name}", lora=name)
                for i, p in enumerate(prompts) for name in names]
        results = await asyncio.gather(*jobs)
        assert_blocks_all_free(engine)
        if fused_decode.load() is not None:  # the one-call step adds the adapters' deltas itself
            assert engine.runner.forward.path == "fused"
        return results, engine.stats()
    finally:
        await engine.shutdown()


def _check_against_peft(smollm_folder, adapters, prompts, names, results):
    """Each request's tokens are peft's greedy continuation (check_greedy: one teacher-forced
    forward per request); at most one accepted near-tie in all. Returns the tokens."""
    got, notes = [], []
    for p in prompts:
        for name in names:
            result = results.pop(0)
            tokens = result.token_ids[0]
            notes += check_greedy(smollm_folder, None if name is None else adapters[name], p, tokens)
            # ended by EOS, or by max_tokens
            assert result.finish_reason[0] == ("length" if len(tokens) == MAX_NEW else "stop")
            got.append(tokens)
    for note in notes:
        warnings.warn(note)
    assert len(notes) <= 1, notes
    return got


def test_mixed_batch_matches_peft(smollm, smollm_folder, adapters):
    """Base + 3 adapters (attention, MLP, all with rslora) in the same steps: each request equals
    peft's greedy output for its adapter alone; every adapter changes the base's output."""
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 1)  # a chat prompt (peft's reference generations are what takes time)
    names = [None, "attn", "mlp", "all"]
    results, stats = run(_mixed(model, tokenizer, adapters, prompts, names, max_num_seqs=8, max_num_batched_tokens=512,
                                num_kv_blocks=128, max_loras=4))
    got = _check_against_peft(smollm_folder, adapters, prompts, names, results)
    for j in (1, 2, 3):  # the test means something: each adapter changes what the base says
        assert any(got[i * 4 + j] != got[i * 4] for i in range(len(prompts))), names[j]


def test_mixed_batch_at_medium_precision_matches_peft(smollm, smollm_folder, adapters):
    """At the server's default matmul precision ("medium") adapters are kept in bf16 and run
    through the native CPU kernel: each request still equals peft's greedy output (float32 LoRA
    weights; at this precision a near-tie is a gap under 0.25 logits)."""
    from quantserve.server.engine.models import lora_layers

    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 1)
    names = [None, "attn", "mlp", "all"]
    torch.set_float32_matmul_precision("medium")
    try:
        assert lora_layers.weight_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16 \
            or lora_layers.lora_cpu.load() is None
        results, _ = run(_mixed(model, tokenizer, adapters, prompts, names, max_num_seqs=8,
                                max_num_batched_tokens=512, num_kv_blocks=128, max_loras=4))
        _check_against_peft(smollm_folder, adapters, prompts, names, results)
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.slow
def test_adapters_match_peft_on_bitsandbytes(smollm, smollm_folder, adapters):
    """The same engine outputs against peft on transformers + bitsandbytes NF4 (bitsandbytes'
    Linear4bit under peft's own bitsandbytes LoRA layers)."""
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 1)
    names = ["attn", "mlp", "all"]
    results, _ = run(_mixed(model, tokenizer, adapters, prompts, names, max_num_seqs=8, num_kv_blocks=128))
    notes = []
    for name, result in zip(names, results):
        notes += check_greedy(smollm_folder, adapters[name], prompts[0], result.token_ids[0], bitsandbytes=True)
    assert len(notes) <= 1, notes


def test_max_loras_one_runs_adapters_in_turn(smollm, smollm_folder, adapters):
    """With --max-loras 1, requests for three adapters and the base all finish (the others wait in
    the queue), still equal to peft's outputs."""
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 1)  # the same as above: peft's outputs are computed once
    names = ["attn", None, "mlp", "all"]
    results, _ = run(_mixed(model, tokenizer, adapters, prompts, names, max_num_seqs=8, num_kv_blocks=128,
                            max_loras=1))
    _check_against_peft(smollm_folder, adapters, prompts, names, results)


def test_prefix_cache_never_crosses_adapters(smollm, smollm_folder, adapters):
    model, tokenizer = smollm
    prompt = make_prompts(tokenizer, 1)[0]  # a chat prompt of several blocks (as in the tests above)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)

    async def go():
        engine = await started(model, tokenizer, max_num_seqs=4, num_kv_blocks=128, block_size=16)
        try:
            for name in ("attn", "mlp"):
                engine.loras.load(name, str(adapters[name]))
            first = await collect(engine, prompt, params, "a1", lora="attn")
            other = await collect(engine, prompt, params, "m1", lora="mlp")
            base = await collect(engine, prompt, params, "b1")
            again = await collect(engine, prompt, params, "a2", lora="attn")
            # Unloaded and loaded again under the same name: another adapter for the cache.
            engine.loras.unload("attn")
            engine.loras.load("attn", str(adapters["mlp"]))
            renamed = await collect(engine, prompt, params, "a3", lora="attn")
            return first, other, base, again, renamed
        finally:
            await engine.shutdown()

    first, other, base, again, renamed = run(go())
    assert len(prompt) > 32
    assert first.num_cached_tokens == 0
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert again.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert renamed.num_cached_tokens == 0
    assert other.token_ids[0] == renamed.token_ids[0]
    assert len(check_greedy(smollm_folder, adapters["mlp"], prompt, other.token_ids[0])) <= 1


def _rewrite(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(src / "adapter_model.safetensors")
    if tensors is not None:
        weights = tensors(weights)
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


def test_bad_adapters_are_refused_at_load(smollm, adapters, tmp_path):
    model, tokenizer = smollm
    good = adapters["attn"]
    q_a = next(k for k in load_file(good / "adapter_model.safetensors") if "layers.0.self_attn.q_proj.lora_A" in k)

    def widen(w):  # A of layer 0's q_proj for another hidden size
        w[q_a] = torch.randn(w[q_a].shape[0], w[q_a].shape[1] + 64)
        return w

    def extra_layer(w):
        w[q_a.replace("layers.0.", "layers.99.")] = w[q_a].clone()
        w[q_a.replace("layers.0.", "layers.99.").replace("lora_A", "lora_B")] = w[q_a.replace("lora_A", "lora_B")].clone()
        return w

    def drop_b(w):
        del w[q_a.replace("lora_A", "lora_B")]
        return w

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    cases = [
        (tmp_path / "nowhere", AdapterNotFoundError, "no folder"),
        (no_weights, AdapterNotFoundError, "no adapter_model.safetensors"),
        (adapters["all"], None, None),  # rank 4 under the limit below: loads
        (_rewrite(good, tmp_path / "wide", tensors=widen), AdapterError, "another base model"),
        (_rewrite(good, tmp_path / "layer99", tensors=extra_layer), AdapterError, "no module layers.99.q_proj"),
        (_rewrite(good, tmp_path / "c_attn", {"target_modules": ["c_attn", "q_proj"]}), AdapterError,
         "1 of its target modules are not in the base model"),  # the config's names are not echoed
        (_rewrite(good, tmp_path / "half", tensors=drop_b), AdapterError, "without its pair"),
        (_rewrite(good, tmp_path / "dora", {"use_dora": True}), AdapterError, "DoRA"),
        (good, AdapterError, "rank 8 (layers.0.k_proj) is over --max-lora-rank 4"),
    ]

    async def go():
        engine = await started(model, tokenizer, num_kv_blocks=32, max_lora_rank=4)
        try:
            for i, (path, error, words) in enumerate(cases):
                if error is None:
                    engine.loras.load(f"ok{i}", str(path))
                    continue
                with pytest.raises(error) as info:
                    engine.loras.load(f"bad{i}", str(path))
                assert words in str(info.value) and f"bad{i}" in str(info.value)
            with pytest.raises(AdapterError, match="already been loaded"):
                engine.loras.load("ok2", str(adapters["all"]))
            assert [a.name for a in engine.loras.list()] == ["ok2"]
            with pytest.raises(InvalidRequestError) as info:
                engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "x", lora="bad0")
            assert info.value.code == "model_not_found"
            # the engine still serves the base and the good adapter
            out = await collect(engine, [1, 2, 3], SamplingParams(max_tokens=2, temperature=0), "y", lora="ok2")
            assert len(out.token_ids[0]) == 2
        finally:
            await engine.shutdown()

    run(go())


def test_transformers_path_refuses_adapters(smollm, adapters):
    model, tokenizer = smollm

    async def go():
        engine = await started(model, tokenizer, num_kv_blocks=32, forward="transformers")
        try:
            with pytest.raises(AdapterError, match="need the decoder forward"):
                engine.loras.load("a", str(adapters["attn"]))
        finally:
            await engine.shutdown()

    run(go())
