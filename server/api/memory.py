"""Memory, measured: devices, host, model weights as resident vs their 16-bit size, KV cache.

Saving memory is what this project is for, so /v1/memory and the quantserve_* gauges show where
every byte goes. All figures are read live; nothing is estimated except the 16-bit reference size.
The weights are counted as the serving engine holds them (every tensor of the model and of the
engine's model adapter, each storage once and whole, by dtype): what loading reported can differ
(the native path decodes a double-quantized absmax to float32 once, for its fused matmuls), and
both are shown.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Optional

import torch


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_memory() -> dict[str, Optional[int]]:
    """Resident set size now and at its peak, and the machine's total / available memory."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)
    info: dict[str, Optional[int]] = {"rss_bytes": _proc_status_bytes("VmRSS"), "peak_rss_bytes": peak}
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        info["total_bytes"] = mem.get("MemTotal")
        info["available_bytes"] = mem.get("MemAvailable")
    except OSError:
        info["total_bytes"] = info["available_bytes"] = None
    return info


def device_memory() -> list[dict[str, Any]]:
    """One entry per visible CUDA device (an empty list on a CPU-only machine)."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({
                "device": f"cuda:{i}",
                "name": torch.cuda.get_device_name(i),
                "total_bytes": total,
                "free_bytes": free,
                "allocated_bytes": torch.cuda.memory_allocated(i),
                "reserved_bytes": torch.cuda.memory_reserved(i),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(i),
            })
    return devices


def model_memory(served: Any) -> dict[str, Any]:
    """Weights as resident while serving (and as loaded) vs 16-bit; KV cache and prefix cache from the engine."""
    report = served.load_report
    at_load = getattr(report, "weight_bytes", None)
    resident = served.engine.weight_memory() if callable(getattr(served.engine, "weight_memory", None)) else None
    weights = {
        "weight_bytes": resident["total"] if resident else at_load,
        "weight_bytes_by_dtype": {k: v for k, v in resident.items() if k != "total"} if resident else None,
        "weight_bytes_at_load": at_load,
        "weight_bytes_16bit": getattr(report, "weight_bytes_16bit", None),
        "quantized_layers": len(getattr(report, "quantized", []) or []),
        "kept_layers": len(getattr(report, "skipped", {}) or {}),
        # The output head as held after loading (--quantize-lm-head): quantization, dtype, bytes, tied.
        "lm_head": getattr(report, "lm_head", None),
    }
    if weights["weight_bytes"] and weights["weight_bytes_16bit"]:
        weights["saving_ratio"] = round(weights["weight_bytes_16bit"] / weights["weight_bytes"], 3)
    stats = served.engine.stats()
    kv = {
        "blocks_total": stats.num_kv_blocks,
        "blocks_used": round(stats.kv_cache_usage * stats.num_kv_blocks),
        "usage": stats.kv_cache_usage,
        "bytes_total": getattr(stats, "kv_cache_bytes", None),
        "dtype": getattr(stats, "kv_cache_dtype", None) or None,  # --kv-cache-dtype as resolved
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
    }
    if kv["bytes_total"] is not None:
        kv["bytes_used"] = int(kv["bytes_total"] * stats.kv_cache_usage)
        if stats.num_kv_blocks:  # 2 x layers x KV heads x head dim x the dtype's bytes
            kv["bytes_per_token"] = kv["bytes_total"] // (stats.num_kv_blocks * stats.block_size)
    out = {"model": served.name, "weights": weights, "kv_cache": kv}
    loras = getattr(served.engine, "loras", None)
    if loras is not None and loras.list():  # adapters held beside the base (never merged into it)
        held = loras.list()
        out["lora_adapters"] = {"count": len(held), "bytes": sum(a.num_bytes for a in held),
                                "dtype": str(loras.dtype).removeprefix("torch."),
                                "by_name": {a.name: a.num_bytes for a in held}}
    plan = served.engine.device_memory_plan() if callable(getattr(served.engine, "device_memory_plan", None)) else {}
    if plan:  # on a GPU: how --gpu-memory-utilization was shared out at startup (model_runner._gpu_budget)
        out["device_budget"] = plan
    return out
