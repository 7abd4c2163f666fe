"""A stand-in engine for the real CPU-load tests: one thread steps a decode-like loop (hundreds of
small OpenMP regions per step, torch's own pool) and calls the real CpuLoadFollower between steps;
the main thread prints the follower's report as one JSON line every 0.05 s.

    python cpu_load_child.py CPU0,CPU1      # waits for a line on stdin (the parent may move it
                                            # into a cgroup first), then runs until stdin closes
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

from quantserve.server.engine.cpu_load import CpuLoadFollower


def main() -> None:
    cpus = [int(c) for c in sys.argv[1].split(",")]
    os.sched_setaffinity(0, cpus)
    sys.stdin.readline()  # "go": we are where the parent wants us (cgroup)
    state: dict[str, object] = {"steps": 0}
    stop = threading.Event()

    def engine() -> None:
        torch.set_num_threads(len(cpus))
        follower = CpuLoadFollower(ceiling=len(cpus), cpus=cpus)
        state["follower"] = follower
        x, y, z = (torch.rand(1 << 17) for _ in range(3))  # 512 KiB each: split over the threads
        while not stop.is_set():
            follower.maybe_update()
            for _ in range(200):  # one "step": 200 parallel regions of ~20-50 us
                torch.mul(x, y, out=z)
            state["steps"] = int(state["steps"]) + 1  # type: ignore[arg-type]

    worker = threading.Thread(target=engine, daemon=True)
    worker.start()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        follower = state.get("follower")
        if follower is not None:
            report = follower.report()  # type: ignore[attr-defined]
            print(json.dumps({"t": time.monotonic(), "steps": state["steps"], **report}), flush=True)
        time.sleep(0.05)
    worker.join(timeout=5)


if __name__ == "__main__":
    main()
