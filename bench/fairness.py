"""Fairness benchmark (issue 25): one client's batch must not starve another client's chat.

A real `quantserve serve` on the default model per scheduling policy. The hog (one client, address
127.0.0.1) sends --hogs streamed chat requests with n=16, max_tokens=1000, ignore_eos, which fill
every sequence slot; once the running batch is full, the victim (the official openai client bound
to source address --victim-address: 127.0.0.2, another client, or 127.0.0.1, the hog's own as in
the issue's reproduction) asks a 4-token chat --victims times in a row,
each with a --victim-timeout deadline. Reported per policy: the victim's time to first token and
to its last token, the hog's running sequences when the victim asked, the preemptions, and the
hog's generated tokens per second meanwhile (what fairness costs it).

    python bench/fairness.py                                # fcfs (the behaviour before) then fair
    python bench/fairness.py --policies fair --victims 5
    python bench/fairness.py --victim-address 127.0.0.1     # the victim behind the hog's address
    python bench/fairness.py --json out.json

Exit status 0 when every victim under a policy other than fcfs got its first token within
--max-ttft seconds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from quantserve.server.testing import ServerProcess  # noqa: E402

QUESTION = [{"role": "user", "content": "Say hello."}]


def hog(server: ServerProcess, stop: threading.Event, tokens: list[int], errors: list[str], n: int,
        max_tokens: int) -> None:
    """One streamed n-choice request from 127.0.0.1; counts its tokens until `stop`."""
    try:
        stream = server.client(timeout=3600).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "Write a long story about a dragon."}], n=n,
            max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
        with stream:
            for chunk in stream:
                tokens[0] += len(chunk.choices)
                if stop.is_set():
                    break
    except Exception as exc:  # noqa: BLE001 - reported, the measurement goes on
        errors.append(repr(exc))


def victim(server: ServerProcess, timeout: float, address: str) -> dict[str, Any]:
    """A streamed 4-token chat from `address`: its TTFT and total time (None: timed out)."""
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=timeout)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "none", max_retries=0,
                           http_client=http, timeout=timeout)
    start = time.perf_counter()
    first = None
    text = ""
    try:
        stream = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=4, stream=True)
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first if first is not None else time.perf_counter() - start
                    text += chunk.choices[0].delta.content
                if time.perf_counter() - start > timeout:
                    raise TimeoutError
        return {"ttft_s": round(first, 3) if first is not None else None,
                "total_s": round(time.perf_counter() - start, 3), "text": text}
    except (openai.APITimeoutError, TimeoutError, httpx.TimeoutException):
        return {"ttft_s": None if first is None else round(first, 3), "total_s": None, "timed_out_after_s": timeout}
    finally:
        http.close()


def run_policy(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--scheduling-policy", policy, "--max-num-seqs", str(args.max_num_seqs)]
    with ServerProcess(*flags, *args.serve_flag, name=f"fairness-{policy}") as server:
        server.model = httpx.get(server.url + "/v1/models", headers=server.headers()).json()["data"][0]["id"]
        m = server.metrics()
        # Alone first: the victim's TTFT on an idle server.
        idle = victim(server, args.victim_timeout, args.victim_address)
        stop, tokens, errors = threading.Event(), [0], []
        threads = [threading.Thread(target=hog, args=(server, stop, tokens, errors, args.n, args.max_tokens),
                                    daemon=True) for _ in range(args.hogs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until the hog's first tokens come: its batch is running
            m = server.metrics()
            if m.get("vllm:num_requests_running", 0) >= min(args.max_num_seqs, args.hogs * args.n) and tokens[0]:
                break
            time.sleep(0.5)
        hog_running = m.get("vllm:num_requests_running", 0)
        preempt0 = m.get("vllm:num_preemptions_total", m.get("vllm:num_preemptions", 0))
        tok0, t0 = tokens[0], time.perf_counter()
        victims = [victim(server, args.victim_timeout, args.victim_address) for _ in range(args.victims)]
        elapsed = time.perf_counter() - t0
        hog_tps = (tokens[0] - tok0) / elapsed if elapsed > 0 else 0.0
        m = server.metrics()
        preemptions = m.get("vllm:num_preemptions_total", m.get("vllm:num_preemptions", 0)) - preempt0
        stop.set()
        for t in threads:
            t.join(timeout=60)
    ttfts = [v["ttft_s"] for v in victims if v["ttft_s"] is not None]
    return {"policy": policy, "victim_address": args.victim_address, "idle_victim": idle, "hog_running_seqs": hog_running, "victims": victims,
            "victim_ttft_max_s": max(ttfts) if len(ttfts) == len(victims) else None,
            "victim_ttft_median_s": statistics.median(ttfts) if ttfts else None,
            "timed_out": sum(v["ttft_s"] is None for v in victims), "preemptions": preemptions,
            "hog_tokens_per_s_meanwhile": round(hog_tps, 1), "hog_errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", default=["fcfs", "fair"], choices=["fcfs", "fair", "priority"])
    parser.add_argument("--hogs", type=int, default=4, help="hog requests in flight (default 4)")
    parser.add_argument("--n", type=int, default=16, help="choices per hog request (default 16)")
    parser.add_argument("--max-tokens", type=int, default=1000, help="max_tokens per hog choice (default 1000)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs (default 64)")
    parser.add_argument("--victims", type=int, default=3, help="victim chats, one after another (default 3)")
    parser.add_argument("--victim-timeout", type=float, default=100.0, help="seconds per victim chat (default 100)")
    parser.add_argument("--victim-address", default="127.0.0.2",
                        help="the victim's source address (default 127.0.0.2: another client; 127.0.0.1: the hog's)")
    parser.add_argument("--max-ttft", type=float, default=30.0, help="goal for the victim's TTFT, in s (default 30)")
    parser.add_argument("--serve-flag", action="append", default=[], help="more serve flags (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    from lock import hold

    hold()
    results = []
    for policy in args.policies:
        result = run_policy(policy, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = all(r["victim_ttft_max_s"] is not None and r["victim_ttft_max_s"] <= args.max_ttft
             for r in results if r["policy"] != "fcfs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
