"""bench/lock.py: a benchmark waits while another holds the lock, says who holds it, and the
processes a holder starts do not wait for their parent's lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

LOCK_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "lock.py"


def _env(lock: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QUANTSERVE_BENCH_LOCK_HELD"}
    return {**env, "QUANTSERVE_BENCH_LOCK": str(lock)}


def test_a_second_benchmark_waits_for_the_first(tmp_path):
    lock, ready = tmp_path / "bench.lock", tmp_path / "ready"
    first = subprocess.Popen([sys.executable, str(LOCK_SCRIPT), "sh", "-c", f"touch {ready}; sleep 1.5"],
                             env=_env(lock))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the first holder never started"
            time.sleep(0.02)
        start = time.monotonic()
        second = subprocess.run([sys.executable, str(LOCK_SCRIPT), "true"], env=_env(lock), capture_output=True,
                                text=True, timeout=60)
        waited = time.monotonic() - start
    finally:
        first.wait(timeout=60)
    assert second.returncode == 0
    assert f"held by pid {first.pid}" in second.stderr
    # It ran only once the first let go: the first held it for 1.5 s after signalling.
    assert waited > 0.5, waited


def test_children_of_the_holder_do_not_wait(tmp_path):
    lock = tmp_path / "bench.lock"
    # The inner command takes the lock again (as a benchmark's child process would): it must not
    # wait for the lock its parent holds, or this deadlocks into the timeout.
    nested = f"{sys.executable} {LOCK_SCRIPT} sh -c 'echo inner:$QUANTSERVE_BENCH_LOCK_HELD'"
    proc = subprocess.run([sys.executable, str(LOCK_SCRIPT), "sh", "-c", nested], env=_env(lock),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"inner:{lock}" in proc.stdout
    assert "waiting" not in proc.stderr
