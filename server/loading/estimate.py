"""Whether a model fits, before loading it: memory from the config and the checkpoint's tensor
index alone (safetensors headers; no weight is read).

    est = estimate_memory(EstimateRequest(model="folder", quant=QuantConfig(), max_model_len=4096))
    est.fits, est.verdict, est.as_dict()

The figures are the ones the server will hold and /v1/memory will report, computed the way the
loader and the engine compute them:
- weights: the model skeleton built on the meta device (as the loader builds it), the loader's
  quantization plan, and per quantized Linear its packed codes and block statistics (4-bit), or
  int8 rows and row scales (LLM.int8); embeddings and output head at 16 bits, the other
  parameters in the compute dtype, buffers (rotary tables) as built; a double-quantized absmax as
  the native path holds it while serving (decoded to float32). A prequantized checkpoint: its
  stored tensors' bytes, from the index.
- KV cache: 2 x layers x KV heads x head dim x dtype bytes per token, in blocks; the engine's own
  budget rule (--kv-cache-memory, else on CPU the tokens of 1 GiB of float32, else a share of the free GPU
  memory).
- activations: the engine's reserve for one step's activations and logits.
- loading peak: the checkpoint walked in the loader's reading order, what is placed so far plus
  the transient copies of the tensor in hand.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch

from quantserve.quant import QuantConfig

from .formats import quant_config

GIB = 2**30
_CODE_4BIT_BYTES = 16 * 4  # NF4/FP4 table, float32, one per format (shared by every layer)
_NESTED_CODE_BYTES = 256 * 4  # the 8-bit dynamic map of double quantization
_NESTED_BLOCKSIZE = 256
_STATS_CHUNK_BYTES = 4 * 2**20  # quant_stats.CHUNK_ELEMENTS float32s


def activation_reserve_bytes(hidden: int, vocab: int, elem: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """One engine step's activations and logits, roughly (the runner keeps this much free on a GPU)."""
    return max_num_batched_tokens * hidden * 32 * elem + max_num_seqs * vocab * 16


@dataclasses.dataclass(frozen=True)
class EstimateRequest:
    """What would be served, and how (the serve settings that decide memory)."""

    model: Optional[str] = None
    revision: Optional[str] = None
    quant: Optional[QuantConfig] = dataclasses.field(default_factory=QuantConfig)
    dtype: Optional[str | torch.dtype] = None  # compute dtype (LoadConfig's default when None)
    device: Optional[str] = None
    max_model_len: Optional[int] = None  # None: the model's own
    max_num_seqs: int = 64  # serve's default (Settings.max_num_seqs)
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_memory: Optional[float] = None
    kv_cache_dtype: str = "auto"  # serve's --kv-cache-dtype
    attention_backend: str = "auto"  # serve's --attention-backend (auto's KV cache dtype depends on it)
    gpu_memory_utilization: float = 0.9
    cache_dir: Optional[str | Path] = None
    free_bytes: Optional[int] = None  # the device's free memory; None: measured now


