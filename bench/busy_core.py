"""The thread-count controller on a real server (server/engine/cpu_load.py): /health's `threads`
and `others_cpus` once a second, while a steady load runs, idle, then with a Python busy loop
(`while True: pass`, an unniced process) for --busy seconds, then after it stops.

    python bench/busy_core.py                    # the built-in default model, at its defaults
    python bench/busy_core.py --serve-args "--cpu-threads 2"   # the count pinned: no controller

Prints one line per second; exit status 0 when the server answered throughout.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time

import httpx

from quantserve.server.testing import ServerExited, ServerProcess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=4.0, help="seconds before the busy loop starts")
    parser.add_argument("--busy", type=float, default=8.0, help="seconds the busy loop runs")
    parser.add_argument("--after", type=float, default=6.0, help="seconds watched after it stops")
    parser.add_argument("--serve-args", type=shlex.split, default="", help="extra `quantserve serve` flags")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()

    server = ServerProcess(*args.serve_args, name="busy-core")
    print(f"server log: {server.log}", flush=True)
    url = server.url
    stop = threading.Event()
    try:
        try:
            server.wait_ready()
        except (ServerExited, TimeoutError) as exc:
            print(exc, file=sys.stderr)
            return 2
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        def load() -> None:  # one stream after another, so the engine keeps stepping
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.is_set():
                    client.post("/v1/completions", json=body)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()

        def watch(label: str, seconds: float) -> None:
            end = time.time() + seconds
            while time.time() < end:
                cpu = httpx.get(url + "/health", timeout=10).json()["cpu"]
                print(f"{time.strftime('%H:%M:%S')} {label:5} threads={cpu['threads']} "
                      f"others_cpus={cpu.get('others_cpus')} changes={cpu.get('changes')}", flush=True)
                time.sleep(1.0)

        watch("idle", args.idle)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            watch("busy", args.busy)
        finally:
            busy.kill()
            busy.wait()
        watch("after", args.after)
        stop.set()
        loader.join(timeout=120)
        return 0
    finally:
        stop.set()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
