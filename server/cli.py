"""The `quantserve` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from typing import Any, Callable, Optional, Sequence


def _cmd_env(args: argparse.Namespace) -> int:
    """Print what quantserve runs on: versions, devices and which kernel backends are active."""
    import torch

    import quantserve.quant as quant  # noqa: F401 - registers the backends
    from quantserve.quant.backends import backend_report

    print(f"quantserve      {metadata.version('quantserve')}")
    print(f"python          {platform.python_version()} ({platform.machine()})")
    print(f"torch           {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"cuda            {torch.cuda.is_available() and torch.cuda.get_device_name(0) or 'not available'}")
    for name, status in backend_report().items():
        print(f"backend {name:<8}{status}")
    return 0


# Options of the commands other than serve that are not Settings fields (serve takes no blocksize:
# it serves with bitsandbytes' 64).
_OPTIONS: dict[str, dict[str, Any]] = {
    "--blocksize": dict(type=int, default=64, help="weights per absmax block, a power of two 32..4096 (default: 64)"),
    "--quant-storage": dict(choices=["uint8", "int8", "float16", "bfloat16", "float32"], default="uint8",
                            help="dtype the packed 4-bit bytes are stored as (default: uint8)"),
    "--skip-modules": dict(metavar="NAME[,NAME...]",
                           help="comma-separated modules kept unquantized: full names or dotted parts such as "
                           "lm_head,mlp.down_proj (default: the output head and any layer tied to the embeddings)"),
    "--no-progress": dict(action="store_true", help="no progress bar while loading"),
    "--json": dict(action="store_true", help="print one JSON object"),
}
# The Settings fields that say what is loaded and how, as `serve` loads it.
_LOAD_SETTINGS = ("revision", "quant", "double_quant", "compute_dtype", "device")


def _add_options(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **_OPTIONS[flag])


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
             description: str) -> argparse.ArgumentParser:
    """A subcommand whose first argument is MODEL; a bad model or setting ends it with one line on
    stderr and exit status 1."""
    from .serve import add_settings_arguments

    parser = sub.add_parser(name, help=help, description=description)
    add_settings_arguments(parser, ("model",))
    parser.set_defaults(func=_run_reporting_errors(func))
    return parser


def _load_from_args(args: argparse.Namespace):
    import logging

    from .loading import formats
    from .loading.loader import LoadConfig, load_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    skip = None if args.skip_modules is None else [n.strip() for n in args.skip_modules.split(",") if n.strip()]
    quant_config = formats.quant_config(args.quant, double_quant=args.double_quant, blocksize=args.blocksize,
                                        storage=args.quant_storage, skip=skip)
    config = LoadConfig(
        model=args.model, revision=args.revision, device=args.device, dtype=args.compute_dtype, quant=quant_config,
        progress=not args.no_progress,
    )
    return load_model(config)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Load MODEL quantized and write it as a transformers+bitsandbytes prequantized checkpoint."""
    from .loading.export import save_quantized

    if args.quant == "none":
        raise ValueError("quantize needs a weight format: --quant nf4, fp4 or int8")
    result = _load_from_args(args)
    out = save_quantized(result, args.out_dir, max_shard_bytes=args.max_shard_mib * 2**20)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): {len(result.report.quantized)} layers "
          f"{result.report.quant.quant_name}, {len(result.report.skipped)} kept")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Load MODEL as it would be served and print what it is made of."""
    from .loading.inspection import format_inspection

    print(format_inspection(_load_from_args(args), per_layer=not args.totals_only))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Perplexity, KL divergence and top-1 agreement of each quantized format against the 16-bit model."""
    import json
    import logging
    from pathlib import Path

    import torch

    from .loading.verify import VerifyRequest, format_verify, verify

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_float32_matmul_precision(args.matmul_precision)
    text, source = None, "built-in public-domain text (server/loading/default_text.py)"
    if args.text is not None:
        try:
            text = Path(args.text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --text {args.text}: {exc}") from None
        source = args.text
    formats = [f"{q}+dq" if args.double_quant and q in ("nf4", "fp4") else q for q in args.quant]
    result = verify(VerifyRequest(
        model=args.model, revision=args.revision, formats=tuple(dict.fromkeys(formats)), text=text, text_source=source,
        window=args.window, device=args.device, dtype=args.compute_dtype, blocksize=args.blocksize,
        progress=not args.no_progress,
    ))
    print(json.dumps(result, indent=2) if args.json else format_verify(result))
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Memory each model would take, from its config and tensor index alone, whether it fits, and
    (several models, or --models-memory) whether they fit together."""
    import json

    from .loading.catalog import split_entry
    from .loading.estimate import combine, estimate_from_args, format_combined, format_estimate, models_budget

    entries = [split_entry(entry) for entry in args.model_entries] or [(None, None)]  # none: the built-in default
    estimates = [estimate_from_args(args, path) for _, path in entries]
    if len(estimates) == 1 and args.models_memory is None:  # one model: the single estimate, as ever
        est = estimates[0]
        print(json.dumps(est.as_dict(), indent=2) if args.json else format_estimate(est))
        return 0 if est.fits else 1
    names = [name or path or est.model for (name, path), est in zip(entries, estimates)]
    if len(set(names)) < len(names):
        raise ValueError(f"two models are named alike ({', '.join(names)}): name them with NAME=PATH")
    budget, source = models_budget(estimates[0].device, args.models_memory, args.gpu_memory_utilization)
    combined = combine(names, estimates, budget, source)
    print(json.dumps(combined.as_dict(), indent=2) if args.json else format_combined(combined))
    return 0 if combined.fits else 1


def _run_reporting_errors(func):
    """Run a command; a bad model or setting is one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, OSError) as exc:
            print(f"quantserve {args.command}: error: {exc}", file=sys.stderr)
            return 1

    return run


