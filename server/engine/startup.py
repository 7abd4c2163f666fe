"""What the runner does once before serving: measure the GPU's memory for the KV budget, warm every
kernel up, autotune the 4-bit matmuls and capture the decode graphs (GPU), each phase timed
(runner.startup_seconds, shown on /v1/memory)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from . import cuda_graphs, kv_cache
from .models import decoder, vocab_size
from .scheduler import ScheduledBatch
from .sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from .model_runner import ModelRunner

logger = logging.getLogger(__name__)

MIB = 2**20
# What each captured graph holds besides the activations in the shared pool (its nodes, kernel
# parameters): an allowance in the KV budget; the measured total is reported after capture.
GRAPH_ALLOWANCE_BYTES = 4 * MIB


def tune_buckets(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Row counts whose 4-bit matmul kernels a server can meet: every power of two up to the largest
    step (the kernels' autotuning key rounds M up to a power of two, so these cover every M)."""
    top = max(max_num_seqs, max_num_batched_tokens)
    buckets, m = [], 1
    while m < top:
        buckets.append(m)
        m *= 2
    buckets.append(m)
    return buckets


def no_graphs_reason(runner: "ModelRunner") -> str | None:
    """Why decode steps are not captured as CUDA graphs (None: they are)."""
    if runner.device.type != "cuda":
        return f"the model is on {runner.device}"
    if runner.config.enforce_eager:
        return "--enforce-eager"
    if runner.attention.name != "triton":
        return f"attention backend {runner.attention.name} (graphs replay the Triton backend's buffers)"
    if not isinstance(runner.model, decoder.DecoderModel):
        return "the model runs through transformers' modules (forward 'transformers')"
    if runner.length_dependent_rope:
        return "rope frequencies that depend on the sequence length (per-step state)"
    if any(lin.int8 is not None for layer in runner.model.layers
           for lin in (layer.qkv, layer.o_proj, layer.up, layer.down)):
        return "LLM.int8 weights (their outlier split depends on each step's activations)"
    return None


