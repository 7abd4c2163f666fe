"""A loaded model's Python objects are out of the cyclic garbage collector's way: a full collection
while serving (the GIL held, every stream waiting) does not walk the model, the tokenizer and what
loading built; unloading still frees the model."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import weakref

import torch

from quantserve.server.api.load_thread import give_back_memory
from quantserve.server.config import Settings


def _full_collection_seconds() -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - start)
    return best


def test_a_full_collection_skips_the_loaded_model():
    from quantserve.server import serve

    settings = Settings()
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    serve.prepare_process(settings)  # process-wide: restored below for the tests that follow
    served = serve.load_served_model(settings)
    try:
        frozen = _full_collection_seconds()
        tracked_frozen = len(gc.get_objects())
        gc.unfreeze()
        walked = _full_collection_seconds()
        tracked_all = len(gc.get_objects())
        gc.freeze()
        # What the load left is frozen: the collector tracks a small part of the objects, and a full
        # collection takes a fraction of what it takes once they are unfrozen.
        assert tracked_frozen * 5 < tracked_all, (tracked_frozen, tracked_all)
        assert frozen * 3 < walked, (frozen, walked)

        model = weakref.ref(served.engine.runner.model)
        asyncio.run(served.engine.shutdown())
        del served
        give_back_memory()  # what the registry runs after an unload: unfreeze, collect, freeze
        assert model() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)


def test_no_leak_report_at_exit(tmp_path):
    """Frozen objects are unfrozen at exit, so the interpreter's last collection frees them: a
    native extension's leak report (nanobind prints one for instances alive at exit) stays silent."""
    script = tmp_path / "load_and_exit.py"
    script.write_text(
        "from quantserve.server import serve\n"
        "from quantserve.server.config import Settings\n"
        "settings = Settings()\n"
        "serve.prepare_process(settings)\n"
        "served = serve.load_served_model(settings)\n"
        "print('loaded', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    assert "leaked" not in proc.stderr and "refleaks" not in proc.stderr, proc.stderr[-2000:]