def _add_model_commands(sub: Any) -> None:
    """quantize, inspect, verify and estimate: what serve would load, looked at without serving it."""
    from .serve import add_settings_arguments

    quantize = _command(
        sub, "quantize", _cmd_quantize,
        help="write a 4-bit checkpoint that transformers + bitsandbytes (and quantserve) load as is",
        description=(
            "Load MODEL, quantizing its Linear layers to 4 bits while the weights stream in, and write "
            "OUT_DIR as a prequantized checkpoint in the transformers + bitsandbytes format (safetensors "
            "with bitsandbytes' keys, config.json with quantization_config, tokenizer): "
            "AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it without requantizing."
        ),
    )
    quantize.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist, or be empty)")
    quantize.add_argument(
        "--max-shard-mib", type=int, default=4096, help="largest safetensors shard in MiB (default: 4096)"
    )
    inspect = _command(
        sub, "inspect", _cmd_inspect,
        help="load a model as it would be served and report its layers, sizes and memory",
        description=(
            "Load MODEL with the given quantization and print, per layer, its type, whether it was "
            "quantized or kept (and why), its shape and bytes; then totals: the quantized footprint "
            "against the 16-bit size, the bits per parameter against the theory (4.5 for blocksize 64 "
            "with fp32 absmax, ~4.13 with double quantization), and the memory the load used."
        ),
    )
    inspect.add_argument("--totals-only", action="store_true", help="skip the per-layer table")
    for parser in (quantize, inspect):
        group = parser.add_argument_group("model and quantization")
        add_settings_arguments(group, _LOAD_SETTINGS)
        _add_options(group, "--blocksize", "--quant-storage", "--skip-modules", "--no-progress")

    verify = _command(
        sub, "verify", _cmd_verify,
        help="what quantizing costs on a text: perplexity, KL divergence, top-1 agreement vs 16-bit",
        description=(
            "Load MODEL unquantized and in each --quant format and read the same text with each: "
            "perplexity of both, the KL divergence of their next-token distributions (mean over "
            "positions, KL(16-bit || quantized), nats) and how often their top-1 tokens agree. The "
            "text is a built-in public-domain one (~1,000 tokens) unless --text FILE is given."
        ),
    )
    verify.add_argument("--quant", nargs="+", default=["nf4"], choices=["nf4", "fp4", "int8", "nf4+dq", "fp4+dq"],
                        help="formats to compare against the 16-bit model (default: nf4); nf4+dq = double quant")
    verify.add_argument("--text", metavar="FILE", help="a UTF-8 text file to measure on (default: the built-in text)")
    verify.add_argument("--window", type=int, help="tokens per forward pass (default: min(2048, the model's context))")
    # highest: exact float32 products, so that the figures measure the quantization alone
    add_settings_arguments(verify, ("revision", "double_quant", "compute_dtype", "device", "matmul_precision"),
                           defaults={"matmul_precision": "highest"})
    _add_options(verify, "--blocksize", "--json", "--no-progress")

    estimate = sub.add_parser(
        "estimate", help="memory models would take and whether they fit, alone and together, before loading them",
        description=(
            "From each MODEL's config and its checkpoint's tensor index alone (safetensors headers; no "
            "weight is read): the weight bytes after quantization, KV cache bytes per token and for "
            "the settings, the activation reserve, the peak while loading, and the verdict against "
            "the device's free memory, with the longest context that fits. `serve` runs the same check "
            "before loading. Several MODELs (or --models-memory): then a table of what they take "
            "together, each priced as `serve` prices a model of its registry (weights + KV cache + "
            "activations), against the models' budget (--models-memory, default as serve's), and "
            "whether they fit together or which one to leave out. Exit status 1 when a model does not "
            "fit, or the models do not fit together (as a failed check: scripts can test it)."
        ),
    )
    estimate.add_argument("model_entries", nargs="*", metavar="MODEL",
                          help="[NAME=]PATH_OR_ID, as serve takes them: an HF folder, hub id (org/name), .gguf "
                          "file or prequantized checkpoint (none: the built-in SmolLM2-135M-Instruct)")
    estimate.set_defaults(func=_run_reporting_errors(_cmd_estimate))
    add_settings_arguments(estimate, (*_LOAD_SETTINGS, "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                      "kv_cache_memory", "kv_cache_dtype", "block_size", "gpu_memory_utilization",
                                      "models_memory"))
    _add_options(estimate, "--blocksize", "--json")


