"""Load a Hugging Face causal LM onto a device in 4 or 8 bits, quantizing while the weights stream in.

    from .loader import LoadConfig, load_model
    result = load_model(LoadConfig("path/to/folder", quant=quant.QuantConfig(bnb_4bit_use_double_quant=True)))
    result.model, result.tokenizer, result.config, result.report

Sources (`LoadConfig.model`): None (the built-in SmolLM2-135M-Instruct), a local Hugging Face
folder (config.json + safetensors or .bin, sharded or not), a .gguf file (converted once to a
cached float folder), a Hub id `org/name` (huggingface_hub's cache; HF_HOME, HF_HUB_OFFLINE),
or a prequantized bitsandbytes 4-bit or 8-bit checkpoint (loaded as stored: no dequantize/requantize).
See sources.py (name -> folder), weight_stream.py (the streaming quantization), checkpoint.py
(reading files), export.py (writing a prequantized checkpoint).

Peak memory is the final footprint plus a few copies of the largest tensor, never the
16/32-bit model. Errors are one line (ValueError, FileNotFoundError, or what torch raised) naming
the problem; a failed load leaves nothing behind: the exception carries no frames holding the
partial model.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from quantserve.quant import QuantConfig
from quantserve.quant.convert import model_nbytes
from quantserve.server.engine.models.quantized_head import HEAD_QUANTIZATIONS, head_memory, quantize_lm_head

from .checkpoint import CheckpointReader
from .default_model import default_cache_dir
from .embedding_folder import bare_embedding_model
from .peak_memory import PeakMemory
from .sources import checkpoint_quant, load_hf_config, load_tokenizer, resolve_source
from .weight_stream import WeightStreamer, count_params

logger = logging.getLogger("quantserve.loader")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEFAULT_QUANT = QuantConfig()


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """What to load and how; validated once, with device and dtype resolved.

    Attributes:
        model: local folder, .gguf file, Hub id `org/name`, or None for the built-in default model.
        revision: Hub branch, tag or commit (Hub ids only).
        device: "cpu", "cuda", "cuda:1", ...; None: cuda when present, else cpu.
        dtype: float dtype of the unquantized tensors and of the weights before quantization
            ("float32", "bfloat16", ... or a torch.dtype); None: float32 on CPU (faster than bf16
            there), bfloat16 on CUDA (float16 where the GPU lacks bf16).
        quant: quant.QuantConfig (nf4/fp4, double quant, compute dtype, storage, skip modules,
            blocksize; or load_in_8bit for LLM.int8), or None to load unquantized. A prequantized
            checkpoint keeps its own settings; only bnb_4bit_compute_dtype may be overridden.
        cache_dir: where converted GGUF folders go; None: $QUANTSERVE_CACHE or ~/.cache/quantserve.
        progress: show a tqdm bar over the checkpoint's tensors.
        quant_stats: measure each quantized layer's error against its original while loading
            (quant_stats.py; LoadReport.layer_stats); off only to measure what it costs.
        quantize_lm_head: "none" (the output head at 16 bits), "int8" or "nf4": the head quantized
            after loading (server/engine/models/quantized_head.py; a tied input embedding reads
            its rows from it).
    """

    model: Optional[str] = None
    revision: Optional[str] = None
    device: Optional[str | torch.device] = None
    dtype: Optional[str | torch.dtype] = None
    quant: Optional[QuantConfig] = _DEFAULT_QUANT
    cache_dir: Optional[str | Path] = None
    progress: bool = True
    quant_stats: bool = True
    quantize_lm_head: str = "none"

    def __post_init__(self) -> None:
        if self.model is not None:
            if not isinstance(self.model, (str, Path)) or not str(self.model).strip():
                raise ValueError(f"model must be a folder, .gguf file or Hub id, got {self.model!r}")
            object.__setattr__(self, "model", str(self.model))
        if self.revision is not None and not isinstance(self.revision, str):
            raise ValueError(f"revision must be a string, got {self.revision!r}")
        try:
            device = torch.device(self.device if self.device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for but torch sees no CUDA GPU")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        object.__setattr__(self, "device", device)
        dtype = self.dtype
        if dtype is None:
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16 if cuda_bf16 else torch.float16
        elif isinstance(dtype, str):
            if dtype.removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype.removeprefix("torch.")]
        elif dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a quant.QuantConfig or None (unquantized), got {self.quant!r}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir())
        if self.quantize_lm_head not in HEAD_QUANTIZATIONS:
            raise ValueError(f"quantize_lm_head must be one of {', '.join(HEAD_QUANTIZATIONS)}, "
                             f"got {self.quantize_lm_head!r}")


@dataclasses.dataclass
class LoadReport:
    """What loading did. Sizes in bytes; `skipped` maps Linear-like layers left unquantized to why."""

    source: str
    folder: Path
    checkpoint_format: str
    device: torch.device
    dtype: torch.dtype
    quant: Optional[QuantConfig]  # as applied (compute dtype resolved); the checkpoint's if prequantized
    prequantized: bool = False
    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # as quant.ConversionReport
    transposed: list[str] = dataclasses.field(default_factory=list)  # Conv1D layers stored as Linear4bit
    unexpected_keys: list[str] = dataclasses.field(default_factory=list)
    num_params: int = 0
    weight_bytes: int = 0  # everything in the state dict as loaded: the quantized footprint
    weight_bytes_16bit: int = 0  # num_params * 2
    load_seconds: float = 0.0
    rss_before: Optional[int] = None
    peak_rss: Optional[int] = None
    rss_after: Optional[int] = None
    peak_rss_is_lifetime: bool = False
    device_bytes: Optional[int] = None  # CUDA memory allocated by the load
    device_peak_bytes: Optional[int] = None  # CUDA peak during the load
    layer_stats: list = dataclasses.field(default_factory=list)  # quant_stats.LayerQuantStats per quantized layer
    stats_seconds: float = 0.0  # of load_seconds, spent measuring layer_stats
    lm_head: Optional[dict] = None  # the output head as held (quantized_head.head_memory)

    def quantization_summary(self) -> dict:
        """What quantizing cost, the whole model in one object (quant_stats.summarize)."""
        from .quant_stats import summarize

        return summarize(self.layer_stats, self.stats_seconds)

    def summary(self) -> str:
        """One log line: what, how, how long, how much memory."""
        mib = 2**20
        if self.quant is None:
            how = "unquantized"
        else:
            dq = "+double quant" if self.quant.bnb_4bit_use_double_quant and not self.quant.load_in_8bit else ""
            how = f"{len(self.quantized)} layers {self.quant.quant_name}{dq}"
            how += " (prequantized)" if self.prequantized else ""
        if self.lm_head and self.lm_head["quantization"] != "none":
            how += f", output head {self.lm_head['quantization']}"
        line = (
            f"loaded {self.source} on {self.device} in {self.load_seconds:.1f}s: {how}, "
            f"{self.weight_bytes / mib:.1f} MiB (16-bit: {self.weight_bytes_16bit / mib:.1f} MiB)"
        )
        if self.peak_rss is not None and self.rss_before is not None:
            line += f", peak RSS +{(self.peak_rss - self.rss_before) / mib:.0f} MiB"
        if self.device_peak_bytes is not None:
            line += f", peak {self.device} memory {self.device_peak_bytes / mib:.0f} MiB"
        return line


@dataclasses.dataclass
class LoadResult:
    """The loaded model (eval mode, on config.device), its tokenizer (None if the folder has
    none), the LoadConfig used, and the LoadReport."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    config: LoadConfig
    report: LoadReport
    # An embedding model stored without an output head (embedding_folder.py): it serves
    # /v1/embeddings only (its input embedding stands in as the head, unused).
    embedding_only: bool = False


