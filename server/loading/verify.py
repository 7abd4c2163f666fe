"""What quantizing costs a model on a text: `quantserve verify`.

The unquantized model and each quantized one read the same tokens in the same non-overlapping
windows; per format: perplexity, the KL divergence of the next-token distributions
KL(p_16bit || p_quantized) averaged over positions, and how often their top-1 tokens agree.

    result = verify(VerifyRequest(model=None, formats=("nf4", "nf4+dq", "fp4", "int8")))
    result["perplexity_16bit"], result["formats"]["nf4"]["kl_divergence"]

For int8 the figures are the default forward's (int8 weights, float activations: the dequantized-
weight matmul) and, under "int8_activations", those of the opt-in --int8-activations (activations
quantized to int8 too, LLM.int8 proper) on the same loaded weights; every format also reports the
quantized model's forward speed over the text (tokens_per_second), so the opt-in's cost and speed
stand side by side.

The unquantized model keeps at most one window's logits per call: it stays loaded beside one
quantized model at a time, and its logits are cached for the whole text only while they are
small (CACHE_LIMIT_BYTES), else recomputed per format.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Optional

import torch

from quantserve.quant import QuantConfig

from . import formats

FORMATS = ("nf4", "nf4+dq", "fp4", "fp4+dq", "int8")
CACHE_LIMIT_BYTES = 512 * 2**20


def quant_config(name: str, blocksize: int = 64) -> QuantConfig:
    """nf4 / fp4 (+dq: double quantization) / int8 as a QuantConfig."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    kind, _, dq = name.partition("+")
    return formats.quant_config(kind, double_quant=bool(dq), blocksize=blocksize)


@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    model: Optional[str] = None
    revision: Optional[str] = None
    formats: tuple[str, ...] = ("nf4",)
    text: Optional[str] = None  # None: the built-in text (default_text.TEXT)
    text_source: str = "built-in public-domain text"
    window: Optional[int] = None  # tokens per forward; None: min(2048, the model's context)
    device: Optional[str] = None
    dtype: Optional[str] = None
    blocksize: int = 64
    cache_dir: Optional[str] = None
    progress: bool = True