def _add_serve_command(sub: Any) -> None:
    from .serve import add_serve_arguments

    serve = sub.add_parser(
        "serve",
        help="serve one or more models over an OpenAI-compatible HTTP API",
        description=(
            "Load each MODEL quantized to 4 bits (the built-in SmolLM2-135M-Instruct when none is given) and serve "
            "the OpenAI API (/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/models), "
            "Anthropic's /v1/messages, /tokenize, /detokenize, /health, /metrics and /v1/memory. The port opens at "
            "once; /health answers 503 until the startup models are loaded. Several models: a request's \"model\" "
            "picks one; models under --models-dir (or in --models-config) load on their first request, and the least "
            "recently used idle ones are unloaded to fit --models-max and --models-memory, or after --keep-alive "
            "idle; POST /models/load and /models/unload do it by hand. With one model, a model that cannot be "
            "loaded, or an engine that stops, ends the process with status 1 and a one-line reason on stderr "
            "(with several, that model answers 503 with its reason and the others serve on); SIGTERM finishes "
            "the requests in flight, then exits 0. Every flag can also be set as a QUANTSERVE_* variable."
        ),
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .serve import run, settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"quantserve serve: --{where.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantserve",
        description=(
            "quantserve: an OpenAI-compatible LLM inference server with bitsandbytes-compatible "
            "4-bit (NF4/FP4) quantization."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve_command(sub)
    env = sub.add_parser("env", help="show versions, devices and active kernel backends")
    env.set_defaults(func=_cmd_env)
    _add_model_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