def load_model(config: Optional[LoadConfig] = None, **kwargs: Any) -> LoadResult:
    """Load `config` (or LoadConfig(**kwargs)). Raises ValueError / FileNotFoundError with one line."""
    config = LoadConfig(**kwargs) if config is None else config
    try:
        return _load(config)
    except Exception as exc:
        if logger.isEnabledFor(logging.DEBUG):  # formatted now: a stored exc_info would keep the frames
            logger.debug("loading %s failed:\n%s", config.model, traceback.format_exc())
        # Drop the traceback (its frames hold the half-built model) and any chained exceptions.
        error = exc.with_traceback(None)
        error.__cause__ = error.__context__ = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise error


def load_for_serving(settings: Any) -> LoadResult:
    """Load what a server's Settings ask for (model, revision, quant, double_quant,
    compute_dtype, device, chat_template)."""
    from .formats import quant_config

    quant = quant_config(getattr(settings, "quant", "nf4"), double_quant=getattr(settings, "double_quant", False),
                         int8_activations=getattr(settings, "int8_activations", False))
    result = load_model(
        LoadConfig(
            model=getattr(settings, "model", None),
            revision=getattr(settings, "revision", None),
            device=getattr(settings, "device", None),
            dtype=getattr(settings, "compute_dtype", None),
            quant=quant,
            quantize_lm_head=getattr(settings, "quantize_lm_head", "none"),
        )
    )
    template = getattr(settings, "chat_template", None)
    if template is not None:  # --chat-template: replaces (or supplies) the tokenizer's template
        from ..config import chat_template_text

        if result.tokenizer is None:
            raise ValueError(f"{result.report.source} has no tokenizer: a chat template cannot be applied")
        result.tokenizer.chat_template = chat_template_text(template)
    return result


