"""Soak benchmark: many requests against a real `quantserve serve` process, checking that none is
lost, none fails unexpectedly, no KV block stays in use and the server's memory does not grow.

The load (asyncio + raw httpx, fixed seed, C requests in flight): streamed and non-streamed chat and
completion requests; a share cancelled mid-way (the client closes the connection after a few stream
chunks, or a second or so into a non-streamed request); a share of bad inputs, each with the 4xx it
must get. Phases:

  prime    requests with distinct random token prompts whose blocks add up to the whole KV cache.
           On CPU the cache's pages become resident only when a block is first used (model_runner
           zeroes blocks lazily), so without this the RSS "growth" would mostly be the cache being
           touched for the first time (up to its full size, 1 GiB by default), not a leak. The RSS
           goal also leaves the cache's pages out where /proc/<pid>/smaps shows them.
  warm-up  the first --warmup-fraction of the N requests (at least 4 rounds of --concurrency); then,
           idle, the baseline RSS is read.
  main     the rest; then, idle, the final RSS and the KV blocks still in use are read.

Every request gets exactly one outcome. Fine: complete (a valid response, or a stream of valid
chunks ending in `data: [DONE]`), cancelled (on purpose), expected_error (a bad input answered with
its 4xx in OpenAI's error shape), tolerated (a bad input a server may accept: an unknown field).
Problems: unexpected_status (any 5xx, an error on a good request, the wrong 4xx), stream_error (an
in-band error event), malformed, timeout, transport_error; the last three count as lost.

    python bench/soak.py                                  # 10,000 requests, 32 in flight
    python bench/soak.py --requests 500 --concurrency 16 --no-prime   # about the short version the tests run
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234   # against a running server

Exit status 0 when every goal is met (0 lost, 0 unexpected, 0 KV blocks in use at the end, RSS
growth below --max-rss-growth), 1 when one is missed, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from quantserve.server.testing import ServerProcess, parse_metrics, wait_healthy

# ----------------------------------------------------------------------------------- outcomes

FINE = ("complete", "cancelled", "expected_error", "tolerated")
PROBLEMS = ("unexpected_status", "stream_error", "malformed", "timeout", "transport_error")
LOST = ("malformed", "timeout", "transport_error")


@dataclasses.dataclass
class Spec:
    """One request as planned: what to send and what counts as a right answer."""

    idx: int
    kind: str  # good | cancel | bad | prime
    name: str  # chat-stream, completion, cancel-stream, bad:temperature_5, ...
    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: Any = None  # JSON-encoded when raw is None
    raw: Optional[bytes] = None  # sent as is (malformed JSON, an oversized body)
    stream: bool = False
    n: int = 1
    max_tokens: int = 0
    include_usage: bool = False
    expect: tuple[int, ...] = ()  # bad inputs: the statuses that are right
    tolerate_ok: bool = False  # bad inputs a server may accept (a complete 200 is then fine)
    cancel_after: int = 0  # streamed cancels: close after this many data events
    cancel_secs: float = 0.0  # non-streamed cancels: disconnect after this many seconds

    def content(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()

    def describe(self, limit: int = 600) -> str:
        body = self.content().decode("utf-8", "replace")
        if len(body) > limit:
            body = body[:limit] + f"... ({len(self.content())} bytes)"
        return f"{self.method} {self.path} {body}"


@dataclasses.dataclass
class Result:
    outcome: str
    error_kind: str = ""  # "<status> <code>" of an error answer
    detail: str = ""
    tokens: int = 0  # completion tokens the client saw (usage, else content events)


def error_kind(status: int, body: bytes) -> tuple[str, Optional[str]]:
    """("<status> <code>", problem) for an error answer; problem says how the shape is not OpenAI's."""
    try:
        obj = json.loads(body)
    except ValueError:
        return f"{status} (not JSON)", f"error body is not JSON: {body[:200]!r}"
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return f"{status} (no error object)", f"error body has no 'error' object: {body[:200]!r}"
    kind = f"{status} {err.get('code')}"
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    if missing or not isinstance(err.get("message"), str) or not err["message"] or not isinstance(err.get("type"), str):
        return kind, f"error object is not OpenAI's shape (missing {missing}): {body[:200]!r}"
    return kind, None


# --------------------------------------------------------------------- validating good answers

try:  # the official client's types: an independent reading of the wire format
    from openai.types import Completion as _OAICompletion
    from openai.types.chat import ChatCompletion as _OAIChat
    from openai.types.chat import ChatCompletionChunk as _OAIChatChunk
except ImportError:  # pragma: no cover - the checks below still run
    _OAICompletion = _OAIChat = _OAIChatChunk = None


def _oai_check(cls: Any, obj: dict) -> Optional[str]:
    if cls is None:
        return None
    try:
        cls.model_validate(obj)
    except Exception as exc:  # pydantic.ValidationError
        return f"not a valid {cls.__name__}: {str(exc)[:300]}"
    return None


