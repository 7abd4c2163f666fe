"""EngineConfig: every engine limit in one frozen object, validated once (pure Python, no torch)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

MODEL_IMPLS = ("auto", "native", "transformers")
ATTENTION_BACKENDS = ("auto", "native", "torch", "triton")
# vLLM's --kv-cache-dtype names (fp8 = fp8_e4m3) plus float32; the runner maps them to torch dtypes.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, and how much memory its KV cache takes.

    Attributes:
        block_size: tokens per KV cache block (page).
        num_kv_blocks: exact number of KV blocks; overrides the memory budget (tests use tiny ones).
        kv_cache_memory_gib: KV cache size in GiB. Default on CPU: the tokens 1 GiB of float32 holds
            (model_runner.default_cpu_kv_budget); on a GPU, what
            `gpu_memory_utilization` leaves (model_runner.kv_budget_bytes).
        gpu_memory_utilization: fraction of the GPU's total memory the engine may use (as vLLM's):
            the KV cache gets it less what is in use after loading, one step's measured activation
            peak and the CUDA graphs' allowance (GPU only).
        max_num_seqs: most sequences in one step (running batch size).
        max_num_batched_tokens: token budget of one step; longer prompts are prefilled in chunks.
        max_model_len: context length limit (prompt + output). None: the model's
            max_position_embeddings, capped by the KV cache capacity.
        max_waiting_requests: submitted but not yet running requests beyond which `generate`
            raises EngineOverloadedError.
        max_n: most choices one call may ask for (n, summed over the prompts of a batched call).
        enable_prefix_caching: requests that share a prompt prefix share its KV blocks.
        model_impl: "auto" (native Llama-family model when it applies, else transformers' own
            modules with our paged attention), "native" or "transformers".
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
        follow_cpu_load: on a CPU, lower torch's thread count (at most the count at start) while
            other processes take some of our cores, and raise it again when they stop
            (engine/cpu_load.py). The server turns it on unless --cpu-threads pins the count.
    """

    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_gib: Optional[float] = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: Optional[int] = None
    max_waiting_requests: int = 256
    max_n: int = 16
    enable_prefix_caching: bool = True
    model_impl: str = "auto"
    seed: int = 0
    model_name: Optional[str] = None
    max_loras: int = 4
    max_lora_rank: int = 64
    attention_backend: str = "auto"
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    follow_cpu_load: bool = False

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)
        if self.kv_cache_memory_gib is not None:
            if isinstance(self.kv_cache_memory_gib, bool) or not isinstance(self.kv_cache_memory_gib, (int, float)):
                raise TypeError(f"kv_cache_memory_gib must be a number, got {self.kv_cache_memory_gib!r}")
            if not self.kv_cache_memory_gib > 0:
                raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)):
            raise TypeError(f"gpu_memory_utilization must be a number, got {self.gpu_memory_utilization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2)
        _check_int("max_waiting_requests", self.max_waiting_requests, 0)
        _check_int("max_n", self.max_n, 1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {self.model_impl!r}")
        _check_int("seed", self.seed, 0)
        _check_int("max_loras", self.max_loras, 1)
        _check_int("max_lora_rank", self.max_lora_rank, 1)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.follow_cpu_load, bool):
            raise TypeError(f"follow_cpu_load must be a bool, got {self.follow_cpu_load!r}")
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise TypeError(f"model_name must be a str, got {self.model_name!r}")

    @classmethod
    def from_settings(cls, settings: Any, model: Any = None, **overrides: Any) -> "EngineConfig":
        """Build from the server's Settings (server/config.py); `overrides` win."""
        values: dict[str, Any] = dict(
            block_size=settings.block_size,
            kv_cache_memory_gib=settings.kv_cache_memory,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=settings.max_model_len,
            max_waiting_requests=settings.max_queue,
            max_n=settings.max_n,
            enable_prefix_caching=settings.enable_prefix_caching,
            model_name=settings.display_name(),
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            attention_backend=settings.attention_backend,
            enforce_eager=settings.enforce_eager,
            kv_cache_dtype=settings.kv_cache_dtype,
            follow_cpu_load=settings.cpu_threads is None,  # --cpu-threads N pins the count
        )
        values.update(overrides)
        return cls(**values)
