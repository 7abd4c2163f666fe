"""Scale-out benchmark (issue 28) on this machine: quantserve on Ray Serve with two CPU replicas
against one `quantserve serve`, on the default model.

1. Throughput: --streams concurrent streamed chats (distinct prompts, ignore_eos, --max-tokens
   each, --requests in all) against one server with --cpu-threads 1 and against two Ray replicas
   with one thread each, both up, measured in turns (--rounds each; medians). Target: >= 1.5x the
   output tokens/s, TTFT p50 no worse.
2. Prefix affinity: 4 system prompts x 8 users (users in turn, --prefix-streams at once). The
   prefix-cache hit rate over all replicas (hits / prompt tokens, from each replica's /metrics read
   through x-quantserve-replica) against the single server's. Target: >= 90% of it.
3. A replica killed: --kill-requests whole (non-streamed) chats, --streams at once, on the two
   replicas; one replica's actor is killed once a quarter of them are answered. Target: none hangs (each
   answered within --request-timeout), >= 95% succeed, every failure a 503 with Retry-After. Then,
   once Ray has replaced it, the same with streamed chats, for the record: a stream's status went
   out with its first event, so one cut by the kill ends with an error event instead.

    python bench/scale_out.py                       # all three (about 10 minutes on 2 cores)
    python bench/scale_out.py --json out.json

Exit status 0 when every target is met, 1 otherwise. The load average is printed before and after:
on a shared machine the figures are not clean.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from quantserve.server.testing import ServerProcess, parse_metrics  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
SYSTEMS = [
    "You are a ship's navigator in the age of sail. Answer with the bearing first, then one sentence of "
    "reasoning, and never more than two sentences in all. Use nautical terms where they fit. " * 2,
    "You are a patient chemistry tutor for first-year students. Explain with one everyday analogy, name the "
    "principle involved, and end with a short question that checks understanding. " * 2,
    "You are a terse code reviewer. Point out the single most important problem in what the user shows, "
    "say why it matters, and suggest the smallest change that fixes it. " * 2,
    "You are a travel guide for small European towns. Recommend one place to eat, one thing to see and one "
    "thing to avoid, each in a short sentence, in that order. " * 2,
]
USERS = ["What should I do first?", "Can you say that more simply?", "Give me an example.", "Why is that?",
         "What would you avoid?", "How long does it take?", "Is there a cheaper way?", "What is the catch?"]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def chat(url: str, messages: list[dict[str, str]], max_tokens: int, timeout: float,
         headers: Optional[dict[str, str]] = None, stream: bool = True) -> dict[str, Any]:
    """One chat (streamed unless told): status, TTFT, tokens, the replica, Retry-After; 'hung' if
    it ran out of time."""
    start = time.perf_counter()
    out: dict[str, Any] = {"status": None, "ttft": None, "tokens": 0, "replica": None, "retry_after": None}
    if not stream:
        try:
            response = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=httpx.Timeout(timeout), json={
                "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            out["status"], out["replica"] = response.status_code, response.headers.get("x-quantserve-replica")
            out["retry_after"] = response.headers.get("retry-after")
            if response.status_code == 200:
                out["tokens"] = response.json()["usage"]["completion_tokens"]
        except httpx.TimeoutException:
            out["status"] = "hung"
        except httpx.HTTPError as exc:
            out["status"] = type(exc).__name__
        out["seconds"] = time.perf_counter() - start
        return out
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=httpx.Timeout(timeout)) as response:
            out["status"], out["replica"] = response.status_code, response.headers.get("x-quantserve-replica")
            out["retry_after"] = response.headers.get("retry-after")
            for line in response.iter_lines():
                if time.perf_counter() - start > timeout:
                    out["status"] = "hung"
                    break
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["status"] = f"stream error: {event['error'].get('message')}"
                    break
                if out["ttft"] is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    out["ttft"] = time.perf_counter() - start
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
    except httpx.TimeoutException:
        out["status"] = "hung"
    except httpx.HTTPError as exc:
        out["status"] = f"{type(exc).__name__}"
    out["seconds"] = time.perf_counter() - start
    return out


def run_load(url: str, conversations: list[list[dict[str, str]]], streams: int, max_tokens: int,
             timeout: float, during: Optional[Callable[[], None]] = None, stream: bool = True,
             done: Optional[list[int]] = None) -> tuple[list[dict[str, Any]], float]:
    """Every conversation once, `streams` at a time: the results and the wall time. `during` runs
    once all are submitted; `done` gets one item per finished request."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(chat, url, c, max_tokens, timeout, None, stream) for c in conversations]
        for future in futures:
            future.add_done_callback(lambda _: done.append(1) if done is not None else None)
        if during is not None:
            during()
        results = [f.result() for f in futures]
    return results, time.perf_counter() - start