@dataclasses.dataclass
class MemoryEstimate:
    model: str
    folder: str
    device: str
    dtype: str
    quant: str  # nf4 / nf4+dq / fp4 / int8 / none (+ " (prequantized)")
    weight_bytes: int  # resident while serving (/v1/memory weights.weight_bytes)
    weight_bytes_16bit: int
    weight_bytes_by_part: dict[str, int]
    quantized_layers: int
    checkpoint_bytes: int
    largest_tensor: str
    kv_bytes_per_token: int
    kv_block_size: int
    kv_cache_blocks: int
    kv_cache_bytes: int  # as the engine will allocate it (/v1/memory kv_cache.bytes_total)
    kv_cache_tokens: int
    model_max_len: int
    max_model_len: int  # what the engine will use (the model's, capped by the KV cache, or as asked)
    max_num_seqs: int
    kv_bytes_for_settings: int  # max_model_len x max_num_seqs tokens
    activation_reserve_bytes: int
    loading_peak_bytes: int
    serving_bytes: int  # weights + KV cache + activations
    device_free_bytes: Optional[int]
    fits: bool
    largest_context: int  # longest max_model_len whose KV cache fits beside the weights
    verdict: str
    problems: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _nbytes(shape: Any, elem: int) -> int:
    return math.prod(shape) * elem


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def free_memory(device: torch.device) -> Optional[int]:
    """Free memory of the device: MemAvailable on CPU, cudaMemGetInfo's free on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _quantized_bytes(shape: tuple[int, int], quant: QuantConfig, native: bool) -> int:
    """Bytes one quantized Linear weight takes while served (its bias is counted apart)."""
    n = shape[0] * shape[1]
    if quant.load_in_8bit:
        return n + 4 * shape[0]  # int8 rows + float32 SCB
    blocks = -(-n // quant.blocksize)
    packed = (n + 1) // 2
    if quant.bnb_4bit_use_double_quant and not native:
        return packed + blocks + 4 * -(-blocks // _NESTED_BLOCKSIZE)  # 8-bit codes + nested float32 absmax
    return packed + 4 * blocks  # float32 absmax (decoded once on the native path when double-quantized)


def _skeleton(folder: Path, hf_config: Any, dtype: torch.dtype, quant: Optional[QuantConfig], stored: Optional[QuantConfig]):
    """The loader's model skeleton on the meta device, and its quantization plan."""
    from .weight_stream import WeightStreamer, linear_like_modules, plan_quantization

    streamer = WeightStreamer(hf_config, folder, torch.device("cpu"), dtype, quant, stored, progress=False)
    if streamer.prequantized or streamer.quant is None:
        return streamer, []
    to_quantize, _ = plan_quantization(streamer.model, streamer.quant)
    linears = linear_like_modules(streamer.model)
    return streamer, [n for n in to_quantize if n in linears]


def _kv_dtype(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
              block_size: int, backend: str = "auto") -> torch.dtype:
    """The KV cache dtype the runner will pick, by the runner's own rules (engine/kv_cache.py)."""
    from quantserve.server.engine import attention, kv_cache

    heads, kv_heads, head_dim, _ = shape
    resolved = attention.resolve(backend, device, dtype, heads, kv_heads, head_dim, block_size)
    return kv_cache.cache_dtype(name, resolved, dtype, device)


