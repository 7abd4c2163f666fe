"""The model runner: the only code that touches the device.

At start it chooses, once, the attention backend (attention/) and the forward path
(forward_path.py), sizes and allocates the KV cache (kv_cache.py) and attaches LoRA support.
Per step it flattens the ScheduledBatch (decode tokens first, then prefill chunks; no padding),
builds the step's inputs once (step_inputs.py), runs the chosen forward (or replays a captured CUDA
graph of a decode step, cuda_graphs.py), and samples the next token of every sequence whose step
reached its end. Logits are computed only for those rows. Warm-up, autotuning, graph capture and
GPU memory profiling live in startup.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from . import cuda_graphs, kv_cache, startup
from .attention import SeqRows, StepLayout, select_backend
from .config import EngineConfig
from .forward_path import ForwardChoice, build_forward
from .models import decoder, lora_layers, serving_shape
from .models.sixteen_bit import compute_dtype, to_16bit
from .outputs import TokenLogprob
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .step_inputs import HostStep, StepInputs, build_inputs, flatten

logger = logging.getLogger(__name__)


def device_guard(device: torch.device):
    """Make `device` current for the block: Triton launches and torch.cuda calls without an explicit
    device go to the current one (cuda:0 unless set), so --device cuda:N needs this around all work."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclasses.dataclass
