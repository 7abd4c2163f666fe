"""`quantserve estimate` against what /v1/memory measures after a real load (its model_memory,
in-process), for the default model and small random models of the family tests.

    python bench/estimate.py [--families qwen3,gpt_neox] [--kv-cache-memory 0.25]

Per model and format: the estimated and the measured weight bytes (resident while serving) and
KV cache bytes, and the estimate's error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="qwen3,gpt_neox")
    parser.add_argument("--formats", default="nf4,nf4+dq,fp4,int8")
    parser.add_argument("--kv-cache-memory", type=float, default=0.25)
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.server.engine import family_models as fm

    from quantserve.server.api.memory import model_memory
    from quantserve.server.api.registry import ServedModel
    from quantserve.server.engine import EngineConfig
    from quantserve.server.engine.engine import AsyncEngine
    from quantserve.server.loading.estimate import EstimateRequest, estimate_memory
    from quantserve.server.loading.loader import LoadConfig, load_model
    from quantserve.server.loading.verify import quant_config

    root = Path(tempfile.mkdtemp())
    models: dict[str, str | None] = {"SmolLM2-135M-Instruct (default)": None}
    for family in args.families.split(","):
        cls_name, values = fm.FAMILIES[family]
        torch.manual_seed(0)
        config = getattr(transformers, cls_name)(**fm.COMMON, **{k: v for k, v in values.items() if k not in fm.COMMON})
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
        models[f"random {family} (tests' family model)"] = str(root / family)
    print("| model | format | weights estimated | weights /v1/memory | error | KV cache estimated | KV cache /v1/memory |")
    print("|---|---|---|---|---|---|---|")
    for label, folder in models.items():
        for fmt in args.formats.split(","):
            q = quant_config(fmt)
            est = estimate_memory(EstimateRequest(model=folder, quant=q, kv_cache_memory=args.kv_cache_memory))
            result = load_model(LoadConfig(folder, quant=q, progress=False))
            engine = AsyncEngine(result.model, result.tokenizer, EngineConfig(kv_cache_memory=args.kv_cache_memory))
            served = ServedModel("m", engine, result.tokenizer, engine.max_model_len, load_report=result.report)
            measured = model_memory(served)
            weights, kv = measured["weights"]["weight_bytes"], measured["kv_cache"]["bytes_total"]
            print(f"| {label} | {fmt} | {est.weight_bytes:,} | {weights:,} | {est.weight_bytes / weights - 1:+.2%} | "
                  f"{est.kv_cache_bytes:,} | {kv:,} |", flush=True)
            del engine, served, result


if __name__ == "__main__":
    main()
