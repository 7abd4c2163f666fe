"""Autotuning choices of the 4-bit matmul kernels kept on disk per GPU, so a server starts warm.

Triton's autotuner benchmarks every surviving configuration the first time it meets a key (M bucket,
N, K, blocksize, nesting, dtypes): seconds per shape, minutes for a model. The server tunes every
shape x M bucket it can meet during startup (model_runner.py), then saves each tuner's choices here;
the next start on the same GPU loads them into the tuners and benchmarks nothing.

    <cache root>/autotune/<GPU name>-<hash>.json    {"<tuner>": [[key...], {config}], ...}

The hash covers the Triton version and the source of the kernels and of configs.py, so a changed
kernel or configuration list never reuses stale choices; a saved config no longer in the tuner's
list is dropped when loading. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import triton

from ..cache import cache_root

logger = logging.getLogger(__name__)

_SOURCES = ("configs.py", "gemm.py", "gemv.py", "tiles.py")


def cache_path(gpu_name: str, root: Path | None = None) -> Path:
    h = hashlib.sha256(triton.__version__.encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-") or "gpu"
    return (root or cache_root()) / "autotune" / f"{slug}-{h.hexdigest()[:16]}.json"


def _config_dict(config: "triton.Config") -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _same(a: "triton.Config", b: Mapping[str, Any]) -> bool:
    return _config_dict(a) == dict(b)


def save(tuners: Mapping[str, Any], path: Path) -> int:
    """Write every tuner's cache (key -> chosen config); returns how many entries."""
    data = {name: [[list(key), _config_dict(cfg)] for key, cfg in tuner.cache.items()] for name, tuner in tuners.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return sum(len(v) for v in data.values())


def load(tuners: Mapping[str, Any], path: Path) -> int:
    """Put the saved choices into the tuners' caches (keys as tuples, configs from each tuner's own
    list); returns how many were restored. A missing or unreadable file restores nothing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    restored = 0
    for name, tuner in tuners.items():
        for key, saved in data.get(name, []):
            config = next((c for c in tuner.configs if _same(c, saved)), None)
            if config is None:
                continue
            tuner.cache[tuple(key)] = config
            restored += 1
    return restored
