"""Model registry benchmark (issue 23): what serving several models on one box costs.

One real `quantserve serve --models-dir DIR` whose DIR holds the default model twice, as `a` and `b`
(two names, two separate loads: the same size, so each one alone is the same work). Measured in one
run, in order:

1. switching: a streamed chat for `a` while nothing is loaded. Its time to first token minus the
   load time the server reports for it (/v1/models load_seconds): what a switch costs beyond the
   load itself (target <= 0.5 s);
2. loading beside serving: `a` serves --streams closed-loop streams; its tokens/s while `b` loads
   (POST /models/load, until it answers) against the mean of the windows just before and just after
   (target: at most 5% slower);
3. two models at once: --streams streams on `a` alone, on `b` alone, then on both together (each
   --window seconds): the total against the sum of the two alone (target >= 0.9x);
4. unloading: the server's RSS (/v1/memory) with `b` loaded and after POST /models/unload, against
   `b`'s weight bytes (target: >= 90% of them given back).

    python bench/registry.py                      # 8 streams, 64-token answers, 10 s windows
    python bench/registry.py --streams 8 --window 15 --json docs/registry.json

Takes the bench lock (bench/lock.py): run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from quantserve.server.testing import ServerProcess  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper."


class Streams:
    """`n` closed-loop clients streaming chats of `tokens` tokens for `model`; counts tokens by time."""

    def __init__(self, url: str, model: str, n: int, tokens: int) -> None:
        self.url, self.model, self.n, self.tokens = url, model, n, tokens
        self.stamps: list[float] = []  # monotonic time of every streamed token
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _client(self, http: httpx.AsyncClient) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": self.tokens,
                "stream": True, "ignore_eos": True}
        while not self._stop.is_set():
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        self.errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                        await asyncio.sleep(0.5)
                        continue
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            self.stamps.append(time.monotonic())
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def start(self, http: httpx.AsyncClient) -> None:
        self._tasks = [asyncio.create_task(self._client(http)) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.stamps) / (end - start)


async def card(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    return (await http.get(f"/v1/models/{model}")).json()


async def rss(http: httpx.AsyncClient) -> int:
    return (await http.get("/v1/memory")).json()["host"]["rss_bytes"]


async def switching(http: httpx.AsyncClient) -> dict[str, Any]:
    body = {"model": "a", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "stream": True}
    sent = time.monotonic()
    first: Optional[float] = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first is None and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = time.monotonic()
    assert first is not None, "no token streamed"
    load = (await card(http, "a"))["load_seconds"]
    return {"ttft_s": round(first - sent, 3), "load_s": round(load, 3), "beyond_load_s": round(first - sent - load, 3)}


async def loading_beside_serving(http: httpx.AsyncClient, url: str, args: argparse.Namespace) -> dict[str, Any]:
    streams = Streams(url, "a", args.streams, args.tokens)
    streams.start(http)
    await asyncio.sleep(args.warmup)
    before = time.monotonic()
    await asyncio.sleep(args.window)
    load_start = time.monotonic()
    answer = await http.post("/models/load", json={"model": "b"}, timeout=600)
    load_end = time.monotonic()
    await asyncio.sleep(args.window)
    after = time.monotonic()
    await streams.stop()
    assert answer.status_code == 200, answer.text
    idle = statistics.mean([streams.rate(before, load_start), streams.rate(load_end, after)])
    during = streams.rate(load_start, load_end)
    return {"tok_s_idle": round(idle, 1), "tok_s_while_loading": round(during, 1),
            "load_s": round(load_end - load_start, 2), "slowdown": round(1 - during / idle, 3),
            "errors": streams.errors[:3]}


async def two_models(http: httpx.AsyncClient, url: str, args: argparse.Namespace) -> dict[str, Any]:
    async def measure(models: list[str]) -> dict[str, float]:
        runs = {m: Streams(url, m, args.streams, args.tokens) for m in models}
        for s in runs.values():
            s.start(http)
        await asyncio.sleep(args.warmup)
        start = time.monotonic()
        await asyncio.sleep(args.window)
        end = time.monotonic()
        for s in runs.values():
            await s.stop()
        errors = [e for s in runs.values() for e in s.errors]
        assert not errors, errors[:3]
        return {m: s.rate(start, end) for m, s in runs.items()}

    alone_a = (await measure(["a"]))["a"]
    alone_b = (await measure(["b"]))["b"]
    both = await measure(["a", "b"])
    total = sum(both.values())
    return {"tok_s_a_alone": round(alone_a, 1), "tok_s_b_alone": round(alone_b, 1),
            "tok_s_both": {m: round(v, 1) for m, v in both.items()}, "tok_s_both_total": round(total, 1),
            "ratio_to_sum": round(total / (alone_a + alone_b), 3),
            "ratio_to_mean": round(total / statistics.mean([alone_a, alone_b]), 3)}


async def unloading(http: httpx.AsyncClient) -> dict[str, Any]:
    loaded = await rss(http)
    weights = (await card(http, "b"))["memory"]["weight_bytes"]
    answer = await http.post("/models/unload", json={"model": "b"})
    assert answer.status_code == 200, answer.text
    await asyncio.sleep(1.0)
    after = await rss(http)
    return {"rss_loaded_mib": round(loaded / 2**20, 1), "rss_unloaded_mib": round(after / 2**20, 1),
            "weight_mib": round(weights / 2**20, 1), "returned_of_weights": round((loaded - after) / weights, 3)}


async def priced(http: httpx.AsyncClient, timeout: float = 120) -> None:
    """Until the server has priced every model (its startup work, done once)."""
    deadline = time.monotonic() + timeout
    while any(m["memory"] is None for m in (await http.get("/v1/models")).json()["data"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not price its models")
        await asyncio.sleep(0.2)


async def run(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=600) as http:
        await priced(http)
        out = {"switching": await switching(http)}
        print("switching:", out["switching"], flush=True)
        out["loading_beside_serving"] = await loading_beside_serving(http, server.url, args)
        print("loading beside serving:", out["loading_beside_serving"], flush=True)
        out["two_models"] = await two_models(http, server.url, args)
        print("two models:", out["two_models"], flush=True)
        out["unloading"] = await unloading(http)
        print("unloading:", out["unloading"], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="closed-loop streams per model")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of each measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before a window starts")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    from lock import hold

    hold()
    from quantserve.server.loading.default_model import default_model_folder

    folder = default_model_folder()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            os.symlink(folder, Path(tmp) / name)
        with ServerProcess("--models-dir", tmp, "--kv-cache-memory", "0.25", api_key="bench-key",
                           startup_timeout=600) as server:
            results = asyncio.run(run(server, args))
    results["settings"] = vars(args) | {"json": str(args.json) if args.json else None}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    s, lb, tm, un = (results[k] for k in ("switching", "loading_beside_serving", "two_models", "unloading"))
    print(f"\nswitch beyond the load: {s['beyond_load_s']:.2f} s (target <= 0.5)")
    print(f"slowdown while another model loads: {lb['slowdown'] * 100:.1f}% (target <= 5%)")
    print(f"two models x {args.streams} streams: {tm['ratio_to_sum']:.2f}x the sum alone (target >= 0.9)")
    print(f"unload gave back {un['returned_of_weights'] * 100:.0f}% of the weight bytes (target >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