def profile_gpu_budget(runner: "ModelRunner") -> int:
    """KV bytes from --gpu-memory-utilization, after measuring one step's peak activations (a
    prefill chunk of max_num_batched_tokens on a scratch cache) and allowing for the graphs."""
    config, dev = runner.config, runner.device
    start = time.perf_counter()
    tokens = config.max_num_batched_tokens
    blocks = -(-tokens // config.block_size)
    layers, kv_heads, head_dim = runner.cache_shape
    runner.cache = kv_cache.KVCache(blocks, layers, config.block_size, kv_heads, head_dim, runner.kv_dtype, dev)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    seq = Sequence("profile", [0] * tokens, SamplingParams(max_tokens=1))
    seq.block_table = list(range(blocks))
    runner.run(ScheduledBatch([seq], [tokens], [True]))
    runner.release(seq)
    torch.cuda.synchronize(dev)
    # + the float32 logits of a full decode batch and the sampler's copy of them
    activations = torch.cuda.max_memory_allocated(dev) - base + 2 * config.max_num_seqs * vocab_size(runner.hf_model) * 4
    del runner.cache
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    graphs = 0
    if no_graphs_reason(runner) is None:
        ladder = cuda_graphs.batch_ladder(config.max_num_seqs)
        # the pool holds the largest captured batch's activations: they scale with its rows
        graphs = int(activations * min(1.0, config.max_num_seqs / tokens)) + GRAPH_ALLOWANCE_BYTES * len(ladder)
    budget = kv_cache.gpu_budget(total, config.gpu_memory_utilization, total - free, activations, graphs)
    runner.memory_plan.update({"total_bytes": total, "gpu_memory_utilization": config.gpu_memory_utilization,
                               "in_use_before_kv_bytes": total - free, "activation_peak_bytes": activations,
                               "cuda_graph_estimate_bytes": graphs, "kv_cache_budget_bytes": max(budget, 0)})
    runner.startup_seconds["profile"] = time.perf_counter() - start
    return budget


@torch.inference_mode()
def warmup(runner: "ModelRunner", max_model_len: int) -> None:
    """One prefill and one decode on a scratch sequence (kernels built, caches warm); the blocks it
    used are zeroed again afterwards. On a GPU then: every 4-bit matmul shape x row bucket tuned
    (choices cached on disk) and the decode graphs captured; each phase timed."""
    start = time.perf_counter()
    _warmup_step(runner)
    runner.startup_seconds["warmup"] = time.perf_counter() - start
    runner.graphs_off = no_graphs_reason(runner)
    if runner.device.type != "cuda":
        return
    start = time.perf_counter()
    tune(runner)
    runner.startup_seconds["tune"] = time.perf_counter() - start
    if runner.graphs_off is None:
        start = time.perf_counter()
        try:
            capture_graphs(runner, max_model_len)
        except RuntimeError as exc:  # e.g. an op that syncs with the host: serve eagerly, shown on /health
            runner.graphs, runner.graphs_off = None, f"capture failed: {exc}"
            logger.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
        runner.startup_seconds["capture"] = time.perf_counter() - start
    else:
        logger.info("CUDA graphs off: %s", runner.graphs_off)
    logger.info("startup on %s: %s", runner.device,
                ", ".join(f"{k} {v:.1f} s" for k, v in runner.startup_seconds.items()))


def _warmup_step(runner: "ModelRunner") -> None:
    n = max(1, min(runner.block_size, 8) - 1)
    num_blocks = -(-(n + 1) // runner.block_size)
    if num_blocks > runner.num_blocks:
        return
    seq = Sequence("warmup", [0] * n, SamplingParams(max_tokens=2))
    seq.block_table = list(range(num_blocks))
    runner.run(ScheduledBatch([seq], [n], [True]))
    seq.num_computed_tokens = n
    seq.token_ids.append(0)
    runner.run(ScheduledBatch([seq], [1], [True]))
    runner.release(seq)
    runner.cache.zero(num_blocks)


def tune(runner: "ModelRunner") -> int:
    """Autotune every 4-bit matmul of the model for every row bucket a step can have, starting
    from the choices saved for this GPU, and save them back; afterwards a key never met here
    takes the heuristic configuration instead of tuning inside a served step. Returns the
    number of (shape, bucket) calls made."""
    if not isinstance(runner.model, decoder.DecoderModel):
        return 0
    from quantserve.kernels.triton import ops, tune_cache

    path = tune_cache.cache_path(torch.cuda.get_device_name(runner.device))
    restored = tune_cache.load(ops.tuners(), path)
    shapes = {}
    for layer in runner.model.layers:
        for linear in (layer.qkv, layer.o_proj, layer.up, layer.down):
            linear = getattr(linear, "base", linear)  # under its LoRA wrapper
            state = linear.state
            if state is not None:  # 4-bit
                shapes.setdefault((tuple(state.shape), state.blocksize, state.quant_type, linear.compute_dtype),
                                  linear)
    calls = 0
    ops.TUNE_NEW_KEYS = True  # this model's shapes may be new to the tuners
    try:
        for linear in shapes.values():
            for m in tune_buckets(runner.config.max_num_seqs, runner.config.max_num_batched_tokens):
                linear(torch.zeros(m, linear.state.shape[1], dtype=linear.compute_dtype, device=runner.device))
                calls += 1
        torch.cuda.synchronize(runner.device)
    finally:  # a served step must never autotune
        ops.TUNE_NEW_KEYS = False
    saved = tune_cache.save(ops.tuners(), path)
    logger.info("4-bit matmuls tuned: %d shapes x row buckets, %d choices restored from %s, %d saved",
                calls, restored, path, saved)
    return calls


def capture_graphs(runner: "ModelRunner", max_model_len: int) -> None:
    """CUDA graphs of the decode step for every batch size of the ladder (cuda_graphs.py)."""
    from quantserve.kernels.triton import ops

    from .attention import triton as triton_attention

    kvh = runner.attention.num_kv_heads
    width = -(-max_model_len // runner.block_size)

    def splits_for(size: int) -> int:
        return ops.decode_splits(size, kvh, max_model_len, block_n=triton_attention.BLOCK_N)

    def forward(step):
        return runner.model.forward_logits(step, runner.kv_caches)

    graphs = cuda_graphs.DecodeGraphs(forward, cuda_graphs.batch_ladder(runner.config.max_num_seqs), width,
                                      runner.device, splits_for)
    torch.cuda.synchronize(runner.device)
    free_before = torch.cuda.mem_get_info(runner.device)[0]
    graphs.capture()
    used = free_before - torch.cuda.mem_get_info(runner.device)[0]
    runner.memory_plan["cuda_graph_bytes"] = used
    estimate = runner.memory_plan.get("cuda_graph_estimate_bytes")
    if estimate is not None and used > estimate:
        logger.warning("CUDA graphs took %.0f MiB, more than the %.0f MiB allowed for them in the KV budget",
                       used / MIB, estimate / MIB)
    runner.graphs = graphs
    logger.info("CUDA graphs: decode batch sizes %s captured (%.0f MiB)", graphs.ladder, used / MIB)
