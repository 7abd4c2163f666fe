"""The model runner: the only code that touches the device.

It owns the KV cache tensors, turns a ScheduledBatch into flat batch tensors once per step
(decode tokens first, then prefill chunks; no padding), runs the model, and samples the next
token of every sequence whose step reached its end. Logits are computed only for those rows.
The model's input embedding and output head are first brought to 16 bits (models/sixteen_bit.py),
and `weight_memory()` counts every byte the model and its adapter hold, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Optional

import torch
from torch import nn

from quantserve.kernels.cpu import paged_attention as native
from . import cuda_graphs, triton_attention
from .attention import AttentionMetadata, PrefillChunk
from .config import EngineConfig
from .models import build_model
from .models import lora_layers
from .models.llama import LlamaModel
from .models.sixteen_bit import compute_dtype, to_16bit
from .outputs import TokenLogprob
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import SamplingParams, Sequence

logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # of float32 keys/values: see default_cpu_kv_budget


def default_cpu_kv_budget(element_size: int) -> float:
    """Bytes of the default CPU KV cache: as many tokens as 1 GiB of float32 holds (~23k tokens of the
    default model, 64 chats of prompt + answer), whatever the cache dtype, so 0.5 GiB at 16 bits. A
    server that keeps running touches all of its cache (free blocks go out never-used first), so the
    budget is resident memory: 1 GiB of bf16 put the default server's peak RSS at 64 streams above
    llama-server's (1.45 vs 1.38 GB, bench/peers.py)."""
    return DEFAULT_CPU_KV_CACHE_GIB * GIB * element_size / 4
# What each captured graph holds besides the activations in the shared pool (its nodes, kernel
# parameters): an allowance in the KV budget; the measured total is reported after capture.
GRAPH_ALLOWANCE_BYTES = 4 * MIB


def device_guard(device: torch.device):
    """Make `device` current for the block: Triton launches and torch.cuda calls without an explicit
    device go to the current one (cuda:0 unless set), so --device cuda:N needs this around all work."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kv_budget_bytes(total: int, utilization: float, in_use: int, activations: int, graphs: int) -> int:
    """The KV cache's share of a GPU, as vLLM computes it: `utilization` of the device's total memory,
    less what is already in use (weights, CUDA context, other processes), one step's peak activations
    and the CUDA graphs' pool."""
    return int(total * utilization) - in_use - activations - graphs


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


def triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton attention path cannot run on `device` (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "on a CPU the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1 before starting"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before the process starts"
    return None


# --kv-cache-dtype names -> torch dtypes (vLLM's: "fp8" is fp8_e4m3, OCP's e4m3fn: no infinities, max 448).
KV_CACHE_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def triton_fp8_unusable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton attention cannot run on an fp8 cache on `device` (None: it can). Triton
    compiles fp8 e4m3 (its fp8e4nv) for NVIDIA GPUs of compute capability 8.9+, e5m2 from 8.0. The
    CPU interpreter reads fp8 right but its float32 -> fp8 stores do not round as torch does
    (against .to() on randn values: 2.4% of e4m3 and 4.9% of e5m2 bytes differ), so the KV write
    would store other values. (Its bf16 stores truncate too, half the values one ulp off: bf16
    stays allowed, the interpreter being a test mode whose bf16 arithmetic is known wrong.)"""
    if device.type != "cuda":
        return "the Triton interpreter's float32 -> fp8 stores do not round to nearest as torch does"
    need = (8, 9) if dtype == torch.float8_e4m3fn else (8, 0)
    have = torch.cuda.get_device_capability(device)
    if have < need:
        return f"needs a GPU of compute capability {need[0]}.{need[1]}+ (this one is {have[0]}.{have[1]})"
    return None


@dataclasses.dataclass
class StepResult:
    token_ids: list[Optional[int]]  # per batch entry: the sampled token, None if it did not sample
    logprobs: list[Optional[TokenLogprob]]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The model's device and compute dtype (that of its hidden states and KV cache)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    param = embed.weight if embed is not None else next(model.parameters())
    return param.device, compute_dtype(model)


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        self.config = config
        self.device, self.dtype = model_device_dtype(model)
        model.eval()
        to_16bit(model, self.dtype)  # in place: transformers' own forward computes the same
        self.hf_model = model
        self.model = build_model(model, config.model_impl)
        # LoRA adapters apply on the native forward's fused linears (models/lora_layers.py); the
        # transformers path serves none (lora_unsupported says why).
        self.lora: Optional[lora_layers.LoRAState] = None
        self.lora_unsupported: Optional[str] = None
        if isinstance(self.model, LlamaModel):
            self.lora = lora_layers.attach(self.model)
        else:
            self.lora_unsupported = (f"LoRA adapters need the native forward; {type(model).__name__} is served "
                                     "through transformers' modules (model_impl 'transformers', or a family the "
                                     "native forward does not cover)")
        # Every layer slides: blocks before the window of a sequence's next token can be freed.
        self.sliding_window: Optional[int] = getattr(self.model, "sliding_window", None)
        # Rope frequencies that depend on the sequence length make a position's keys depend on
        # more than the tokens before it: such KV blocks cannot be shared by prefix.
        self.length_dependent_rope = bool(getattr(self.model, "length_dependent_rope", False))
        self.supports_prefix_caching = not self.length_dependent_rope
        self.recompute_above: Optional[int] = getattr(self.model, "recompute_above", None)
        if self.length_dependent_rope:
            logger.info("prefix caching off: the model's rope frequencies depend on the sequence length")
        self.block_size = config.block_size
        layers, kv_heads, head_dim = self.model.num_layers, self.model.num_kv_heads, self.model.head_dim
        self.attention_backend = self._attention_backend(config.attention_backend)
        self.kv_dtype = self._kv_cache_dtype(config.kv_cache_dtype)
        # The KV budget counts the cache dtype's bytes: 16 bits hold twice the tokens of float32.
        self.bytes_per_block = 2 * layers * config.block_size * kv_heads * head_dim * self.kv_dtype.itemsize
        # Decode attention reading the paged cache in place (CPU, float32), else PyTorch's sdpa.
        self.native_attention = self.attention_backend == "native"
        self.graphs: Optional[cuda_graphs.DecodeGraphs] = None
        self.startup_seconds: dict[str, float] = {}  # by phase: profile, tune, capture
        self.memory_plan: dict[str, float] = {}  # how the GPU's memory was shared out (/v1/memory)
        with device_guard(self.device):
            self.num_blocks = self._num_blocks(model)
            self._allocate_cache(self.num_blocks)
        if self.memory_plan:
            self.memory_plan["kv_cache_bytes"] = self.num_blocks * self.bytes_per_block
        self.sampler = Sampler(self.device, config.seed)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s, %s); attention: %s", self.num_blocks,
                    config.block_size, self.num_blocks * self.bytes_per_block / GIB, self.device,
                    str(self.kv_dtype).removeprefix("torch."), self.attention_backend)

    def _kv_cache_dtype(self, wanted: str) -> torch.dtype:
        """The cache's torch dtype for --kv-cache-dtype on the chosen attention path (auto: bfloat16
        where the native CPU kernel runs, else the compute dtype, as vLLM's auto on CUDA). A
        combination that path cannot run is refused here, at startup."""
        if wanted == "auto":
            return torch.bfloat16 if self.attention_backend == "native" else self.dtype
        dtype = KV_CACHE_TORCH_DTYPES[wanted]
        if self.attention_backend == "triton" and dtype.itemsize == 1:
            reason = triton_fp8_unusable(self.device, dtype)
            if reason is not None:
                raise ValueError(f"kv_cache_dtype {wanted!r} with the Triton attention: {reason}; "
                                 "use bfloat16 / float16, or attention_backend 'torch'")
        return dtype

    def _attention_backend(self, wanted: str) -> str:
        kvh, d = self.model.num_kv_heads, self.model.head_dim
        probe = torch.empty((1, self.config.block_size, kvh, d), dtype=self.dtype, device=self.device)
        # float32 queries (the kernel's arithmetic); the cache may hold any dtype it converts
        native_ok = self.device.type == "cpu" and self.dtype == torch.float32 \
            and native.supported(probe, self.model.num_heads) and native.load() is not None
        if wanted == "auto":
            if self.device.type == "cuda" and triton_unusable(self.device) is None:
                return "triton"
            return "native" if native_ok else "torch"
        if wanted == "native" and not native_ok:
            raise ValueError("attention_backend 'native' needs a CPU, float32 and the C++ kernel built")
        if wanted == "triton":
            reason = triton_unusable(self.device)
            if reason is not None:
                raise ValueError(f"attention_backend 'triton': {reason}")
        return wanted

    def _allocate_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        layers, kv_heads, head_dim = self.model.num_layers, self.model.num_kv_heads, self.model.head_dim
        bs = self.config.block_size
        # [layers, 2, blocks, block_size, kv_heads, head_dim]. On CPU the memory is left
        # untouched (no RSS) until blocks are first used; they are zeroed then (see _zero_new_blocks):
        # masked slots must hold finite numbers, since softmax weight 0 times NaN is NaN.
        shape = (layers, 2, num_blocks, bs, kv_heads, head_dim)
        if self.device.type == "cpu":
            self.kv_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
            native.advise_huge_pages(self.kv_cache)  # before the first touch (see _zero_new_blocks)
            self._zeroed_blocks = 0
            self._zero_new_blocks(0)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            self._zeroed_blocks = num_blocks
        # Keys transposed within a block (see attention.py): [blocks, KVH, D, block_size].
        self.kv_caches = [(self.kv_cache[i, 0].view(num_blocks, kv_heads, head_dim, bs), self.kv_cache[i, 1])
                          for i in range(layers)]

    # ------------------------------------------------------------------------------ memory

    def _num_blocks(self, model: nn.Module) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_memory_gib is not None:
            budget = config.kv_cache_memory_gib * GIB
        elif self.device.type == "cuda":
            budget = self._gpu_budget(model)
        else:
            budget = default_cpu_kv_budget(self.kv_dtype.itemsize)
        blocks = int(budget // self.bytes_per_block)
        if blocks < 1:
            raise ValueError(
                f"the KV cache budget ({budget / GIB:.3f} GiB) holds no block of {self.bytes_per_block} bytes; "
                "give more memory (kv_cache_memory_gib / gpu_memory_utilization)"
            )
        return blocks

    def _gpu_budget(self, model: nn.Module) -> int:
        """KV bytes from --gpu-memory-utilization, after measuring one step's peak activations (a
        prefill chunk of max_num_batched_tokens on a scratch cache) and allowing for the graphs."""
        config, dev = self.config, self.device
        start = time.perf_counter()
        self.sampler = Sampler(dev, config.seed)
        tokens = config.max_num_batched_tokens
        blocks = -(-tokens // config.block_size)
        self._allocate_cache(blocks)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        seq = Sequence("profile", [0] * tokens, SamplingParams(max_tokens=1))
        seq.block_table = list(range(blocks))
        self.run(ScheduledBatch([seq], [tokens], [True]))
        self.release(seq)
        torch.cuda.synchronize(dev)
        # + the float32 logits of a full decode batch and the sampler's copy of them
        activations = torch.cuda.max_memory_allocated(dev) - base + 2 * config.max_num_seqs * vocab_size(model) * 4
        del self.kv_cache, self.kv_caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        graphs = 0
        if self._no_graphs_reason() is None:
            ladder = cuda_graphs.batch_ladder(config.max_num_seqs)
            # the pool holds the largest captured batch's activations: they scale with its rows
            graphs = int(activations * min(1.0, config.max_num_seqs / tokens)) + GRAPH_ALLOWANCE_BYTES * len(ladder)
        budget = kv_budget_bytes(total, config.gpu_memory_utilization, total - free, activations, graphs)
        self.memory_plan = {"total_bytes": total, "gpu_memory_utilization": config.gpu_memory_utilization,
                            "in_use_before_kv_bytes": total - free, "activation_peak_bytes": activations,
                            "cuda_graph_estimate_bytes": graphs, "kv_cache_budget_bytes": max(budget, 0)}
        self.startup_seconds["profile"] = time.perf_counter() - start
        return budget

    def _zero_new_blocks(self, max_block: int) -> None:
        if max_block >= self._zeroed_blocks:
            self.kv_cache[:, :, self._zeroed_blocks : max_block + 1].zero_()
            self._zeroed_blocks = max_block + 1

    # ------------------------------------------------------------------------------ steps

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        decodes = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        prefills = [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
        order = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        rope_lengths: list[int] = []
        slots: list[int] = []
        last_row = [0] * len(batch)
        max_block = 0
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if self.length_dependent_rope:  # as transformers' generate: the prompt at once, then per token
                rope_lengths.extend([seq.num_tokens] * n)
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            last_row[i] = len(input_ids) - 1
            if table:
                max_block = max(max_block, max(table))
        if self._zeroed_blocks < self.num_blocks:
            self._zero_new_blocks(max_block)
        if self.lora is not None:  # the rows of each adapter, in the flattened order
            self.lora.batch = lora_layers.step_batch([batch.seqs[i].lora for i in order],
                                                     [batch.num_new_tokens[i] for i in order], self.device)

        dev = self.device
        long = dict(dtype=torch.long, device=dev)
        sample_idx = [i for i, s in enumerate(batch.sample) if s]
        rows = torch.tensor([last_row[i] for i in sample_idx], **long)
        rope = torch.tensor(rope_lengths, **long) if self.length_dependent_rope else None
        if self.attention_backend == "triton":
            slot_mapping = torch.tensor(slots, **long)
            meta = AttentionMetadata(slot_mapping=slot_mapping, slot_blocks=slot_mapping, slot_offsets=slot_mapping,
                                     num_decodes=len(decodes), decode_block_tables=None, decode_context_lens=None,
                                     decode_mask=None, prefills=[], num_tokens=len(input_ids), rope_lengths=rope,
                                     triton=self._triton_plan(batch, order))
            return torch.tensor(input_ids, **long), torch.tensor(positions, **long), meta, rows, sample_idx
        nd = len(decodes)
        decode_tables = decode_lens = decode_mask = None
        if nd:
            ctx = [batch.seqs[i].num_computed_tokens + 1 for i in decodes]
            max_blocks = -(-max(ctx) // bs)
            flat: list[int] = []
            for i in decodes:
                table = batch.seqs[i].block_table[:max_blocks]
                flat.extend(max(b, 0) for b in table)  # -1: freed before every window; never read
                flat.extend([0] * (max_blocks - len(table)))
            decode_tables = torch.tensor(flat, **long).view(nd, max_blocks)
            decode_lens = torch.tensor(ctx, **long)
            if not self.native_attention:
                decode_mask = (torch.arange(max_blocks * bs, device=dev).unsqueeze(0)
                               < decode_lens.unsqueeze(1)).view(nd, 1, 1, max_blocks * bs)
        chunks = []
        row = nd
        for i in prefills:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            context = start + n
            block_ids = torch.tensor([max(b, 0) for b in seq.block_table[: -(-context // bs)]], **long) \
                if start else None
            chunks.append(PrefillChunk(row, n, context, block_ids))
            row += n
        slot_mapping = torch.tensor(slots, **long)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            slot_blocks=torch.div(slot_mapping, bs, rounding_mode="floor"),
            slot_offsets=torch.remainder(slot_mapping, bs),
            num_decodes=nd,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            decode_mask=decode_mask,
            prefills=chunks,
            num_tokens=len(input_ids),
            native_decode=self.native_attention,
            rope_lengths=rope,
        )
        return torch.tensor(input_ids, **long), torch.tensor(positions, **long), meta, rows, sample_idx

    def _triton_plan(self, batch: ScheduledBatch, order: list[int]) -> triton_attention.TritonPlan:
        """Work items of the Triton kernel: each sequence's rows (in the flattened order) with the
        blocks covering its context; -1 (freed, before every window) becomes block 0, never read."""
        bs = self.block_size
        entries, row = [], 0
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            context = seq.num_computed_tokens + n
            table = [max(b, 0) for b in seq.block_table[: -(-context // bs)]]
            entries.append(triton_attention.Entry(row, n, context, table))
            row += n
        group = self.model.num_heads // self.model.num_kv_heads
        return triton_attention.build_plan(entries, group, self.model.num_kv_heads, self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        tokens: list[Optional[int]] = [None] * len(batch)
        logprobs: list[Optional[TokenLogprob]] = [None] * len(batch)
        sample_idx = [i for i, s in enumerate(batch.sample) if s]
        sampling = [batch.seqs[i] for i in sample_idx]
        self.sampler.prepare(sampling)  # grammar masks are built while the model runs
        logits = self._replay(batch) if self.graphs is not None and self._graphable(batch) else None
        if logits is not None:
            logits = logits if len(sample_idx) == len(batch) else logits[sample_idx]
        else:
            input_ids, positions, meta, rows, sample_idx = self._prepare(batch)
            logits = self.model.forward_logits(input_ids, positions, meta, self.kv_caches, rows)
        if sample_idx:
            sampled, lps = self.sampler(logits, sampling)
            for j, i in enumerate(sample_idx):
                tokens[i] = sampled[j]
                logprobs[i] = lps[j]
        return StepResult(tokens, logprobs)

    def _graphable(self, batch: ScheduledBatch) -> bool:
        """A decode-only step without LoRA rows (their per-step state is not in the graphs' buffers)."""
        return all(n == 1 for n in batch.num_new_tokens) and all(s.lora is None for s in batch.seqs)

    def _replay(self, batch: ScheduledBatch, eager: bool = False) -> Optional[torch.Tensor]:
        """float32 logits [len(batch), V] from the captured graph of the batch's padded size (None if
        none holds it). eager: the same padded static inputs without a graph (CPU tests)."""
        bs = self.block_size
        ids, positions, slots, contexts, tables = [], [], [], [], []
        for seq in batch.seqs:
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            contexts.append(p + 1)
            tables.append([max(b, 0) for b in seq.block_table[: p // bs + 1]])
        if self._zeroed_blocks < self.num_blocks:
            self._zero_new_blocks(max(max(t) for t in tables))
        if self.lora is not None:
            self.lora.batch = None
        return self.graphs.replay(ids, positions, slots, contexts, tables, eager=eager)

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its seeded generator) once it has finished."""
        self.sampler.release(seq)

    @torch.inference_mode()
    def warmup(self, max_model_len: Optional[int] = None) -> None:
        """One prefill and one decode on a scratch sequence (kernels built, caches warm); the
        blocks it used are zeroed again afterwards. On a GPU then: every 4-bit matmul shape x row
        bucket tuned (choices cached on disk) and the decode graphs captured; each phase timed."""
        with device_guard(self.device):
            start = time.perf_counter()
            self._warmup_step()
            self.startup_seconds["warmup"] = time.perf_counter() - start
            if self.device.type != "cuda":
                return
            start = time.perf_counter()
            self.tune()
            self.startup_seconds["tune"] = time.perf_counter() - start
            reason = self._no_graphs_reason()
            if reason is None:
                start = time.perf_counter()
                try:
                    self.capture_graphs(max_model_len or self.capacity_tokens)
                except RuntimeError as exc:  # e.g. an op that syncs with the host: serve eagerly, say why
                    self.graphs = None
                    logger.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
                self.startup_seconds["capture"] = time.perf_counter() - start
            else:
                logger.info("CUDA graphs off: %s", reason)
            logger.info("startup on %s: %s", self.device,
                        ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_seconds.items()))

    def _no_graphs_reason(self) -> Optional[str]:
        if self.config.enforce_eager:
            return "--enforce-eager"
        if self.attention_backend != "triton":
            return f"attention backend {self.attention_backend} (graphs replay the Triton path's buffers)"
        if not isinstance(self.model, LlamaModel):
            return "the model runs through transformers' modules (model_impl 'transformers')"
        if self.length_dependent_rope:
            return "rope frequencies that depend on the sequence length (per-step state)"
        if any(lin.int8 is not None for layer in self.model.layers
               for lin in (layer.qkv, layer.o_proj, layer.up, layer.down)):
            return "LLM.int8 weights (their outlier split depends on each step's activations)"
        return None

    def _warmup_step(self) -> None:
        n = max(1, min(self.block_size, 8) - 1)
        num_blocks = -(-(n + 1) // self.block_size)
        if num_blocks > self.num_blocks:
            return
        seq = Sequence("warmup", [0] * n, SamplingParams(max_tokens=2))
        seq.block_table = list(range(num_blocks))
        self.run(ScheduledBatch([seq], [n], [True]))
        seq.num_computed_tokens = n
        seq.token_ids.append(0)
        self.run(ScheduledBatch([seq], [1], [True]))
        self.release(seq)
        self.kv_cache[:, :, :num_blocks].zero_()

    def tune(self) -> int:
        """Autotune every 4-bit matmul of the model for every row bucket a step can have, starting
        from the choices saved for this GPU, and save them back; afterwards a key never met here
        takes the heuristic configuration instead of tuning inside a served step. Returns the
        number of (shape, bucket) calls made."""
        if not isinstance(self.model, LlamaModel):
            return 0
        from quantserve.kernels.triton import ops, tune_cache

        path = tune_cache.cache_path(torch.cuda.get_device_name(self.device))
        restored = tune_cache.load(ops.tuners(), path)
        ops.TUNE_NEW_KEYS = True  # this model's shapes may be new to the tuners
        shapes = {}
        for layer in self.model.layers:
            for linear in (layer.qkv, layer.o_proj, layer.up, layer.down):
                state = linear.state
                if state is not None:  # 4-bit
                    shapes.setdefault((tuple(state.shape), state.blocksize, state.quant_type, linear.compute_dtype),
                                      linear)
        calls = 0
        for linear in shapes.values():
            for m in tune_buckets(self.config.max_num_seqs, self.config.max_num_batched_tokens):
                linear(torch.zeros(m, linear.state.shape[1], dtype=linear.compute_dtype, device=self.device))
                calls += 1
        torch.cuda.synchronize(self.device)
        saved = tune_cache.save(ops.tuners(), path)
        ops.TUNE_NEW_KEYS = False
        logger.info("4-bit matmuls tuned: %d shapes x row buckets, %d choices restored from %s, %d saved",
                    calls, restored, path, saved)
        return calls

    def capture_graphs(self, max_model_len: int) -> None:
        """CUDA graphs of the decode step for every batch size of the ladder (cuda_graphs.py)."""
        from quantserve.kernels.triton import ops

        kvh = self.model.num_kv_heads
        width = -(-max_model_len // self.block_size)

        def splits_for(size: int) -> int:
            return ops.decode_splits(size, kvh, max_model_len, block_n=triton_attention.BLOCK_N)

        def forward(ids, positions, meta, rows):
            return self.model.forward_logits(ids, positions, meta, self.kv_caches, rows)

        if self.lora is not None:
            self.lora.batch = None
        graphs = cuda_graphs.DecodeGraphs(forward, cuda_graphs.batch_ladder(self.config.max_num_seqs), width,
                                          self.device, splits_for)
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        graphs.capture()
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.memory_plan["cuda_graph_bytes"] = used
        estimate = self.memory_plan.get("cuda_graph_estimate_bytes")
        if estimate is not None and used > estimate:
            logger.warning("CUDA graphs took %.0f MiB, more than the %.0f MiB allowed for them in the KV budget",
                           used / MIB, estimate / MIB)
        self.graphs = graphs
        logger.info("CUDA graphs: decode batch sizes %s captured (%.0f MiB)", graphs.ladder, used / MIB)

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence the KV cache can hold: all its blocks, or, where every layer slides
        (blocks behind the window are freed), unbounded once one window and one step's tokens fit."""
        cache = self.num_blocks * self.block_size
        if self.sliding_window is None:
            return cache
        need = -(-(self.sliding_window + self.config.max_num_batched_tokens) // self.block_size) + 1
        return 2**62 if need <= self.num_blocks else cache

    def weight_memory(self) -> dict[str, int]:
        """Bytes the model and its adapter hold (KV cache aside), each storage counted once and
        whole: {"total": ..., "<dtype>": ...}. This is what stays resident while serving.
        Counted once (walking every tensor takes ~20 ms, and the console polls /v1/memory and
        /metrics every second); the weights do not change while serving."""
        cached = getattr(self, "_weight_memory", None)
        if cached is None:
            cached = self._weight_memory = resident_bytes(self.hf_model, self.model)
        return dict(cached)


def resident_bytes(*objects: object) -> dict[str, int]:
    """Unique storages reachable from `objects` (modules: parameters, buffers and 4-bit states;
    other objects: their attributes, containers and closures), by dtype and in total."""
    storages: dict[int, tuple[int, str]] = {}
    seen: set[int] = set()

    def add(t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).removeprefix("torch.")))

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)) \
                or getattr(obj, "holds_no_weights", False):  # e.g. the fused step's scratch
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
            visit(getattr(obj, "quant_state", None), depth + 1)
            visit(getattr(obj, "SCB", None), depth + 1)  # an int8 weight's row scales (Int8Params)
        elif isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t, depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                visit(cell.cell_contents, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("quantserve", "dataclasses")):
            visit(vars(obj), depth + 1)
        elif hasattr(obj, "__dataclass_fields__"):
            visit([getattr(obj, f) for f in obj.__dataclass_fields__], depth + 1)

    for obj in objects:
        visit(obj, 0)
    out: dict[str, int] = {"total": 0}
    for nbytes, dtype in storages.values():
        out["total"] += nbytes
        out[dtype] = out.get(dtype, 0) + nbytes
    return out


def model_max_len(model: nn.Module, tokenizer: object = None) -> int:
    """The model's context length from its config (max_position_embeddings and relatives)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def vocab_size(model: nn.Module) -> int:
    embed = model.get_input_embeddings()
    return int(embed.weight.shape[0]) if embed is not None else int(math.inf)