def _model_max_len(hf_config: Any) -> int:
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def estimate_memory(request: EstimateRequest) -> MemoryEstimate:
    """The memory `request` needs and whether it fits; ValueError for a model that cannot be read."""
    from quantserve.server.engine import kv_cache
    from quantserve.server.engine.models import families, serving_shape
    from quantserve.server.engine.models.sixteen_bit import sixteen_bit_dtype

    from .checkpoint import find_weight_files, read_safetensors_header
    from .loader import LoadConfig
    from .sources import checkpoint_quant, load_hf_config, resolve_source

    config = LoadConfig(model=request.model, revision=request.revision, device=request.device, dtype=request.dtype,
                        quant=request.quant, cache_dir=request.cache_dir, progress=False)
    device, dtype = config.device, config.dtype
    folder, description = resolve_source(config.model, config.revision, config.cache_dir)
    hf_config = load_hf_config(folder)
    stored = checkpoint_quant(hf_config, folder)
    files = find_weight_files(folder)
    entries = {}  # safetensors headers: dtype, shape and bytes of every tensor (.bin files have no index)
    for path in files:
        if path.suffix == ".safetensors":
            entries.update(read_safetensors_header(path))
    streamer, quantized = _skeleton(folder, hf_config, dtype, config.quant, stored)
    model, quant = streamer.model, streamer.quant
    attention_shape = serving_shape(model)
    _, kv_heads, head_dim, layers = attention_shape
    native = families.unsupported_reason(model) is None  # the decoder forward fuses the linears
    elem = _elem(dtype)
    half = _elem(sixteen_bit_dtype(dtype))

    parts = {"quantized": 0, "sixteen_bit": 0, "other": 0, "buffers": 0}
    num_params = 0
    seen: set[int] = set()
    quantized_weights = {f"{n}.weight" for n in quantized}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel = param.numel()
        num_params += numel
        if name in quantized_weights:
            transposed = name.removesuffix(".weight") in streamer.transposed  # Conv1D: stored (in, out)
            shape = (param.shape[1], param.shape[0]) if transposed else (param.shape[0], param.shape[1])
            parts["quantized"] += _quantized_bytes(shape, quant, native)
        elif name in streamer.sixteen_bit:
            parts["sixteen_bit"] += numel * half
        else:
            parts["other"] += numel * (elem if param.is_floating_point() else param.element_size())
    if quantized and quant is not None and not quant.load_in_8bit:
        parts["quantized"] += _CODE_4BIT_BYTES  # one code table, shared
        if quant.bnb_4bit_use_double_quant and not native:
            parts["quantized"] += _NESTED_CODE_BYTES
    for buffer in model.buffers():
        if buffer.device.type != "meta":
            parts["buffers"] += buffer.numel() * buffer.element_size()
    if streamer.prequantized:
        if not entries:
            raise ValueError(f"{folder}: estimating a prequantized checkpoint needs safetensors files (headers)")
        parts = _prequantized_parts(entries, model, streamer, dtype, half)
        quantized = sorted({k.split(".weight.quant_state.")[0] for k in entries if ".weight.quant_state." in k}
                           | {k.removesuffix(".SCB") for k in entries if k.endswith(".SCB")})
    weight_bytes = sum(parts.values())

    # KV cache, as the engine's runner sizes it
    kv_elem = _elem(_kv_dtype(request.kv_cache_dtype, device, dtype, attention_shape, request.block_size,
                              request.attention_backend))
    bytes_per_token = 2 * layers * kv_heads * head_dim * kv_elem
    bytes_per_block = bytes_per_token * request.block_size
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 4096)
    vocab = getattr(text, "vocab_size", 32000)
    reserve = activation_reserve_bytes(hidden, vocab, elem, request.max_num_batched_tokens, request.max_num_seqs)
    free = request.free_bytes if request.free_bytes is not None else free_memory(device)
    if request.kv_cache_memory is not None:
        budget = request.kv_cache_memory * GIB
    elif device.type == "cuda":
        # the runner takes its share of what is free after the weights are loaded
        budget = ((free or 0) - weight_bytes) * request.gpu_memory_utilization - reserve
    else:
        budget = kv_cache.default_cpu_budget(kv_elem)
    blocks = max(0, int(budget // bytes_per_block))
    kv_tokens = blocks * request.block_size
    model_max = _model_max_len(hf_config)
    max_model_len = request.max_model_len if request.max_model_len is not None else min(model_max, kv_tokens)

    if entries:
        largest_tensor = max(entries, key=lambda k: entries[k].nbytes)
        big = entries[largest_tensor]
        big_bytes, big_numel, big_dtype = big.nbytes, math.prod(big.shape), big.dtype
    else:  # .bin: the skeleton's largest parameter, at 4 bytes on disk at most
        largest_tensor, param = max(model.named_parameters(), key=lambda kv: kv[1].numel())
        big_numel, big_dtype = param.numel(), torch.float32
        big_bytes = 4 * big_numel
    # the read buffer, its cast to the load dtype (none when it is stored in it), and the chunk
    # quant_stats dequantizes while it measures
    transient = big_bytes + (big_numel * elem if big_dtype != dtype else 0) + _STATS_CHUNK_BYTES
    loading_peak = weight_bytes + transient  # an upper bound; the walk below replaces it when it can
    if entries and not streamer.prequantized:
        loading_peak = _loading_peak(entries, files, streamer, quantized_weights, quant, native, elem, half,
                                     weight_bytes)

    serving = weight_bytes + blocks * bytes_per_block + reserve
    problems = []
    if blocks < 1:
        problems.append(f"the KV cache budget ({budget / GIB:.3f} GiB) holds no block of {bytes_per_block} bytes")
    if request.max_model_len is not None and request.max_model_len > kv_tokens:
        problems.append(f"max_model_len {request.max_model_len} is more than the KV cache holds ({kv_tokens} tokens)")
    if free is not None and max(serving, loading_peak) > free:
        problems.append(
            f"needs {max(serving, loading_peak) / GIB:.2f} GiB (weights {weight_bytes / GIB:.2f}, KV cache "
            f"{blocks * bytes_per_block / GIB:.2f}, activations {reserve / GIB:.2f}; loading peak "
            f"{loading_peak / GIB:.2f}) but {device} has {free / GIB:.2f} GiB free"
        )
    room = (free if free is not None else 0) - weight_bytes - reserve
    largest = min(model_max, max(0, int(room // bytes_per_block)) * request.block_size) if free is not None else 0
    fits = not problems
    quant_name = "none" if quant is None else quant.quant_name + (
        "+dq" if quant.bnb_4bit_use_double_quant and not quant.load_in_8bit else "")
    if streamer.prequantized:
        quant_name += " (prequantized)"
    verdict = (
        f"fits: {serving / GIB:.2f} GiB needed of {free / GIB:.2f} GiB free on {device}" if fits and free is not None
        else "fits (free memory unknown)" if fits else "does not fit: " + "; ".join(problems)
    )
    return MemoryEstimate(
        model=description, folder=str(folder), device=str(device), dtype=str(dtype).removeprefix("torch."),
        quant=quant_name, weight_bytes=weight_bytes, weight_bytes_16bit=2 * num_params, weight_bytes_by_part=parts,
        quantized_layers=len(quantized), checkpoint_bytes=sum(p.stat().st_size for p in files),
        largest_tensor=largest_tensor, kv_bytes_per_token=bytes_per_token, kv_block_size=request.block_size,
        kv_cache_blocks=blocks, kv_cache_bytes=blocks * bytes_per_block, kv_cache_tokens=kv_tokens,
        model_max_len=model_max, max_model_len=max_model_len, max_num_seqs=request.max_num_seqs,
        kv_bytes_for_settings=max_model_len * request.max_num_seqs * bytes_per_token,
        activation_reserve_bytes=reserve, loading_peak_bytes=loading_peak, serving_bytes=serving,
        device_free_bytes=free, fits=fits, largest_context=largest, verdict=verdict, problems=problems,
    )


def _loading_peak(entries: dict, files: list, streamer: Any, quantized_weights: set, quant: Any, native: bool,
                  elem: int, half: int, weight_bytes: int) -> int:
    """The loader's peak, walking the checkpoint in its reading order (files in order, tensors by
    offset): what is placed so far, plus the tensor in hand -- its read buffer, its cast to the
    load dtype when stored in another, what it becomes, and the measurement's chunk. The weights
    that are not in the checkpoint's tensors (buffers, a double-quantized absmax decoded later)
    count from the start."""
    order = sorted(entries, key=lambda k: (files.index(entries[k].path), entries[k].offset))
    placed_total = 0
    placed: set[str] = set()
    peak = 0
    for key in order:
        entry = entries[key]
        target = streamer.model_name(key)
        if target is None or target in placed:
            continue
        group = streamer.tied.get(target, [target])
        placed.update(group)
        numel = math.prod(entry.shape)
        if target in quantized_weights:
            shape = (entry.shape[0], numel // entry.shape[0]) if entry.shape else (1, 1)
            final = _quantized_bytes(shape, quant, native)
            cast = numel * elem if entry.dtype != streamer.dtype else 0  # quantized from the load dtype
            in_hand = entry.nbytes + cast + final + _STATS_CHUNK_BYTES
        else:
            sixteen = target in streamer.sixteen_bit or any(n in streamer.sixteen_bit for n in group)
            size = half if sixteen else (elem if entry.dtype.is_floating_point else entry.dtype.itemsize)
            final = numel * size
            # cast straight to its dtype; stored in it already, the read buffer is kept as is
            in_hand = entry.nbytes + (final if entry.nbytes != final or not entry.dtype.is_floating_point
                                      or entry.dtype.itemsize != size else 0)
        peak = max(peak, placed_total + in_hand)
        placed_total += final
    return max(peak, weight_bytes) + max(0, weight_bytes - placed_total)


def _prequantized_parts(entries: dict, model: Any, streamer: Any, dtype: torch.dtype, half: int) -> dict[str, int]:
    """A prequantized checkpoint's quantized layers take what they take on disk (minus the
    serialized state metadata); the rest as a float checkpoint's."""
    elem = _elem(dtype)
    parts = {"quantized": 0, "sixteen_bit": 0, "other": 0, "buffers": 0}
    expected = set(streamer.expected)
    for key, entry in entries.items():
        if ".weight.quant_state." in key or key.endswith(".weight_format"):
            continue  # parsed into the state's fields, not kept as tensors
        target = streamer.model_name(key)
        if target is None or target not in expected or entry.dtype in (torch.uint8, torch.int8) or ".weight." in key \
                or key.endswith(".SCB"):
            parts["quantized"] += entry.nbytes
        elif target in streamer.sixteen_bit:
            parts["sixteen_bit"] += math.prod(entry.shape) * half
        else:
            parts["other"] += math.prod(entry.shape) * elem
    for buffer in model.buffers():
        if buffer.device.type != "meta":
            parts["buffers"] += buffer.numel() * buffer.element_size()
    return parts


def parse_max_model_len(value: Any) -> Optional[int]:
    """--max-model-len as Settings validated it (tokens >= 16, or "auto"): tokens, or None for auto
    (the longest that fits)."""
    return None if value is None or value == "auto" else int(value)


def estimate_from_args(args: Any, model: Optional[str] = None) -> MemoryEstimate:
    """`quantserve estimate`'s arguments -> the estimate of `model` (a path or hub id; None: the
    built-in default)."""
    return estimate_memory(EstimateRequest(
        model=model, revision=args.revision, quant=quant_config(args.quant, double_quant=args.double_quant, blocksize=args.blocksize),
        dtype=args.compute_dtype, device=args.device, max_model_len=parse_max_model_len(args.max_model_len),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
    ))


def estimate_for_settings(settings: Any) -> MemoryEstimate:
    """What `serve` with these Settings will need (its check before loading)."""
    return estimate_memory(EstimateRequest(
        model=settings.model, revision=settings.revision, quant=quant_config(settings.quant, double_quant=settings.double_quant),
        dtype=settings.compute_dtype, device=settings.device, max_model_len=parse_max_model_len(settings.max_model_len),
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        block_size=settings.block_size, kv_cache_memory=settings.kv_cache_memory,
        kv_cache_dtype=settings.kv_cache_dtype, attention_backend=settings.attention_backend,
    ))


def fit_settings(est: MemoryEstimate, auto: bool) -> dict[str, Any]:
    """What `serve` changes in its settings for the estimate: with --max-model-len auto the longest
    context that fits (the model's, capped by the KV cache and by free memory), and on CPU a KV
    cache no larger than what is free beside the weights. Raises ValueError (the estimate's
    verdict) when the model cannot be served at all."""
    if not auto:
        if not est.fits:
            raise ValueError(f"{est.model} cannot be served with these settings: {est.verdict} "
                             "(see `quantserve estimate`; --max-model-len auto picks the longest context that fits)")
        return {}
    if est.largest_context < 16 and est.device_free_bytes is not None:
        raise ValueError(f"{est.model} does not fit: {est.verdict}")
    length = min(est.model_max_len, est.kv_cache_tokens)
    update: dict[str, Any] = {}
    if est.device_free_bytes is not None and est.largest_context < length:
        # the configured KV cache does not fit beside the weights: shrink it to what does
        length = est.largest_context
        update["kv_cache_memory"] = length * est.kv_bytes_per_token / GIB
    if length < 16:
        raise ValueError(f"{est.model} does not fit: {est.verdict}")
    update["max_model_len"] = length
    return update


def _gib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GIB:,.3f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def format_estimate(est: MemoryEstimate) -> str:
    p = est.weight_bytes_by_part
    lines = [
        f"model       {est.model} ({est.quant}, {est.dtype} on {est.device})",
        f"checkpoint  {_gib(est.checkpoint_bytes)} on disk; largest tensor {est.largest_tensor}",
        f"weights     {_gib(est.weight_bytes)} ({est.quantized_layers} layers quantized {_gib(p['quantized'])}, "
        f"embeddings/head at 16 bits {_gib(p['sixteen_bit'])}, other {_gib(p['other'] + p['buffers'])}); "
        f"16-bit size {_gib(est.weight_bytes_16bit)}",
        f"KV cache    {est.kv_bytes_per_token:,} bytes per token; {est.kv_cache_blocks:,} blocks of {est.kv_block_size} "
        f"= {est.kv_cache_tokens:,} tokens in {_gib(est.kv_cache_bytes)}",
        f"settings    max_model_len {est.max_model_len:,} (model: {est.model_max_len:,}) x max_num_seqs "
        f"{est.max_num_seqs}: {_gib(est.kv_bytes_for_settings)} of KV at full length",
        f"activations {_gib(est.activation_reserve_bytes)} reserved for one step",
        f"loading     peak {_gib(est.loading_peak_bytes)} (placed weights + the tensor in hand, in reading order)",
        f"serving     {_gib(est.serving_bytes)} (weights + KV cache + activations); free on {est.device}: "
        f"{_gib(est.device_free_bytes)}",
        f"context     longest that fits beside the weights: {est.largest_context:,} tokens",
        f"verdict     {est.verdict}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ several models


@dataclasses.dataclass
class CombinedEstimate:
    """Several models loaded together, each priced as `serve --models-dir` prices it (weights + KV
    cache + one step's activations: its registry's cost), against the models' memory budget."""

    names: list[str]
    estimates: list[MemoryEstimate]
    total_bytes: int  # the sum of the models' serving_bytes
    budget_bytes: Optional[int]
    budget_source: str  # where the budget comes from, in words
    fits: bool  # together within the budget, and each model alone on its device
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        """--json: the models (each estimate with its name) and the summary."""
        return {
            "models": [{"name": n, **e.as_dict()} for n, e in zip(self.names, self.estimates)],
            "summary": {"models": [{"name": n, "total_bytes": e.serving_bytes}
                                   for n, e in zip(self.names, self.estimates)],
                        "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes,
                        "budget_source": self.budget_source, "fits": self.fits, "verdict": self.verdict},
        }


def models_budget(device: str, models_memory: Optional[float], gpu_memory_utilization: float) -> tuple[Optional[int], str]:
    """(bytes, where from) the loaded models may take together: --models-memory GiB when given, else
    serve's default: --gpu-memory-utilization of the GPU's memory, or 90% of the host's available
    memory (MemAvailable) on a CPU."""
    if models_memory is not None:
        return int(models_memory * GIB), f"--models-memory {models_memory:g}"
    where = torch.device(device)
    if where.type == "cuda":
        total = torch.cuda.mem_get_info(where)[1]
        return int(total * gpu_memory_utilization), \
            f"--gpu-memory-utilization {gpu_memory_utilization:g} of {where}'s {_gib(total)}"
    available = free_memory(where)
    if available is None:
        return None, "unknown (no MemAvailable): give --models-memory"
    return int(available * 0.9), f"90% of the host's {_gib(available)} available"


def combine(names: list[str], estimates: list[MemoryEstimate], budget_bytes: Optional[int],
            budget_source: str) -> CombinedEstimate:
    """Whether the models fit together, and if not which one to leave out."""
    totals = [e.serving_bytes for e in estimates]
    total = sum(totals)
    alone = [f"{n} does not fit even alone: {'; '.join(e.problems)}" for n, e in zip(names, estimates) if not e.fits]
    if budget_bytes is None:
        together, why = True, "fit together (budget unknown)"
    elif total <= budget_bytes:
        together, why = True, f"fit together: {_gib(total)} of the {_gib(budget_bytes)} budget"
    else:
        # the smallest model whose leaving out is enough; none is: the largest
        enough = [(t, n) for t, n in zip(totals, names) if total - t <= budget_bytes]
        out = min(enough)[1] if enough else max(zip(totals, names))[1]
        together = False
        why = (f"do not fit together: {_gib(total)} needed, {_gib(budget_bytes)} budget ({budget_source}); "
               f"unload {out} or lower --kv-cache-memory / --max-num-seqs / --max-num-batched-tokens "
               "(serve unloads the least recently used idle model to make room)")
    verdict = "; ".join(([] if together and alone else [why]) + alone)  # "fit together" only when all is well
    return CombinedEstimate(names, estimates, total, budget_bytes, budget_source, together and not alone, verdict)


def format_combined(combined: CombinedEstimate) -> str:
    """Each model's estimate (format_estimate), then the table of what they take together."""
    blocks = [f"[{n}]\n{format_estimate(e)}" for n, e in zip(combined.names, combined.estimates)]
    width = max(len("budget"), *(len(n) for n in combined.names))
    row = f"{{:<{width}}}  {{:>12}}  {{:>12}}  {{:>12}}  {{:>12}}"
    table = [row.format("model", "weights", "KV cache", "activations", "total")]
    for n, e in zip(combined.names, combined.estimates):
        table.append(row.format(n, _gib(e.weight_bytes), _gib(e.kv_cache_bytes), _gib(e.activation_reserve_bytes),
                                _gib(e.serving_bytes)))
    table.append(row.format("sum", "", "", "", _gib(combined.total_bytes)))
    table.append(row.format("budget", "", "", "", _gib(combined.budget_bytes)) + f"  ({combined.budget_source})")
    table.append(f"verdict     {combined.verdict}")
    return "\n\n".join(blocks) + "\n\ntogether (weights + KV cache + activations each, as serve counts them)\n" \
        + "\n".join(table)
