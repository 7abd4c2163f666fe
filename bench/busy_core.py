"""The thread-count controller on a real server (server/engine/cpu_load.py).

Watch mode (the default): /health's `threads`, `runqueue_delay_share` and `idle_cpus` once a
second, while a steady load runs, idle, then with a Python busy loop (`while True: pass`) for
--busy seconds, then after it stops.

Neighbours mode (--neighbours): throughput under bench/peers.py's load (N streaming chat clients,
2 requests each, 128-token prompts, 64 tokens) at --streams, on one server, three ways: idle; next
to a niced busy loop in another session (`setsid nice -n 19`: with autogroup scheduling nice does
not lower its share); next to an ordinary busy loop. Prints tok/s, TTFT p50 and the ratios to idle
(targets, issue 26: >= 0.5x at 1 and 16 streams, TTFT p50 at 1 stream <= 2x idle).

    python bench/busy_core.py                    # the built-in default model, at its defaults
    python bench/busy_core.py --serve-args "--cpu-threads 2"   # the count pinned: no controller
    python bench/busy_core.py --neighbours       # the throughput table

Exit status 0 when the server answered throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    parser.add_argument("--neighbours", action="store_true", help="the throughput table instead of watching")
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 16], help="concurrencies (--neighbours)")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if args.neighbours:
        return neighbours(args)

    server = ServerProcess(*args.serve_args, name="busy-core")
    print(f"server log: {server.log}", flush=True)
    url = server.url
    stop = threading.Event()
    try:
        model = served_model(server)
        if model is None:
            return 2

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
                      f"runqueue_delay_share={cpu.get('runqueue_delay_share')} idle_cpus={cpu.get('idle_cpus')} "
                      f"changes={cpu.get('changes')}", flush=True)
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


NEIGHBOURS = {
    "idle": None,
    "niced, another session": (["nice", "-n", "19", sys.executable, "-c", "while True: pass"], True),
    "plain busy loop": ([sys.executable, "-c", "while True: pass"], False),
}


def served_model(server: ServerProcess) -> "str | None":
    """The model id of `server` once it is ready; None (the reason printed) if it never was."""
    try:
        server.wait_ready()
    except (ServerExited, TimeoutError) as exc:
        print(exc, file=sys.stderr)
        return None
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def neighbours(args: argparse.Namespace) -> int:
    """Idle / niced in another session / plain, at each of --streams, against one server."""
    from peers import closed_loop, machine_line, make_text_prompts  # bench/peers.py: the same load

    prompts = make_text_prompts(max(args.streams) * 2, 128)
    server = ServerProcess(*args.serve_args, name="busy-core")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_line()}; "
          f"python bench/busy_core.py {' '.join(sys.argv[1:])}\n# server log: {server.log}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    try:
        model = served_model(server)
        if model is None:
            return 2
        asyncio.run(closed_loop(server.url, model, prompts, 1, 1, 4, 120))  # warm-up
        for label, neighbour in NEIGHBOURS.items():
            for c in args.streams:
                busy = None
                if neighbour is not None:
                    argv, new_session = neighbour
                    busy = subprocess.Popen(argv, start_new_session=new_session)
                    time.sleep(0.5)  # running before the first request, as a neighbour would be
                try:
                    res = asyncio.run(closed_loop(server.url, model, prompts, c, 2, 64, 120))
                finally:
                    if busy is not None:
                        os.kill(busy.pid, 9)
                        busy.wait()
                cpu = httpx.get(server.url + "/health", timeout=10).json()["cpu"]
                results[(label, c)] = res
                print(f"{label:24s} c={c:<3d} {res['tokens_per_s']:7.1f} tok/s  TTFT p50 {res['ttft_s'].get('p50')} s  "
                      f"ITL p50 {res['itl_ms'].get('p50')} ms  (threads changes {cpu.get('changes')}, probes "
                      f"{cpu.get('probes')}{', cut' if res.get('cut') else ''})", flush=True)
                time.sleep(1.0)  # the controller back at its ceiling before the next run
    finally:
        server.stop()
    print("\n| neighbour | " + " | ".join(f"tok/s @{c} (x idle)" for c in args.streams) + " | TTFT p50 @1 (x idle) |")
    print("|---|" + "---|" * (len(args.streams) + 1))
    for label in NEIGHBOURS:
        cells = []
        for c in args.streams:
            tps, idle = results[(label, c)]["tokens_per_s"], results[("idle", c)]["tokens_per_s"]
            cells.append(f"{tps:.1f} ({tps / idle:.2f}x)")
        ttft, idle_ttft = results[(label, args.streams[0])]["ttft_s"].get("p50"), results[("idle", args.streams[0])]["ttft_s"].get("p50")
        ttft_cell = f"{ttft * 1000:.0f} ms ({ttft / idle_ttft:.2f}x)" if ttft and idle_ttft else "–"
        print(f"| {label} | " + " | ".join(cells) + f" | {ttft_cell} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
