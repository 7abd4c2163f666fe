"""EngineConfig: every engine limit in one frozen object, validated once (pure Python, no torch).

Its fields carry the names of the server's Settings (server/config.py) for the same knobs; pydantic
validates both (a bad value raises pydantic's ValidationError, a ValueError)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from .spec_config import SpeculativeConfig


@dataclass(frozen=True, config=ConfigDict(strict=True))
class EngineConfig:
    """How the engine batches, and how much memory its KV cache takes.

    Attributes:
        block_size: tokens per KV cache block (page).
        num_kv_blocks: exact number of KV blocks; overrides the memory budget (tests use tiny ones).
        kv_cache_memory: KV cache size in GiB. Default on CPU: the tokens 1 GiB of float32 holds
            (kv_cache.default_cpu_budget); on a GPU, what `gpu_memory_utilization` leaves
            (kv_cache.gpu_budget).
        gpu_memory_utilization: fraction of the GPU's total memory the engine may use (as vLLM's):
            the KV cache gets it less what is in use after loading, one step's measured activation
            peak and the CUDA graphs' allowance (GPU only).
        max_num_seqs: most sequences in one step (running batch size).
        max_num_batched_tokens: token budget of one step; longer prompts are prefilled in chunks.
        max_model_len: context length limit (prompt + output). None: the model's
            max_position_embeddings, capped by the KV cache capacity.
        max_queue: submitted but not yet running requests beyond which `generate` raises
            EngineOverloadedError.
        max_n: most choices one call may ask for (n, summed over the prompts of a batched call).
        scheduling_policy: who runs first (scheduler.py): "fair" (max-min shares of the running
            slots across clients, a newcomer's sequence preempting the newest of a client more than
            one over; a request's priority orders its own client's requests), "priority" (vLLM's:
            lower first, preempting worse ones) or "fcfs" (arrival order).
        max_seqs_per_client: most running sequences of one client (None: no fixed cap; "fair"
            still shares the slots). Not applied under "fcfs".
        default_max_tokens: max_tokens of a request that gives none (None: what the context leaves).
        max_tokens_per_request: most output tokens one call may ask for, n x max_tokens summed over
            its prompts: more is refused; a request without max_tokens gets at most its share of it.
        enable_prefix_caching: requests that share a prompt prefix share its KV blocks.
        forward: the forward path, chosen once at start (forward_path.py): "fused" (the decoder
            stack in one native call per step: CPU, float32, native attention), "layers" (the
            decoder forward layer by layer), "transformers" (transformers' own modules with our
            paged attention), or "auto" (the first of those that serves the model).
        seed: seed of the generator for requests that do not give their own.
        model_name: the name the engine reports (default: the model's name_or_path).
        max_loras: most distinct LoRA adapters among the running sequences (requests for
            other adapters wait in the queue).
        max_lora_rank: largest LoRA rank an adapter may have.
        attention_backend: "auto" (Triton kernels on a GPU; on a CPU the native C++ kernel where it
            applies, else PyTorch), "native", "torch" (gather blocks + sdpa) or "triton" (on a CPU
            only under the interpreter: TRITON_INTERPRET=1 from the start of the process).
        enforce_eager: never capture CUDA graphs (vLLM's --enforce-eager); decode steps run eagerly.
        kv_cache_dtype: dtype the KV cache stores keys/values in (vLLM's --kv-cache-dtype; "fp8" is
            "fp8_e4m3"). "auto": bfloat16 on a CPU where the native attention kernel runs, else the
            model's compute dtype (on CUDA too). Attention computes in float32 on the stored values.
            A combination the chosen attention path cannot run is refused at startup.
        grammar_compile_workers, grammar_compile_timeout, grammar_cache_bytes, max_grammar_choices,
            max_grammar_schema_bytes, max_grammar_regex_length, max_grammar_bytes: what a request's
            structured-output grammar may cost (grammar_pool.GrammarLimits).
        speculative_config: speculative decoding (speculative.py; vLLM's --speculative-config):
            n-gram prompt lookup or a draft model proposes up to num_speculative_tokens tokens per
            decoding sequence, verified in the same step; None: off.
        follow_cpu_load: on a CPU, lower torch's thread count (at most the count at start) while
            other processes take some of our cores, and raise it again when they stop
            (engine/cpu_load.py). The server turns it on unless --cpu-threads pins the count.
    """

    block_size: int = Field(16, ge=1)
    num_kv_blocks: Optional[int] = Field(None, ge=1)
    kv_cache_memory: Optional[float] = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    max_model_len: Optional[int] = Field(None, ge=2)
    max_queue: int = Field(256, ge=0)
    max_n: int = Field(16, ge=1)
    scheduling_policy: Literal["fair", "priority", "fcfs"] = "fair"
    max_seqs_per_client: Optional[int] = Field(None, ge=1)
    default_max_tokens: Optional[int] = Field(None, ge=1)
    max_tokens_per_request: int = Field(65536, ge=1)
    enable_prefix_caching: bool = True
    forward: Literal["auto", "fused", "layers", "transformers"] = "auto"
    seed: int = Field(0, ge=0)
    model_name: Optional[str] = None
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    attention_backend: Literal["auto", "native", "torch", "triton"] = "auto"
    enforce_eager: bool = False
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    follow_cpu_load: bool = False
    speculative_config: Optional[SpeculativeConfig] = None
    # Structured outputs (grammar_pool.GrammarLimits, same names as Settings).
    grammar_compile_workers: int = Field(2, ge=1)
    grammar_compile_timeout: float = Field(10.0, gt=0)
    grammar_cache_bytes: int = Field(128 * 2**20, ge=0)
    max_grammar_choices: int = Field(10_000, ge=1)
    max_grammar_schema_bytes: int = Field(2**20, ge=1)
    max_grammar_regex_length: int = Field(16_384, ge=1)
    max_grammar_bytes: int = Field(2**20, ge=1)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "EngineConfig":
        """Build from the server's Settings (server/config.py): every knob both have, by its one name;
        `overrides` win."""
        values: dict[str, Any] = {name: getattr(settings, name) for name in cls.__dataclass_fields__
                                  if name in type(settings).model_fields}
        values["model_name"] = settings.display_name()
        values["follow_cpu_load"] = settings.cpu_threads is None  # --cpu-threads N pins the count
        values.update(overrides)
        return cls(**values)