def window_log_probs(model: Any, ids: torch.Tensor, window: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 log-probabilities [n, V] of each next token, the tokens [n]) window by window,
    non-overlapping: every token after the first is predicted exactly once."""
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window + 1]
            logits = model(chunk[:, :-1]).logits[0].float()
            yield torch.log_softmax(logits, dim=-1), chunk[0, 1:]


def perplexity(model: Any, ids: torch.Tensor, window: int = 2048) -> float:
    """exp(mean negative log-likelihood of each next token), non-overlapping windows."""
    nll, count = 0.0, 0
    for logp, targets in window_log_probs(model, ids, window):
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


class _Timed:
    """An iterator that adds up the seconds spent producing its items (the candidate's forwards,
    not the comparison's arithmetic)."""

    def __init__(self, items: Iterator) -> None:
        self.items, self.seconds = items, 0.0

    def __iter__(self) -> "_Timed":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.seconds += time.perf_counter() - start


def _measure(reference: Iterator, model: Any, ids: torch.Tensor, window: int, tick: Callable[[], None]) -> dict:
    timed = _Timed(window_log_probs(model, ids, window))
    figures = compare(reference, timed, tick)
    figures["tokens_per_second"] = figures["tokens"] / timed.seconds if timed.seconds > 0 else None
    return figures


def _set_int8_activations(model: Any, on: bool) -> int:
    from quantserve.quant import Linear8bitLt

    layers = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    for layer in layers:
        layer.int8_activations = on
    return len(layers)


def compare(reference: Iterator, candidate: Iterator, tick: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Perplexities of both, KL(reference || candidate) per position (mean, and the largest) and
    top-1 agreement, over paired windows of log-probabilities."""
    nll_ref = nll_cand = kl_sum = 0.0
    kl_max, agree, count = 0.0, 0, 0
    for (ref, targets), (cand, targets2) in zip(reference, candidate):
        if not torch.equal(targets, targets2):
            raise RuntimeError("the two models were given different windows")
        nll_ref -= ref.gather(1, targets[:, None]).sum().item()
        nll_cand -= cand.gather(1, targets[:, None]).sum().item()
        # sum_v p(v) (log p(v) - log q(v)), per position
        kl = (ref.exp() * (ref - cand)).sum(dim=-1)
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        count += targets.numel()
        tick()
    return {
        "perplexity_16bit": math.exp(nll_ref / count),
        "perplexity_quantized": math.exp(nll_cand / count),
        "kl_divergence": kl_sum / count,
        "kl_divergence_max": kl_max,
        "top1_agreement": agree / count,
        "tokens": count,
    }


def verify(request: VerifyRequest) -> dict[str, Any]:
    """Load the model unquantized and in each format; measure them on the text (see the module
    docstring). ValueError for a bad model, format or text."""
    from tqdm.auto import tqdm

    from .default_text import TEXT
    from .loader import LoadConfig, load_model

    if not request.formats:
        raise ValueError("give at least one format (--quant nf4, fp4, int8 ...)")
    configs = {name: quant_config(name, request.blocksize) for name in request.formats}
    base = LoadConfig(model=request.model, revision=request.revision, device=request.device, dtype=request.dtype,
                      quant=None, cache_dir=request.cache_dir, progress=False)
    started = time.perf_counter()
    reference = load_model(base)
    if reference.tokenizer is None:
        raise ValueError(f"{reference.report.source} has no tokenizer: verify needs one to read the text")
    text = TEXT if request.text is None else request.text
    ids = reference.tokenizer(text, return_tensors="pt").input_ids.to(base.device)
    if ids.shape[1] < 2:
        raise ValueError("the text is shorter than two tokens")
    from quantserve.server.engine.models import model_max_len

    window = request.window or min(2048, model_max_len(reference.model, reference.tokenizer))
    windows = -(-(ids.shape[1] - 1) // window)
    vocab = reference.model.get_output_embeddings().weight.shape[0]
    cached = None
    if (ids.shape[1] - 1) * vocab * 4 <= CACHE_LIMIT_BYTES:
        cached = list(window_log_probs(reference.model, ids, window))

    def reference_windows() -> Iterator:
        return iter(cached) if cached is not None else window_log_probs(reference.model, ids, window)

    result: dict[str, Any] = {
        "model": reference.report.source,
        "text": {"source": request.text_source, "tokens": int(ids.shape[1]), "characters": len(text)},
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "window": window,
        "baseline": "unquantized: Linear weights in the compute dtype, embeddings and head at 16 bits "
                    "(as quantserve serves them)",
        "perplexity_16bit": None,
        "formats": {},
    }
    passes = len(configs) + sum(q.load_in_8bit for q in configs.values())  # int8: also with int8 activations
    bar = tqdm(total=passes * windows, desc="verify", unit="window", disable=not request.progress)
    for name, quant in configs.items():
        bar.set_postfix_str(f"loading {name}")
        loaded = load_model(dataclasses.replace(base, quant=quant))
        bar.set_postfix_str(name)
        figures = _measure(reference_windows(), loaded.model, ids, window, bar.update)
        result["perplexity_16bit"] = figures.pop("perplexity_16bit")
        if quant.load_in_8bit and _set_int8_activations(loaded.model, not quant.llm_int8_activations):
            bar.set_postfix_str(f"{name}, int8 activations")
            other = _measure(reference_windows(), loaded.model, ids, window, bar.update)
            other.pop("perplexity_16bit")
            other.pop("tokens")
            other["perplexity_ratio"] = other["perplexity_quantized"] / result["perplexity_16bit"]
            figures["int8_activations"] = other
        summary = loaded.report.quantization_summary()
        figures["perplexity_ratio"] = figures["perplexity_quantized"] / result["perplexity_16bit"]
        figures["bits_per_param"] = summary["bits_per_param"]
        figures["weight_rel_error_mean"] = summary["rel_error_mean"]
        figures["weight_bytes"] = loaded.report.weight_bytes
        figures.pop("tokens")
        result["formats"][name] = figures
        del loaded
    bar.close()
    result["weight_bytes_16bit"] = reference.report.weight_bytes
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def format_verify(result: dict[str, Any]) -> str:
    lines = [
        f"model      {result['model']} on {result['device']} ({result['dtype']}, matmul precision "
        f"{result['matmul_precision']})",
        f"text       {result['text']['source']}: {result['text']['tokens']} tokens, windows of {result['window']}",
        f"16-bit     perplexity {result['perplexity_16bit']:.4f}",
        "",
        f"{'format':<10} {'perplexity':>10} {'x 16-bit':>9} {'KL div':>9} {'KL max':>8} {'top-1 agree':>11} "
        f"{'bits/param':>10} {'weight err':>10} {'tok/s':>8}",
    ]

    def row(label: str, f: dict, bits: str, err: str) -> str:
        speed = f.get("tokens_per_second")
        return (f"{label:<10} {f['perplexity_quantized']:>10.4f} {f['perplexity_ratio']:>9.4f} "
                f"{f['kl_divergence']:>9.5f} {f['kl_divergence_max']:>8.3f} {f['top1_agreement']:>11.2%} {bits:>10} "
                f"{err:>10} {'-' if speed is None else format(speed, '.0f'):>8}")

    notes = []
    for name, f in result["formats"].items():
        err = f["weight_rel_error_mean"]
        err_text = "null" if err is None else format(err, ".5f")
        lines.append(row(name, f, format(f["bits_per_param"], ".3f"), err_text))
        acts = f.get("int8_activations")
        if acts is not None:
            lines.append(row(f"{name}+acts", acts, "same", "same"))
            speed, speed_acts = f.get("tokens_per_second"), acts.get("tokens_per_second")
            ratio = f"{speed_acts / speed:.2f}x the default's speed, " if speed and speed_acts else ""
            notes.append(f"{name}+acts: --int8-activations (activations quantized to int8 too, LLM.int8 proper, "
                         f"bitsandbytes' eval forward): {ratio}perplexity "
                         f"{100 * (acts['perplexity_quantized'] / f['perplexity_quantized'] - 1):+.2f}% over the "
                         f"default int8 forward (int8 weights, float activations)")
    lines.append("")
    lines.extend(notes)
    lines.append("KL div: mean over positions of KL(p_16bit || p_quantized) in nats; top-1 agree: share of positions "
                 "whose most likely next token is the same; weight err: mean relative Frobenius error per layer; "
                 "tok/s: the quantized model's forward over the text (windows of the given size)")
    return "\n".join(lines)