class StepResult:
    # Per batch entry: the sampled token, None if it did not sample; where the entry verified
    # drafts (batch.num_drafts), the list of tokens it emitted (accepted drafts, then one more)
    # and their logprobs as a list.
    token_ids: list[Optional[int | list[int]]]
    logprobs: list[Optional[TokenLogprob | list[TokenLogprob]]]


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
        heads, kv_heads, head_dim, layers = serving_shape(model)
        self.attention = select_backend(config.attention_backend, self.device, self.dtype, heads, kv_heads,
                                        head_dim, config.block_size)
        self.kv_dtype = kv_cache.cache_dtype(config.kv_cache_dtype, self.attention.name, self.dtype, self.device)
        self.forward: ForwardChoice
        self.model, self.forward = build_forward(model, config.forward, self.attention, self.kv_dtype)
        # LoRA adapters apply on the decoder forward's fused linears (models/lora_layers.py); the
        # transformers path serves none (lora_unsupported says why).
        self.lora: Optional[lora_layers.LoRAState] = None
        self.lora_unsupported: Optional[str] = None
        if isinstance(self.model, decoder.DecoderModel):
            self.lora = lora_layers.attach(self.model, self.device, self.dtype)
        else:
            self.lora_unsupported = (f"LoRA adapters need the decoder forward; {type(model).__name__} is served "
                                     "through transformers' modules (forward 'transformers')")
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
        self.bytes_per_block = kv_cache.block_bytes(layers, config.block_size, kv_heads, head_dim, self.kv_dtype)
        self.graphs: Optional[cuda_graphs.DecodeGraphs] = None
        self.graphs_off: Optional[str] = "not captured yet"  # why decode steps are not replayed from graphs
        self.steps = {"eager": 0, "graph": 0}  # decode steps replayed from a CUDA graph, and the rest
        self.startup_seconds: dict[str, float] = {}  # by phase: profile, warmup, tune, capture
        self.memory_plan: dict[str, float] = {}  # how the GPU's memory was shared out (/v1/memory)
        self.sampler = Sampler(self.device, config.seed)
        self.cache_shape = (layers, kv_heads, head_dim)
        with device_guard(self.device):
            num_blocks = self._num_blocks()
            self.cache = kv_cache.KVCache(num_blocks, layers, config.block_size, kv_heads, head_dim, self.kv_dtype,
                                          self.device)
        if self.memory_plan:
            self.memory_plan["kv_cache_bytes"] = self.cache.nbytes
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s, %s); attention: %s; forward: %s", num_blocks,
                    config.block_size, self.cache.nbytes / kv_cache.GIB, self.device,
                    str(self.kv_dtype).removeprefix("torch."), self.attention.name, self.forward.path)

    @property
    def attention_backend(self) -> str:
        return self.attention.name

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.cache.layers

    def _num_blocks(self) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory * kv_cache.GIB
        elif self.device.type == "cuda":
            budget = startup.profile_gpu_budget(self)
        else:
            budget = kv_cache.default_cpu_budget(self.kv_dtype.itemsize)
        return kv_cache.num_blocks_for(budget, self.bytes_per_block)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        tokens: list[Optional[int | list[int]]] = [None] * len(batch)
        logprobs: list[Optional[TokenLogprob | list[TokenLogprob]]] = [None] * len(batch)
        sample_idx = [i for i, s in enumerate(batch.sample) if s]
        sampling = [batch.seqs[i] for i in sample_idx]
        self.sampler.prepare(sampling)  # grammar masks are built while the model runs
        host = self.flatten(batch)
        if self.graphs is not None and self._graphable(batch) and self.graphs.holds(host):
            logits = self.graphs.replay(host)  # every row of a decode-only step, in batch order
            logits = logits if len(sample_idx) == len(batch) else logits[sample_idx]
            self.steps["graph"] += 1
        else:
            logits = self.model.forward_logits(self.inputs(batch, host), self.kv_caches)
            self.steps["eager"] += 1
        if sample_idx and batch.num_drafts:  # speculative decoding: d + 1 rows per verifying sequence
            emitted, lps = self.sampler.verify(logits, sampling, [batch.num_drafts[i] for i in sample_idx])
            for j, i in enumerate(sample_idx):
                tokens[i] = emitted[j]
                logprobs[i] = lps[j]
        elif sample_idx:
            sampled, lps = self.sampler(logits, sampling)
            for j, i in enumerate(sample_idx):
                tokens[i] = sampled[j]
                logprobs[i] = lps[j]
        return StepResult(tokens, logprobs)

    def flatten(self, batch: ScheduledBatch) -> HostStep:
        """The step's host layout; the cache blocks it touches first are zeroed."""
        host = flatten(batch, self.block_size)
        if self.cache.zeroed_blocks < self.cache.num_blocks:
            self.cache.touch(host.max_block)
        return host

    def inputs(self, batch: ScheduledBatch, host: HostStep) -> StepInputs:
        """The step's inputs for the forward (the backend's metadata, LoRA rows, rope lengths)."""
        return build_inputs(batch, host, self.attention, self.device, self.length_dependent_rope, self.lora)

    @torch.inference_mode()
    def prefill_hidden(self, chunks: list[tuple[list[int], int, int, list[int]]]) -> torch.Tensor:
        """Final hidden states [T, hidden] (after the final norm) of prefill chunks, through the
        chosen forward path and attention backend: chunk (token_ids, start, end, blocks) computes
        positions start..end-1 of its prompt, its keys and values written to `blocks` (the table
        covering 0..end; those before start already written by an earlier call). Rows follow the
        step layout's order (one-row chunks first, as flatten puts decodes), returned in chunk order.
        For embeddings (pooling.py): nothing is sampled and no Sequence or block hash is involved."""
        bs = self.block_size
        order = sorted(range(len(chunks)), key=lambda i: chunks[i][2] - chunks[i][1] != 1)  # stable
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rope_lengths: list[int] = []
        seqs: list[SeqRows] = []
        rows = [0] * len(chunks)
        for i in order:
            tokens, start, end, table = chunks[i]
            rows[i] = len(input_ids)
            seqs.append(SeqRows(len(input_ids), end - start, end, list(table[: -(-end // bs)])))
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            rope_lengths.extend([len(tokens)] * (end - start))  # as transformers' forward of the whole prompt
        max_block = max(b for _, _, end, table in chunks for b in table[: -(-end // bs)])
        if self.cache.zeroed_blocks < self.cache.num_blocks:
            self.cache.touch(max_block)
        layout = StepLayout(seqs, slots, sum(1 for _, start, end, _ in chunks if end - start == 1), bs)
        long = dict(dtype=torch.long, device=self.device)
        step = StepInputs(torch.tensor(input_ids, **long), torch.tensor(positions, **long),
                          self.attention.make_metadata(layout), torch.empty(0, **long), None,
                          torch.tensor(rope_lengths, **long) if self.length_dependent_rope else None)
        hidden = self.model.forward(step, self.kv_caches)
        if order == sorted(order):
            return hidden
        back = torch.tensor([rows[i] + k for i in range(len(chunks)) for k in range(chunks[i][2] - chunks[i][1])],
                            **long)
        return hidden.index_select(0, back)

    @staticmethod
    def _graphable(batch: ScheduledBatch) -> bool:
        """A decode-only step without LoRA rows (their per-step state is not in the graphs' buffers).
        A step verifying drafts (speculative decoding) has d + 1 rows for some sequences: eager."""
        return all(n == 1 for n in batch.num_new_tokens) and all(s.lora is None for s in batch.seqs)

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its seeded generator) once it has finished."""
        self.sampler.release(seq)

    def warmup(self, max_model_len: Optional[int] = None) -> None:
        """Kernels built and caches warm before serving; on a GPU also autotuning and graph capture."""
        startup.warmup(self, max_model_len or self.capacity_tokens)

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
        from .memory import resident_bytes

        cached = getattr(self, "_weight_memory", None)
        if cached is None:
            cached = self._weight_memory = resident_bytes(self.hf_model, self.model)
        return dict(cached)