def _load(config: LoadConfig) -> LoadResult:
    import transformers

    start = time.perf_counter()
    folder, description = resolve_source(config.model, config.revision, config.cache_dir)  # type: ignore[arg-type]
    hf_config = load_hf_config(folder)
    stored_quant = checkpoint_quant(hf_config, folder)
    tokenizer = load_tokenizer(folder)
    embedding_only = False
    with PeakMemory(config.device) as memory, CheckpointReader.open(folder) as reader:  # type: ignore[arg-type]
        def streamer_for(hf_config: Any) -> WeightStreamer:
            return WeightStreamer(
                hf_config, folder, config.device, config.dtype, config.quant, stored_quant, config.progress,  # type: ignore[arg-type]
                quant_stats=config.quant_stats,
            )

        streamer = streamer_for(hf_config)
        if bare_embedding_model(folder, hf_config) and streamer.head_missing(reader.names):
            # An embedding model stored without an output head: the input embedding stands in
            # (tied, no memory), so the engine runs as for any decoder; generation is refused.
            hf_config = copy.copy(hf_config)
            hf_config.tie_word_embeddings = True
            streamer = streamer_for(hf_config)
            embedding_only = True
            logger.info("%s: an embedding model without an output head: serving /v1/embeddings only", folder)
        streamer.run(reader)
    model = streamer.model
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        except (ValueError, OSError) as exc:
            logger.warning("ignoring %s: %s", folder / "generation_config.json", exc)
    num_params = count_params(model)  # before the head is quantized: the original model's count
    quantize_lm_head(model, config.quantize_lm_head)  # logs what it did
    report = LoadReport(
        source=description,
        folder=folder,
        checkpoint_format=f"bitsandbytes {'8' if streamer.quant.load_in_8bit else '4'}-bit (prequantized)"
        if streamer.prequantized else reader.format,
        device=config.device,  # type: ignore[arg-type]
        dtype=config.dtype,  # type: ignore[arg-type]
        quant=streamer.quant,
        prequantized=streamer.prequantized,
        quantized=streamer.quantized,
        skipped=streamer.skipped,
        transposed=sorted(streamer.transposed),
        unexpected_keys=streamer.unexpected,
        num_params=num_params,
        weight_bytes=model_nbytes(model),
        weight_bytes_16bit=2 * num_params,
        load_seconds=time.perf_counter() - start,
        rss_before=memory.rss_before,
        peak_rss=memory.peak_rss,
        rss_after=memory.rss_after,
        peak_rss_is_lifetime=memory.peak_rss_is_lifetime,
        device_bytes=None if memory.device_after is None else memory.device_after - (memory.device_before or 0),
        device_peak_bytes=memory.device_peak,
        layer_stats=streamer.layer_stats,
        stats_seconds=streamer.stats_seconds,
        lm_head=head_memory(model),
    )
    logger.info(report.summary())
    return LoadResult(model=model, tokenizer=tokenizer, config=config, report=report, embedding_only=embedding_only)