def check_response(spec: Spec, obj: Any) -> tuple[Optional[str], int]:
    """(problem, completion tokens) for a non-streamed 200 body."""
    chat = spec.path.endswith("/chat/completions")
    if not isinstance(obj, dict):
        return "body is not a JSON object", 0
    problem = _oai_check(_OAIChat if chat else _OAICompletion, obj)
    if problem:
        return problem, 0
    if obj.get("object") != ("chat.completion" if chat else "text_completion"):
        return f"object is {obj.get('object')!r}", 0
    choices = obj.get("choices") or []
    if sorted(c.get("index") for c in choices) != list(range(spec.n)):
        return f"choice indexes {[c.get('index') for c in choices]}, expected 0..{spec.n - 1}", 0
    for c in choices:
        text = c["message"].get("content") if chat else c.get("text")
        if not isinstance(text, str):
            return f"choice {c.get('index')} has no text", 0
        if c.get("finish_reason") not in ("stop", "length"):
            return f"choice {c.get('index')} finish_reason {c.get('finish_reason')!r}", 0
    return _check_usage(spec, obj.get("usage"))


def _check_usage(spec: Spec, usage: Any) -> tuple[Optional[str], int]:
    if not isinstance(usage, dict):
        return "no usage", 0
    done = usage.get("completion_tokens")
    if not isinstance(done, int) or not 0 <= done <= spec.n * spec.max_tokens:
        return f"usage.completion_tokens {done!r} not in 0..{spec.n * spec.max_tokens}", 0
    if usage.get("total_tokens") != usage.get("prompt_tokens", 0) + done or usage.get("prompt_tokens", 0) < 1:
        return f"usage does not add up: {usage}", 0
    return None, done


def check_stream(spec: Spec, events: list[Any], done: bool, cancelled: bool) -> Result:
    """Outcome of a 200 event stream: events are the parsed `data:` payloads before [DONE]."""
    chat = spec.path.endswith("/chat/completions")
    finish: dict[int, list[Any]] = collections.defaultdict(list)
    tokens, usage = 0, None
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            return Result("malformed", detail=f"event {i} is not a JSON object: {str(ev)[:200]}")
        if "error" in ev:
            kind, _ = error_kind(0, json.dumps(ev).encode())
            return Result("stream_error", f"stream {kind.split(' ', 1)[1]}", f"in-band error: {json.dumps(ev)[:300]}")
        # openai's Completion type (which its SDK also reads completion stream chunks into,
        # unvalidated) requires a finish_reason, so only chat chunks are checked against it.
        problem = _oai_check(_OAIChatChunk, ev) if chat else None
        if problem:
            return Result("malformed", detail=f"event {i}: {problem}")
        if ev.get("object") != ("chat.completion.chunk" if chat else "text_completion"):
            return Result("malformed", detail=f"event {i}: object {ev.get('object')!r}")
        if ev.get("usage") is not None:
            usage = ev["usage"]
            if ev.get("choices") or i != len(events) - 1:
                return Result("malformed", detail="the usage chunk is not the last one or has choices")
        for c in ev.get("choices") or []:
            idx = c.get("index")
            if not isinstance(idx, int) or not 0 <= idx < spec.n:
                return Result("malformed", detail=f"event {i}: choice index {idx!r}")
            text = (c.get("delta") or {}).get("content") if chat else c.get("text")
            if text:
                tokens += 1  # an upper bound's worth: one event per engine output
            if c.get("finish_reason") is not None:
                finish[idx].append(c["finish_reason"])
    if cancelled:
        return Result("cancelled", tokens=tokens)
    if not done:
        return Result("malformed", detail=f"stream ended after {len(events)} events without data: [DONE]")
    for idx in range(spec.n):
        if len(finish[idx]) != 1 or finish[idx][0] not in ("stop", "length"):
            return Result("malformed", detail=f"choice {idx} finish_reasons {finish[idx]}")
    if spec.include_usage:
        problem, tokens = _check_usage(spec, usage)
        if problem:
            return Result("malformed", detail=f"stream: {problem}")
    elif usage is not None:
        return Result("malformed", detail="usage chunk without stream_options.include_usage")
    return Result("complete", tokens=tokens)


def classify_answer(spec: Spec, status: int, body: bytes) -> Result:
    """Outcome of a whole (non-streamed, or refused before streaming) answer."""
    if status == 200:
        try:
            obj = json.loads(body)
        except ValueError:
            return Result("malformed", detail=f"200 body is not JSON: {body[:200]!r}")
        problem, tokens = check_response(spec, obj)
        if problem:
            return Result("malformed", detail=problem)
        if spec.kind == "bad":
            if spec.tolerate_ok:
                return Result("tolerated", tokens=tokens)
            return Result("unexpected_status", "200 (bad input accepted)", "a bad input was answered 200")
        return Result("complete", tokens=tokens)
    kind, shape_problem = error_kind(status, body)
    if shape_problem:
        return Result("malformed", kind, shape_problem)
    if spec.kind == "bad" and status in spec.expect:
        return Result("expected_error", kind)
    return Result("unexpected_status", kind, body[:300].decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------- the plan

CHAT_PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
    "How many legs does a spider have?", "Say hello in Spanish.", "What is 12 times 7?",
    "Give me a word that rhymes with cat.", "Why is the sky blue?", "List two kinds of trees.",
    "What does a bee make?", "Describe a cloud in five words.", "Which planet is the largest?",
]
COMPLETION_PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "The three laws of motion are", "Water boils at", "My favourite breakfast is",
    "In 1969, the first person to walk on the Moon", "A good recipe for bread starts with",
]