def summary(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and r["tokens"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {"requests": len(results), "ok": len(ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3) if ttfts else None}


def distinct_conversations(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Request {i}: write a short paragraph about the number {i * 37 % 101}."}]
            for i in range(n)]


def prefix_conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": user}]
            for user in USERS for system in SYSTEMS]


def hit_counts(metrics_texts: list[str]) -> tuple[float, float]:
    """(prefix-cache hit tokens, prompt tokens) summed over replicas' /metrics."""
    hits = prompt = 0.0
    for text in metrics_texts:
        m = parse_metrics(text)
        hits += m["quantserve_prefix_cache_hit_rate"] * m["vllm:prompt_tokens_total"]
        prompt += m["vllm:prompt_tokens_total"]
    return hits, prompt


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1.0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests of the throughput phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix-streams", type=int, default=8)
    parser.add_argument("--kill-requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="throughput measurements of each, in turns (median)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="beyond this a request counts as hung")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    flags = {"cpu_threads": 1, "kv_cache_memory": 0.25, "max_model_len": 512}
    print(f"# {os.cpu_count()} cores, load average before {loadavg()}; default model, --cpu-threads 1 per "
          f"server/replica, {args.streams} streams, {args.max_tokens} tokens per request (ignore_eos)", flush=True)
    results: dict[str, Any] = {"load_before": loadavg()}
    throughput_load = distinct_conversations(args.requests)

    # ---- one server and two replicas on Ray, both up (the idle one waits): measured in turns, so
    # that a change in the machine's load falls on both
    from quantserve.server.ray.local import kill_replica, local_app, replica_ids

    cli = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    with ServerProcess(*cli, name="scale-out-single") as server, \
            local_app({"num_replicas": 2, **flags}, num_cpus=4) as url:
        ids = replica_ids()

        def replica_metrics() -> list[str]:
            texts = []
            for rid in ids:
                response = httpx.get(url + "/metrics", headers={"x-quantserve-replica": rid}, timeout=30)
                assert response.headers["x-quantserve-replica"] == rid, "pinning failed"
                texts.append(response.text)
            return texts

        chat(server.url, [{"role": "user", "content": "warm up"}], 4, 120)
        for rid in ids:
            chat(url, [{"role": "user", "content": "warm up"}], 4, 120, headers={"x-quantserve-replica": rid})
        rounds: dict[str, list[dict[str, Any]]] = {"single": [], "ray": []}
        for n in range(args.rounds):
            for name, target in (("single", server.url), ("ray", url)):
                res, wall = run_load(target, throughput_load, args.streams, args.max_tokens, args.request_timeout)
                rounds[name].append(summary(res, wall))
                if name == "ray":
                    rounds[name][-1]["per_replica"] = {rid: sum(1 for r in res if r["replica"] == rid) for rid in ids}
                print(f"round {n + 1}, {name}:", rounds[name][-1], flush=True)
        for name in ("single", "ray"):
            results[name] = {"rounds": rounds[name], **{key: statistics.median(r[key] for r in rounds[name])
                                                         for key in ("tokens_per_s", "ttft_p50_s")}}

        before = hit_counts([httpx.get(server.url + "/metrics", timeout=30).text])
        res, wall = run_load(server.url, prefix_conversations(), args.prefix_streams, args.max_tokens,
                             args.request_timeout)
        after = hit_counts([httpx.get(server.url + "/metrics", timeout=30).text])
        results["single_prefix"] = {**summary(res, wall), "hit_rate": round(hit_rate(before, after), 4)}
        print("single server, 4 system prompts x 8 users:", results["single_prefix"], flush=True)
        before = hit_counts(replica_metrics())
        res, wall = run_load(url, prefix_conversations(), args.prefix_streams, args.max_tokens, args.request_timeout)
        after = hit_counts(replica_metrics())
        results["ray_prefix"] = {**summary(res, wall), "hit_rate": round(hit_rate(before, after), 4)}
        placement: dict[int, dict[str, int]] = {}
        for i, r in enumerate(res):
            placement.setdefault(i % len(SYSTEMS), {}).setdefault(r["replica"], 0)
            placement[i % len(SYSTEMS)][r["replica"]] += 1
        results["ray_prefix"]["placement"] = placement
        print("ray, 4 system prompts x 8 users:", results["ray_prefix"], flush=True)
        server.stop()  # the kill phases: Ray alone

        def kill_phase(victim: str, stream: bool) -> dict[str, Any]:
            done: list[int] = []

            def kill_later() -> None:  # mid-load: once a quarter of the requests are answered
                while len(done) < args.kill_requests // 4:
                    time.sleep(0.05)
                kill_replica(victim)

            killer = threading.Thread(target=kill_later)
            res, wall = run_load(url, distinct_conversations(args.kill_requests), args.streams, args.max_tokens,
                                 args.request_timeout, during=killer.start, stream=stream, done=done)
            killer.join()
            failures = [r for r in res if r["status"] != 200]
            return {**summary(res, wall), "streamed": stream, "killed": victim,
                    "hung": sum(1 for r in res if r["status"] == "hung"),
                    "failures": [{"status": r["status"], "retry_after": r["retry_after"]} for r in failures],
                    "answered_by_killed": sum(1 for r in res if r["replica"] == victim and r["status"] == 200)}

        # The target: whole (non-streamed) answers, where a failure can still be a status.
        results["kill"] = kill_phase(ids[0], stream=False)
        print("ray, one of two replicas killed (whole answers):", results["kill"], flush=True)
        # For the record: streams, whose status went out with their first event; one cut by the
        # kill ends with an in-band error event and [DONE].
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(set(replica_ids()) - {ids[0]}) < 2:
            time.sleep(2)
        time.sleep(5)  # the new replica ready and known to the router
        ids = replica_ids()
        results["kill_streamed"] = kill_phase(ids[0], stream=True)
        print("ray, one of two replicas killed (streams):", results["kill_streamed"], flush=True)
    results["load_after"] = loadavg()

    single, ray_ = results["single"], results["ray"]
    kill = results["kill"]
    targets = {
        "throughput >= 1.5x": ray_["tokens_per_s"] >= 1.5 * single["tokens_per_s"],
        "ttft p50 no worse": ray_["ttft_p50_s"] is not None and single["ttft_p50_s"] is not None
        and ray_["ttft_p50_s"] <= single["ttft_p50_s"],
        "prefix hit rate >= 90% of one server's":
            results["ray_prefix"]["hit_rate"] >= 0.9 * results["single_prefix"]["hit_rate"],
        "kill: none hangs": kill["hung"] == 0,
        "kill: >= 95% succeed": kill["ok"] >= 0.95 * kill["requests"],
        "kill: failures are 503 + Retry-After": all(f["status"] == 503 and f["retry_after"] for f in kill["failures"]),
    }
    results["targets"] = targets
    print(f"# throughput {ray_['tokens_per_s'] / max(single['tokens_per_s'], 1e-9):.2f}x "
          f"({ray_['tokens_per_s']} vs {single['tokens_per_s']} tok/s), TTFT p50 {ray_['ttft_p50_s']} vs "
          f"{single['ttft_p50_s']} s; prefix hit rate {results['ray_prefix']['hit_rate']} vs "
          f"{results['single_prefix']['hit_rate']}; kill: {kill['ok']}/{kill['requests']} ok, {kill['hung']} hung; "
          f"streams: {results['kill_streamed']['ok']}/{results['kill_streamed']['requests']} ok, "
          f"{results['kill_streamed']['hung']} hung")
    for name, met in targets.items():
        print(f"#   {'met' if met else 'MISSED'}: {name}")
    print(f"# load average after {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
