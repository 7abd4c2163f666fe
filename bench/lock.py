"""One benchmark at a time on this machine.

Every script in bench/ calls `hold()` once its arguments are parsed: it takes an exclusive flock on
one file (default /tmp/quantserve-bench.lock, or $QUANTSERVE_BENCH_LOCK) and keeps it until the
process exits, so a second benchmark waits instead of sharing the cores and spoiling both figures.
Other work (tests, builds, another project's jobs) does not take the lock: run benchmarks on a quiet
machine (see docs/benchmarks.md).

Processes a holder starts (a benchmark's child processes, the parts of bench/gpu_check.sh) inherit
QUANTSERVE_BENCH_LOCK_HELD and do not wait for the lock their parent holds.

    python bench/lock.py COMMAND [ARGS...]     # run any command under the lock (bench/gpu_check.sh does)
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import IO, Optional

LOCK_PATH = os.environ.get("QUANTSERVE_BENCH_LOCK", "/tmp/quantserve-bench.lock")
HELD_VARIABLE = "QUANTSERVE_BENCH_LOCK_HELD"

_held: Optional[IO[str]] = None  # the open lock file: closing it (or exiting) lets the lock go


def hold(path: str = LOCK_PATH) -> None:
    """Take the benchmark lock for the rest of this process, waiting while another benchmark holds it."""
    global _held
    if _held is not None or os.environ.get(HELD_VARIABLE):
        return
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        print(f"bench: waiting for the benchmark lock {path}, held by {holder}", file=sys.stderr, flush=True)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    # Who holds it, for the next one to wait: pid and command line.
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    lock_file.flush()
    os.environ[HELD_VARIABLE] = path
    _held = lock_file


def _run_under_lock(argv: list[str]) -> None:
    """Take the lock, then become COMMAND: the lock file descriptor is inherited across exec, so the
    command holds the lock until it exits."""
    hold()
    if _held is not None:
        os.set_inheritable(_held.fileno(), True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    _run_under_lock(sys.argv[1:])