def _good_body(rng: random.Random, model: str, chat: bool, stream: bool, max_tokens: int) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream,
                            "temperature": rng.choice([0.0, 0.7, 1.0])}
    tail = f" ({rng.randrange(10**6)})" if rng.random() < 0.5 else ""  # half share a cacheable prefix
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(CHAT_PROMPTS) + tail}]
        if rng.random() < 0.2:
            body["messages"].insert(0, {"role": "system", "content": "You answer briefly."})
        if rng.random() < 0.2:  # the newer name of the same budget
            body["max_completion_tokens"] = body.pop("max_tokens")
    else:
        body["prompt"] = rng.choice(COMPLETION_PROMPTS) + tail
    if rng.random() < 0.2:
        body["top_p"] = 0.9
    if rng.random() < 0.15:
        body["stop"] = ["\n\n"]
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(2**31)
    return body


def bad_inputs(model: str, max_model_len: int, max_body_bytes: int) -> list[tuple[str, dict]]:
    """(name, Spec fields) for each kind of bad input. Statuses, not messages, are what is checked."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    long_prompt = "hello " * (2 * max_model_len)  # ~2x the context in tokens, well under the body limit
    oversized = b'{"model": "%s", "prompt": "' % model.encode() + b"x" * (max_body_bytes + 1024) + b'"}'
    return [
        ("negative_max_tokens", dict(path=chat, body={"model": model, "messages": msgs, "max_tokens": -5},
                                     expect=(400,))),
        ("zero_max_tokens", dict(path=comp, body={"model": model, "prompt": "hi", "max_tokens": 0}, expect=(400,))),
        ("unknown_model", dict(path=chat, body={"model": "no-such-model", "messages": msgs, "max_tokens": 8},
                               expect=(404,))),
        ("temperature_5", dict(path=comp, body={"model": model, "prompt": "hi", "temperature": 5, "max_tokens": 8},
                               expect=(400,))),
        ("prompt_past_context", dict(path=comp, body={"model": model, "prompt": long_prompt, "max_tokens": 8},
                                     expect=(400,))),
        ("chat_past_context", dict(path=chat, body={"model": model, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": long_prompt}]},
                                   expect=(400,))),
        ("max_tokens_past_context", dict(path=chat, body={"model": model, "messages": msgs,
                                                          "max_tokens": 10 * max_model_len}, expect=(400,))),
        ("malformed_json", dict(path=chat, raw=b'{"model": "%s", "messages": [{"role": "user",' % model.encode(),
                                expect=(400,))),
        ("json_not_object", dict(path=comp, raw=b"[1, 2, 3]", expect=(400,))),
        ("wrong_type_max_tokens", dict(path=chat, body={"model": model, "messages": msgs, "max_tokens": "ten"},
                                       expect=(400,))),
        ("wrong_type_messages", dict(path=chat, body={"model": model, "messages": "hello", "max_tokens": 8},
                                     expect=(400,))),
        ("wrong_type_model", dict(path=comp, body={"model": 123, "prompt": "hi", "max_tokens": 8}, expect=(400,))),
        ("wrong_type_n", dict(path=comp, body={"model": model, "prompt": "hi", "n": 1.5, "max_tokens": 8},
                              expect=(400,))),
        # Ignored by older servers, refused (400) by stricter ones: either is fine, a 5xx is not.
        ("unknown_field", dict(path=chat, body={"model": model, "messages": msgs, "max_tokens": 8,
                                                "no_such_field": 1}, expect=(400,), tolerate_ok=True, max_tokens=8)),
        ("n_too_large", dict(path=chat, body={"model": model, "messages": msgs, "n": 1000, "max_tokens": 8},
                             expect=(400,))),
        ("empty_messages", dict(path=chat, body={"model": model, "messages": [], "max_tokens": 8}, expect=(400,))),
        ("missing_messages", dict(path=chat, body={"model": model, "max_tokens": 8}, expect=(400,))),
        ("unknown_role", dict(path=chat, body={"model": model, "messages": [{"role": "wizard", "content": "hi"}],
                                               "max_tokens": 8}, expect=(400,))),
        ("empty_prompt_list", dict(path=comp, body={"model": model, "prompt": [], "max_tokens": 8}, expect=(400,))),
        ("token_past_vocab", dict(path=comp, body={"model": model, "prompt": [10**8], "max_tokens": 8},
                                  expect=(400,))),
        ("top_p_zero", dict(path=comp, body={"model": model, "prompt": "hi", "top_p": 0, "max_tokens": 8},
                            expect=(400,))),
        ("too_many_stops", dict(path=comp, body={"model": model, "prompt": "hi", "max_tokens": 8,
                                                 "stop": [f"s{i}" for i in range(40)]}, expect=(400,))),
        ("top_logprobs_too_many", dict(path=chat, body={"model": model, "messages": msgs, "max_tokens": 8,
                                                        "logprobs": True, "top_logprobs": 50}, expect=(400,))),
        ("body_too_large", dict(path=comp, raw=oversized, expect=(413,))),
        ("wrong_method", dict(method="GET", path=chat, raw=b"", expect=(405,))),
        ("unknown_path", dict(path="/v1/chat/completion", body={"model": model, "messages": msgs}, expect=(404,))),
    ]


def make_plan(args: argparse.Namespace, model: str, max_model_len: int) -> list[Spec]:
    rng = random.Random(args.seed)
    bad = bad_inputs(model, max_model_len, args.max_body_bytes)
    plan = []
    for idx in range(args.requests):
        roll = rng.random()
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if roll < args.bad_fraction:
            name, fields = rng.choice(bad)
            fields = dict(fields)
            if isinstance(fields.get("body"), dict) and rng.random() < 0.5:  # refused before streaming too
                fields["body"] = {**fields["body"], "stream": True}
                fields["stream"] = True
            plan.append(Spec(idx, "bad", "bad:" + name, **fields))
        elif roll < args.bad_fraction + args.cancel_fraction:
            # Long, EOS ignored: the generation is surely still running when the client leaves.
            max_tokens = rng.randint(64, 128)
            body = _good_body(rng, model, chat, True, max_tokens) | {"ignore_eos": True}
            if rng.random() < 0.75:
                plan.append(Spec(idx, "cancel", "cancel-stream", path=path, body=body, stream=True,
                                 max_tokens=max_tokens, cancel_after=rng.randint(1, 4)))
            else:
                body["stream"] = False
                plan.append(Spec(idx, "cancel", "cancel-nonstream", path=path, body=body, max_tokens=max_tokens,
                                 cancel_secs=rng.uniform(0.3, 1.5)))
        else:
            max_tokens = rng.randint(args.min_tokens, args.max_tokens)
            body = _good_body(rng, model, chat, stream, max_tokens)
            n = 2 if rng.random() < 0.05 else 1
            if n > 1:
                body["n"] = n
            include_usage = stream and rng.random() < 0.5
            if include_usage:
                body["stream_options"] = {"include_usage": True}
            name = ("chat" if chat else "completion") + ("-stream" if stream else "")
            plan.append(Spec(idx, "good", name, path=path, body=body, stream=stream, n=n, max_tokens=max_tokens,
                             include_usage=include_usage))
    return plan


def prime_plan(args: argparse.Namespace, model: str, max_model_len: int, kv_blocks: int) -> list[Spec]:
    """Random token prompts (no prefix to share) whose blocks add up to the whole KV cache, plus a
    margin. The block manager hands out never-used blocks first (its free list starts in index
    order; freed blocks go to the back), so this touches every block once."""
    rng = random.Random(args.seed + 1)
    length = max(args.block_size, min(16 * args.block_size, max_model_len - 2))
    count = -(-kv_blocks // (length // args.block_size)) + 2
    return [Spec(-1 - i, "prime", "prime", path="/v1/completions", max_tokens=1,
                 body={"model": model, "prompt": [rng.randrange(100, 10000) for _ in range(length)],
                       "max_tokens": 1, "temperature": 0})
            for i in range(count)]


# --------------------------------------------------------------------------------- sending


async def send(client: httpx.AsyncClient, spec: Spec, timeout: float) -> Result:
    """Send one request and classify what came back; never raises."""
    try:
        if spec.cancel_secs:
            try:
                return await asyncio.wait_for(_send(client, spec), spec.cancel_secs)
            except asyncio.TimeoutError:
                return Result("cancelled")  # the client hung up; the server must abort the generation
        return await asyncio.wait_for(_send(client, spec), timeout)
    except asyncio.TimeoutError:
        return Result("timeout", detail=f"no complete answer within {timeout} s")
    except httpx.TimeoutException as exc:
        return Result("timeout", detail=f"{type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return Result("transport_error", detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug here must still give the request its one outcome
        return Result("malformed", detail=f"client-side {type(exc).__name__}: {exc}")


async def _send(client: httpx.AsyncClient, spec: Spec) -> Result:
    headers = {"content-type": "application/json"} if spec.method == "POST" else {}
    content = spec.content() if spec.method == "POST" else None
    async with client.stream(spec.method, spec.path, content=content, headers=headers) as resp:
        if resp.status_code != 200 or not spec.stream:
            return classify_answer(spec, resp.status_code, await resp.aread())
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            return Result("malformed", detail=f"stream with content-type {resp.headers.get('content-type')!r}")
        events: list[Any] = []
        done = False
        async for line in resp.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: ") or done:
                return Result("malformed", detail=f"unexpected SSE line {line[:200]!r} (after [DONE]: {done})")
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            try:
                events.append(json.loads(data))
            except ValueError:
                return Result("malformed", detail=f"SSE data is not JSON: {data[:200]!r}")
            if spec.cancel_after and len(events) >= spec.cancel_after:
                # Leaving the block closes a half-read response: httpx drops the connection.
                return check_stream(spec, events, done=False, cancelled=True)
        result = check_stream(spec, events, done, cancelled=False)
        if spec.kind == "bad" and result.outcome == "complete":
            return Result("tolerated", tokens=result.tokens) if spec.tolerate_ok else \
                Result("unexpected_status", "200 (bad input accepted)", "a bad input was streamed")
        return result


# ------------------------------------------------------------------------------- the server


class Server:
    """The server under test: one started here (quantserve.server.testing's ServerProcess, the
    harness the tests use too), or a running one given by --url (and --pid)."""

    def __init__(self, url: str, pid: Optional[int] = None, process: Optional[ServerProcess] = None) -> None:
        self.url, self.pid, self.process = url.rstrip("/"), pid, process

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Server":
        if args.url:
            return cls(args.url, args.pid)
        return cls.started(ServerProcess(*args.serve_arg, name="quantserve-soak"))

    @classmethod
    def started(cls, process: ServerProcess) -> "Server":
        print(f"starting: {' '.join(process.argv)} (log: {process.log})", file=sys.stderr, flush=True)
        return cls(process.url, process.pid, process)

    @property
    def log(self) -> Optional[Path]:
        return self.process.log if self.process is not None else None

    async def wait_ready(self, timeout: float) -> None:
        """Until /health answers 200; RuntimeError (the server exited) or TimeoutError, with the
        log's tail when the server was started here."""
        if self.process is not None:
            await asyncio.to_thread(self.process.wait_ready, timeout)
        else:
            await asyncio.to_thread(wait_healthy, self.url, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log_tail(chars) if self.process is not None else ""

    def log_errors(self) -> list[str]:
        """Lines of the server's log that report an error or a traceback."""
        if self.process is None:
            return []
        return [line for line in self.process.log_text().splitlines()
                if " ERROR " in line or " CRITICAL " in line or line.startswith(("ERROR:", "CRITICAL:", "Traceback"))]

    def rss(self) -> Optional[int]:
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    async def check_pid(self, client: httpx.AsyncClient) -> None:
        """A --pid that is not the server's (its shell, say) would give a wrong RSS: it must agree
        with the RSS the server reports of itself on /v1/memory."""
        if self.process is not None or self.pid is None:
            return
        ours, own = self.rss(), (await client.get("/v1/memory", timeout=30)).json()["host"].get("rss_bytes")
        if ours is None or (own and not 0.8 < ours / own < 1.25):
            raise RuntimeError(f"--pid {self.pid} does not look like the server at {self.url}: its RSS is "
                               f"{ours} bytes, the server reports {own}")

    def kv_resident(self, kv_bytes: Optional[int]) -> Optional[int]:
        """Resident bytes of the KV cache's mapping (the one anonymous mapping of about its size,
        from /proc/<pid>/smaps): how much of it has been touched. None when not found."""
        if self.pid is None or not kv_bytes:
            return None
        try:
            text = Path(f"/proc/{self.pid}/smaps").read_text()
        except OSError:
            return None
        size = None
        for line in text.splitlines():
            if line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:") and size is not None and abs(size - kv_bytes) <= 8 * 2**20:
                return int(line.split()[1]) * 1024
        return None

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after 60 s, to a server started here: its exit status (None for --url)."""
        return self.process.stop() if self.process is not None else None


async def server_state(client: httpx.AsyncClient, server: Server) -> dict[str, Any]:
    """KV blocks (/v1/memory), running/waiting and token counters (/metrics), RSS (/proc, else /v1/memory)."""
    memory = (await client.get("/v1/memory", timeout=30)).json()
    metrics = parse_metrics((await client.get("/metrics", timeout=30)).text)
    kv = memory["models"][0]["kv_cache"] if memory.get("models") else {}
    rss = server.rss()
    return {
        "kv_blocks_used": kv.get("blocks_used"),
        "kv_blocks_total": kv.get("blocks_total"),
        "kv_usage_metric": metrics.get("vllm:kv_cache_usage_perc"),
        "running": metrics.get("vllm:num_requests_running"),
        "waiting": metrics.get("vllm:num_requests_waiting"),
        "generation_tokens": metrics.get("vllm:generation_tokens_total", metrics.get("vllm:generation_tokens")),
        "prompt_tokens": metrics.get("vllm:prompt_tokens_total", metrics.get("vllm:prompt_tokens")),
        "rss_bytes": rss if rss is not None else memory["host"].get("rss_bytes"),
        "kv_bytes_total": kv.get("bytes_total"),
        "kv_resident_bytes": server.kv_resident(kv.get("bytes_total")),
        "peak_rss_bytes": memory["host"].get("peak_rss_bytes"),
    }


async def wait_idle(client: httpx.AsyncClient, server: Server, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll until nothing runs, waits or holds a KV block (aborts free blocks at the engine's next
    step), or the timeout passes; then the state and the seconds it took."""
    start = time.monotonic()
    while True:
        state = await server_state(client, server)
        idle = state["running"] == 0 and state["waiting"] == 0 and state["kv_blocks_used"] == 0 \
            and not state["kv_usage_metric"]
        if idle or time.monotonic() - start > timeout:
            return state, time.monotonic() - start
        await asyncio.sleep(0.25)


# ---------------------------------------------------------------------------------- running


class Tally:
    def __init__(self) -> None:
        self.results: dict[int, list[Result]] = collections.defaultdict(list)
        self.specs: dict[int, Spec] = {}
        self.in_flight = 0
        self.latencies: list[float] = []
        self.total = 0  # requests planned so far (priming included), for the progress line
        self.rss_samples: list[tuple[float, int, Optional[int], Optional[int]]] = []  # (s, done, RSS, KV pages)

    def record(self, spec: Spec, result: Result, seconds: float) -> None:
        self.results[spec.idx].append(result)
        if result.outcome in ("complete", "expected_error"):
            self.latencies.append(seconds)

    def outcomes(self) -> collections.Counter:
        return collections.Counter(r.outcome for rs in self.results.values() for r in rs)


async def run_phase(client: httpx.AsyncClient, specs: list[Spec], tally: Tally, concurrency: int,
                    timeout: float) -> None:
    queue = collections.deque(specs)

    async def worker() -> None:
        while queue:
            spec = queue.popleft()
            tally.specs[spec.idx] = spec
            tally.in_flight += 1
            start = time.monotonic()
            result = await send(client, spec, timeout)
            tally.in_flight -= 1
            tally.record(spec, result, time.monotonic() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def progress(tally: Tally, server: Server, kv_bytes: Optional[int], interval: float, start: float) -> None:
    """A line on stderr every interval; the RSS samples also go into the report (a trend, or a step?)."""
    while True:
        await asyncio.sleep(interval)
        counts = tally.outcomes()
        done = sum(counts.values())
        problems = sum(counts[p] for p in PROBLEMS)
        rss, kv = server.rss(), server.kv_resident(kv_bytes)
        elapsed = time.monotonic() - start
        tally.rss_samples.append((round(elapsed, 1), done, rss, kv))
        memory = "" if not rss else f", server RSS {rss / 2**20:.0f} MiB" + \
            ("" if kv is None else f" (KV cache pages {kv / 2**20:.0f} MiB)")
        print(f"[{elapsed:7.1f} s] {done}/{tally.total} done, {tally.in_flight} in flight, {done / elapsed:.1f} req/s, "
              f"{counts['cancelled']} cancelled, {counts['expected_error']} expected 4xx, {problems} problems{memory}",
              file=sys.stderr, flush=True)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    server = Server.from_args(args)
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report: dict[str, Any] = {"url": server.url, "requests": args.requests, "concurrency": args.concurrency,
                              "seed": args.seed, "server_log": str(server.log) if server.log else None,
                              "prime_requests": 0}
    try:
        async with httpx.AsyncClient(base_url=server.url, limits=limits, headers=headers,
                                     timeout=httpx.Timeout(args.timeout)) as client:
            await server.wait_ready(args.startup_timeout)
            await server.check_pid(client)
            card = (await client.get("/v1/models")).json()["data"][0]
            model = args.model or card["id"]
            max_model_len = card.get("max_model_len") or 2048
            report["model"] = model
            plan = make_plan(args, model, max_model_len)
            tally = Tally()
            tally.total = len(plan)
            state0 = await server_state(client, server)
            ticker = asyncio.create_task(progress(tally, server, state0["kv_bytes_total"], args.progress_interval,
                                            time.monotonic()))
            try:
                if args.prime and state0["kv_blocks_total"]:
                    primes = prime_plan(args, model, max_model_len, state0["kv_blocks_total"])
                    print(f"prime: {len(primes)} requests fill the {state0['kv_blocks_total']}-block KV cache once",
                          file=sys.stderr)
                    tally.total += len(primes)
                    await run_phase(client, primes, tally, min(args.concurrency, 8), args.timeout)
                    report["prime_requests"] = len(primes)
                # At least 4 rounds of full concurrency: memory steps up as new batch shapes and
                # allocator arenas first appear, then stays flat; a baseline read before that is noise.
                warm = max(1, min(max(int(len(plan) * args.warmup_fraction), 4 * args.concurrency), len(plan) // 2))
                t0 = time.monotonic()
                before = await server_state(client, server)
                await run_phase(client, plan[:warm], tally, args.concurrency, args.timeout)
                paused = time.monotonic()
                warm_state, _ = await wait_idle(client, server, args.drain_timeout)
                resumed = time.monotonic()
                print(f"warm-up done ({warm} requests): server RSS {warm_state['rss_bytes'] / 2**20:.1f} MiB",
                      file=sys.stderr)
                await run_phase(client, plan[warm:], tally, args.concurrency, args.timeout)
                load_seconds = (paused - t0) + (time.monotonic() - resumed)
            finally:
                ticker.cancel()
            end_state, drain_seconds = await wait_idle(client, server, args.drain_timeout)
    finally:
        report["server_exit_status"] = server.stop()
        report["server_log_errors"] = server.log_errors()[:20]
    report.update(summarize(tally, plan, warm, before, warm_state, end_state, load_seconds, drain_seconds))
    return report


def summarize(tally: Tally, plan: list[Spec], warm: int, before: dict, warm_state: dict, end_state: dict,
              load_seconds: float, drain_seconds: float) -> dict[str, Any]:
    outcomes = tally.outcomes()
    by_name: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    expected_kinds, unexpected_kinds = collections.Counter(), collections.Counter()
    examples: list[dict[str, str]] = []
    lost = 0
    for spec in list(tally.specs.values()) + [s for s in plan if s.idx not in tally.specs]:
        results = tally.results.get(spec.idx, [])
        if len(results) != 1:  # no outcome, or more than one: lost either way
            lost += 1
            examples.append({"request": spec.describe(), "problem": f"{len(results)} outcomes"})
            continue
        r = results[0]
        by_name[spec.name.split(":")[0]][r.outcome] += 1
        if r.outcome in LOST:
            lost += 1
        if r.outcome == "expected_error":
            expected_kinds[r.error_kind] += 1
        elif r.outcome in PROBLEMS:
            unexpected_kinds[r.error_kind or r.outcome] += 1
            if len(examples) < 20:
                examples.append({"request": spec.describe(), "outcome": r.outcome, "kind": r.error_kind,
                                 "detail": r.detail})
    rss0, rss1 = warm_state["rss_bytes"], end_state["rss_bytes"]
    kv0, kv1 = warm_state["kv_resident_bytes"], end_state["kv_resident_bytes"]
    total_growth = None if not (rss0 and rss1) else round(100.0 * (rss1 - rss0) / rss0, 3)
    # The goal is about leaks: the KV cache's pages, resident once first touched and then reused,
    # are left out when smaps shows them (the priming phase touches them all before the baseline).
    ex_kv_growth = None if None in (rss0, rss1, kv0, kv1) else \
        round(100.0 * ((rss1 - kv1) - (rss0 - kv0)) / (rss0 - kv0), 3)
    counted = [s for s in plan if s.idx in tally.specs]
    lat = sorted(tally.latencies)
    gen = (end_state["generation_tokens"] or 0) - (before["generation_tokens"] or 0)
    return {
        "outcomes": dict(outcomes),
        "outcomes_by_request_kind": {k: dict(v) for k, v in sorted(by_name.items())},
        "expected_errors": dict(expected_kinds),
        "unexpected_errors": dict(unexpected_kinds),
        "unexpected": sum(outcomes[p] for p in PROBLEMS),
        "lost": lost,
        "problem_examples": examples,
        "warmup_requests": warm,
        "rss_after_warmup_bytes": rss0,
        "rss_end_bytes": rss1,
        "rss_total_growth_percent": total_growth,
        "rss_growth_percent": ex_kv_growth if ex_kv_growth is not None else total_growth,
        "rss_growth_basis": "excluding the KV cache's pages" if ex_kv_growth is not None else "total RSS",
        "peak_rss_bytes": end_state["peak_rss_bytes"],
        "kv_resident_after_warmup_bytes": warm_state["kv_resident_bytes"],
        "kv_resident_end_bytes": end_state["kv_resident_bytes"],
        "kv_blocks_used_end": end_state["kv_blocks_used"],
        "kv_blocks_total": end_state["kv_blocks_total"],
        "kv_usage_metric_end": end_state["kv_usage_metric"],
        "running_end": end_state["running"],
        "waiting_end": end_state["waiting"],
        "drain_seconds": round(drain_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "requests_per_second": round(len(counted) / load_seconds, 2) if load_seconds else None,
        "generated_tokens": gen,
        "generated_tokens_per_second": round(gen / load_seconds, 1) if load_seconds else None,
        "client_tokens": sum(r.tokens for s in counted for r in tally.results[s.idx]),
        "rss_samples": tally.rss_samples,
        "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
    }


def verdict(report: dict[str, Any], max_rss_growth: float) -> list[str]:
    """The goals missed (empty: all met)."""
    missed = []
    if report["lost"]:
        missed.append(f"{report['lost']} requests lost")
    if report["unexpected"]:
        missed.append(f"{report['unexpected']} unexpected errors")
    if report["kv_blocks_used_end"] != 0 or report.get("kv_usage_metric_end") not in (0, None):
        missed.append(f"{report['kv_blocks_used_end']} KV blocks still in use "
                      f"(vllm:kv_cache_usage_perc {report.get('kv_usage_metric_end')})")
    growth = report["rss_growth_percent"]
    if growth is None:
        missed.append("server RSS unknown")
    elif growth >= max_rss_growth:
        missed.append(f"RSS grew {growth:.2f}% (goal < {max_rss_growth}%)")
    return missed


def print_report(report: dict[str, Any], missed: list[str], max_rss_growth: float) -> None:
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "?"  # noqa: E731
    total = sum(report["outcomes"].values())
    print(f"\nsoak: {report['requests']} requests (+{report['prime_requests']} priming) at "
          f"{report['concurrency']} concurrent, seed {report['seed']}, model {report['model']}, {report['url']}")
    print(f"\nrequests by outcome ({total}):")
    for outcome in FINE + PROBLEMS:
        if report["outcomes"].get(outcome):
            print(f"  {outcome:<18}{report['outcomes'][outcome]:>7}")
    print("by kind of request:")
    for name, counts in report["outcomes_by_request_kind"].items():
        print(f"  {name:<18}" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("expected errors (bad inputs), by status and code:")
    for kind, count in sorted(report["expected_errors"].items()):
        print(f"  {kind:<40}{count:>7}")
    print(f"unexpected errors: {report['unexpected']}")
    for kind, count in sorted(report["unexpected_errors"].items()):
        print(f"  {kind:<40}{count:>7}")
    for ex in report["problem_examples"]:
        print(f"  - {ex}")
    print(f"\nlost requests: {report['lost']}")
    print(f"KV blocks in use at the end: {report['kv_blocks_used_end']} of {report['kv_blocks_total']} "
          f"(vllm:kv_cache_usage_perc {report['kv_usage_metric_end']}, running {report['running_end']}, "
          f"waiting {report['waiting_end']}; idle after {report['drain_seconds']} s)")
    print(f"server RSS: {mib(report['rss_after_warmup_bytes'])} after warm-up ({report['warmup_requests']} requests), "
          f"{mib(report['rss_end_bytes'])} at the end: {report['rss_total_growth_percent']}%; "
          f"peak {mib(report['peak_rss_bytes'])}")
    if report["kv_resident_end_bytes"] is not None:
        print(f"  of which the KV cache's pages (touched once, then reused): "
              f"{mib(report['kv_resident_after_warmup_bytes'])} after warm-up, {mib(report['kv_resident_end_bytes'])} "
              f"at the end")
    print(f"RSS growth ({report['rss_growth_basis']}): {report['rss_growth_percent']}% (goal < {max_rss_growth}%)")
    print(f"throughput: {report['requests_per_second']} requests/s, {report['generated_tokens_per_second']} "
          f"generated tokens/s ({report['generated_tokens']} tokens in {report['load_seconds']} s); "
          f"latency p50 {report['latency_p50_s']} s, p99 {report['latency_p99_s']} s")
    if report["server_exit_status"] is not None:
        print(f"server exit status: {report['server_exit_status']}; error lines in its log: "
              f"{len(report['server_log_errors'])}" + (f" ({report['server_log']})" if report["server_log"] else ""))
    for line in report["server_log_errors"][:5]:
        print(f"  {line[:300]}")
    print("\nSOAK " + ("PASS: every goal met" if not missed else "FAIL: " + "; ".join(missed)))


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--requests", type=int, default=10_000, help="requests in the warm-up and main phases (default: 10000)")
    a("--concurrency", type=int, default=32, help="requests in flight at once (default: 32)")
    a("--seed", type=int, default=0, help="seed of the request mix (default: 0)")
    a("--cancel-fraction", type=float, default=0.10, help="share cancelled by the client mid-way (default: 0.10)")
    a("--bad-fraction", type=float, default=0.05, help="share of bad inputs (default: 0.05)")
    a("--min-tokens", type=int, default=8, help="smallest max_tokens of a good request (default: 8)")
    a("--max-tokens", type=int, default=32, help="largest max_tokens of a good request (default: 32)")
    a("--warmup-fraction", type=float, default=0.05,
      help="share of the requests run before the baseline RSS is read, at least 4x --concurrency "
           "(default: 0.05)")
    a("--no-prime", dest="prime", action="store_false",
      help="skip filling the KV cache once before the warm-up: cheaper; the total RSS growth then includes "
           "the cache's first touch, which the goal's figure leaves out where /proc/<pid>/smaps shows it")
    a("--block-size", type=int, default=16,
      help="the server's KV block size in tokens, to size the priming (default: 16, the server's default)")
    a("--timeout", type=float, default=300.0,
      help="seconds a request may take before it counts as hung (default: 300)")
    a("--drain-timeout", type=float, default=60.0,
      help="seconds to wait for the server to go idle (no running request, no KV block) (default: 60)")
    a("--max-rss-growth", type=float, default=5.0, help="RSS growth goal in %% (default: 5)")
    a("--progress-interval", type=float, default=5.0, help="seconds between progress lines on stderr (default: 5)")
    a("--url", help="a running server to soak instead of starting one (e.g. http://127.0.0.1:8000)")
    a("--pid", type=int, help="with --url: the server's process id, to read its RSS from /proc "
                               "(without it: the server's own figure from /v1/memory)")
    a("--api-key", help="with --url: the server's API key")
    a("--model", help="model id to request (default: the first one /v1/models lists)")
    a("--max-body-bytes", type=int, default=8 * 2**20,
      help="the server's body limit; the oversized bad input is just past it (default: 8 MiB, the server's default)")
    a("--serve-arg", action="append", default=[], metavar="ARG",
      help="extra argument for the `quantserve serve` started here, repeatable (e.g. --serve-arg=--max-num-seqs=16)")
    a("--startup-timeout", type=float, default=900.0, help="seconds to wait for the server to be ready (default: 900)")
    a("--json-out", metavar="PATH", help="also write every figure as JSON to PATH")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if args.pid is not None and not args.url:
        build_parser().error("--pid needs --url")
    # SIGTERM as Ctrl-C: the finally blocks stop the server this script started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = asyncio.run(soak(args))
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, httpx.HTTPError, OSError, KeyError) as exc:
        print(f"soak: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    missed = verdict(report, args.max_rss_growth)
    report["verdict"] = "pass" if not missed else "fail"
    report["goals_missed"] = missed
    print_report(report, missed, args.max_rss_growth)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
