"""Seconds from a serve command to a healthy server, and where they go.

Starts the command on a free port (`--port N` is appended), polls GET /health every 0.1 s until it
answers 200, then stops the server with SIGTERM; --runs times. Prints each run's seconds to healthy
and, for the last run, the server's own log lines at their offsets from the start, which show the
phases: set-up (scripts/setup.sh) until the first line, imports, model load, engine build, warm-up.

    python bench/startup.py                                   # bash scripts/serve.sh, 3 runs
    python bench/startup.py --runs 1 -- .venv/bin/quantserve serve   # the server alone, no set-up

The first start on a machine also converts the default model's GGUF and compiles the native kernels
into $QUANTSERVE_CACHE (default ~/.cache/quantserve); point QUANTSERVE_CACHE at an empty folder to
time that cold start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The server's log format (server/serve.py): "2026-01-01 12:00:00,123 INFO name: message"
STAMPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):  # 503 while loading, refused before the port opens
        return False


def one_start(command: list[str], timeout: float) -> tuple[float, list[tuple[float, str]]]:
    """(seconds to healthy, [(offset s, log line)]) for one start of `command`."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        wall0, t0 = time.time(), time.perf_counter()
        # Its own session, so that SIGTERM reaches the server that serve.sh execs and nothing else.
        proc = subprocess.Popen([*command, "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while not healthy(port):
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log.read()[-3000:]}")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"not healthy after {timeout:.0f} s")
                time.sleep(0.1)
            seconds = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        log.seek(0)
        lines = []
        for line in log.read().splitlines():
            match = STAMPED.match(line)
            if match:
                when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append((when - wall0, match.group(2)))
        return seconds, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one start may take")
    parser.add_argument("command", nargs="*", default=["bash", "scripts/serve.sh"],
                        help="the serve command (default: bash scripts/serve.sh), after --")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()

    print(f"command: {' '.join(args.command)} --port N; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} before the first run", flush=True)
    times = []
    for run in range(1, args.runs + 1):
        seconds, lines = one_start(args.command, args.timeout)
        times.append(seconds)
        print(f"run {run}: healthy after {seconds:.1f} s", flush=True)
    if len(times) > 1:
        print(f"median {statistics.median(times):.1f} s, min {min(times):.1f} s, max {max(times):.1f} s")
    print("\nthe last run's log, seconds from the start:")
    for offset, text in lines:
        print(f"{offset:7.2f}  {text[:150]}")
    print(f"{seconds:7.2f}  GET /health answers 200")
    return 0


if __name__ == "__main__":
    sys.exit(main())
