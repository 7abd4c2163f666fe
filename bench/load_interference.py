"""What a thread working beside the device worker costs the model it serves (issue 23's "loading
beside serving"): one engine on the default model serves 8 closed-loop requests of 64 tokens
in-process (no HTTP), --seconds per window, idle and then beside a background thread at the
registry's loader priority (nice 19, one compute thread, GIL switch interval 0.5 ms) that runs:

- py: pure Python (holds the GIL, as a loader building modules does);
- c: a 512x512 float32 matmul loop (releases the GIL: CPU and memory only);
- load: the registry's own load of a second copy of the model, again and again.

    python bench/load_interference.py --seconds 6

Takes the bench lock (bench/lock.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per measured window")
    args = parser.parse_args()
    from lock import hold

    hold()
    import torch

    from quantserve.server.api.load_thread import BACKGROUND_SWITCH_INTERVAL, lower_this_thread
    from quantserve.server.config import Settings
    from quantserve.server.engine.sequence import SamplingParams
    from quantserve.server.loading.default_model import default_model_folder
    from quantserve.server.serve import load_served_model, prepare_process

    settings = Settings(model=str(default_model_folder()), kv_cache_memory=0.25)
    prepare_process(settings)
    served = load_served_model(settings)
    stop = threading.Event()

    def background(work):
        def run() -> None:
            lower_this_thread()
            sys.setswitchinterval(BACKGROUND_SWITCH_INTERVAL)
            while not stop.is_set():
                work()
        return run

    def python_work() -> None:
        x = 0
        for i in range(1000):
            x += i

    a = torch.randn(512, 512)
    works = {"py": python_work, "c": lambda: a @ a,
             "load": lambda: load_served_model(settings.model_copy(update={"served_model_name": "b"}))}

    async def measure(seconds: float) -> float:
        tokens = [0]
        end = time.monotonic() + seconds

        async def client(i: int) -> None:
            k = 0
            while time.monotonic() < end:
                stream = served.engine.generate(list(range(100, 140)), SamplingParams(max_tokens=64, ignore_eos=True),
                                                f"r{i}-{k}")
                async for out in stream:
                    if time.monotonic() >= end:  # only tokens inside the window count
                        break
                    tokens[0] += sum(len(o.token_ids) for o in out.outputs)
                await stream.aclose()  # aborted if unfinished
                k += 1

        await asyncio.gather(*(client(i) for i in range(8)))
        return tokens[0] / seconds

    async def run() -> None:
        await served.engine.start()
        await measure(3)
        idle = await measure(args.seconds)
        print(f"idle: {idle:.1f} tok/s", flush=True)
        for name, work in works.items():
            stop.clear()
            thread = threading.Thread(target=background(work), daemon=True)
            thread.start()
            rate = await measure(args.seconds)
            stop.set()
            thread.join()
            sys.setswitchinterval(0.005)
            print(f"beside {name}: {rate:.1f} tok/s ({rate / idle:.2f}x idle)", flush=True)
        await served.engine.shutdown()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
