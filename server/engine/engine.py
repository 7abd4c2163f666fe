"""AsyncEngine: one thread owns the model and the device; asyncio callers submit and stream.

This module is the callers' side (submit, abort, embed, stats); engine_loop.py is what runs on the
engine thread. The engine thread loops: take new requests and aborts from the inbox -> scheduler.schedule()
-> runner.run(batch) -> scheduler.postprocess() -> detokenize / stop strings -> push each
request's news to its own output collector (one loop.call_soon_threadsafe per event loop per
step carries them all). A collector merges deltas its consumer has not read yet, so the engine
never waits on a slow client. When there is no work the thread sleeps on an event (no polling).

Failures: an exception in a step fails the requests of that step (their streams raise) and the
engine goes on; if the thread itself dies, health() says so and every pending stream raises.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import logging
import threading
from typing import Any, Optional

from torch import nn

from quantserve.kernels.cpu import paged_attention as native
from .block_manager import BlockManager
from .config import EngineConfig
from .device_worker import DeviceWorker
from .detokenizer import IncrementalDetokenizer
from .errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from .grammar import GrammarCompiler
from .grammar_pool import GrammarLimits
from .lora import LoRARegistry, resolve
from .model_runner import ModelRunner
from .models import model_max_len, vocab_size
from .models import lora_layers
from .outputs import EngineStats
from .scheduler import Scheduler
from .speculative import build_spec_decoder
from .sequence import SamplingParams, Sequence
from .engine_loop import EngineLoop, Request
from .streams import Collector, RequestStream

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineConfig", "EngineStats"]


# ---------------------------------------------------------------------------------- engine


class AsyncEngine(EngineLoop):
    """Continuous batching over a paged KV cache; see the module docstring.

    Attributes: max_model_len (context length limit), tokenizer, model_name.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: Optional[EngineConfig] = None,
                 embedding_only: bool = False, worker: Optional[DeviceWorker] = None,
                 draft_model: Optional[nn.Module] = None) -> None:
        """embedding_only: the model is an embedding model without an output head of its own
        (loading/embedding_folder.py): embed() serves, generation requests are refused.
        worker: the device's worker thread, shared with the other engines on the device (the
        registry's); None: a worker of this engine's own.
        draft_model: the speculative draft model, already loaded (else config.speculative_config's
        "model" is loaded here when it names one)."""
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer
        # The engine thread decodes with its own copy: a fast tokenizer used from two threads at
        # once (the HTTP layer encoding with padding/truncation) can fail with "Already borrowed".
        try:
            self._detok_tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared as is
            self._detok_tokenizer = tokenizer
        self.model_name = config.model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.runner = ModelRunner(model, config)
        capacity = self.runner.capacity_tokens
        if config.max_model_len is not None:
            if config.max_model_len > capacity:
                raise ValueError(
                    f"max_model_len ({config.max_model_len}) is more than the KV cache holds ({capacity} tokens): "
                    "give the KV cache more memory or lower max_model_len"
                )
            self.max_model_len = config.max_model_len
        else:
            self.max_model_len = min(model_max_len(model, tokenizer), capacity)
        self.vocab_size = vocab_size(model)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        # Structured outputs: grammars checked at admission (generate_many), masks in the sampler.
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids,
                                        GrammarLimits.from_config(config))
        self.runner.sampler.use_grammars(self.grammars)
        # Speculative decoding (speculative.py; None: off): drafts proposed before each step.
        self.spec = build_spec_decoder(config, self.runner, draft_model)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching and self.runner.supports_prefix_caching,
                                          sliding_window=self.runner.sliding_window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   recompute_above=self.runner.recompute_above, max_loras=config.max_loras,
                                   policy=config.scheduling_policy, max_seqs_per_client=config.max_seqs_per_client)
        # LoRA adapters by served name (engine/lora.py): loaded from any thread, held by requests.
        lora = self.runner.lora
        self.loras = LoRARegistry(None if lora is None else lora.targets, config.max_lora_rank,
                                  lora_layers.weight_dtype(self.runner.device, self.runner.dtype),
                                  self.runner.device, unsupported=self.runner.lora_unsupported)

        self.pooling = None  # how embed() pools (pooling.py), read from the model's folder on first use
        self.embedding_only = embedding_only
        self._embed_jobs: collections.deque = collections.deque()  # engine thread only: batches waiting for blocks
        self._inbox: collections.deque = collections.deque()
        self.worker = worker if worker is not None else DeviceWorker(self.runner.device, config.follow_cpu_load)
        self._wake = self.worker.wake
        self._detached: Optional[threading.Event] = None  # set once the worker let this engine go
        self._prepared = False
        self._stopping = False
        self._dead_error: Optional[str] = None
        self._requests: dict[str, Request] = {}  # engine thread only
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any]]] = {}  # engine thread only
        # Requests submitted and not yet taken from the inbox = submitted - admitted; each
        # counter is written by one side only (submitters under a lock, the engine thread).
        self._submit_lock = threading.Lock()
        self._num_submitted = 0
        self._num_admitted = 0
        # Statistics (written by the engine thread, read anywhere).
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_requests_finished = 0
        self._num_steps = 0
        self._recent_finishes: collections.deque = collections.deque(maxlen=64)  # monotonic times
        self._release_cpu_threads()  # this thread (the loader's) is done with parallel CPU work

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Warm the model up if prepare() has not, then have the device worker step this engine
        (raises if warming up fails)."""
        if self._detached is not None:
            return
        if not self._prepared:
            await _in_thread(self.prepare, "quantserve-warmup")
        self._detached = self.worker.attach(self)
        self._release_cpu_threads()  # the event loop's thread computes nothing

    async def shutdown(self) -> None:
        """Stop stepping this engine; unfinished requests end with finish_reason "abort"."""
        self._stopping = True
        self._wake.set()
        detached = self._detached
        if detached is not None and not detached.is_set() and self.worker.alive:
            await asyncio.to_thread(detached.wait)
        self.grammars.close()

    def _release_cpu_threads(self) -> None:
        # Only the engine thread should keep OpenMP workers (see native.release_openmp_threads).
        if self.runner.device.type == "cpu":
            native.release_openmp_threads()

    def health(self) -> tuple[bool, Optional[str]]:
        if self._dead_error is not None:
            return False, self._dead_error
        if self._detached is None:
            return False, "engine not started"
        if self._detached.is_set() or not self.worker.alive:
            return False, f"engine stopped{': ' + self.worker.error if self.worker.error else ''}"
        return True, None

    # ------------------------------------------------------------------------------ requests

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 lora: Optional[str] = None, client: str = "", priority: int = 0) -> RequestStream:
        """Submit a request; iterate the result for its outputs (must be called on an event loop).

        Raises InvalidRequestError (a ValueError) for a request that breaks a limit,
        EngineOverloadedError when too many are waiting, EngineDeadError when the engine is not running.
        """
        return self.generate_many([prompt_token_ids], [params], [request_id], lora, client, priority)[0]

    def generate_many(self, prompts: list[list[int]], params: list[SamplingParams],
                      request_ids: list[str], lora: Optional[str] = None, client: str = "",
                      priority: int = 0) -> list[RequestStream]:
        """Submit several requests at once (OpenAI's batched prompts): all are admitted, or none.

        The one place where a request's limits are checked: token ids within the vocabulary, the
        context length, the choices per call (n summed over the prompts), the output tokens per
        call (n x max_tokens summed) and the queue bound; a request without max_tokens gets
        default_max_tokens. `lora` names a loaded LoRA adapter every prompt runs with (None: the
        base model); an unknown name raises InvalidRequestError with code model_not_found.
        `client` names who sent it (an API key's or an address's name) and `priority` orders it
        (lower first): the scheduling policy shares the engine across clients by them.
        """
        if not len(prompts) == len(params) == len(request_ids) or not prompts:
            raise ValueError("generate_many needs as many params and request ids as prompts (at least one)")
        if self.embedding_only:
            raise InvalidRequestError(f"model '{self.model_name}' is an embedding model (it has no output head): it "
                                      "serves /v1/embeddings only, not text generation", "model")
        for sp in params:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(sp).__name__}")
        adapter = resolve(self.loras, lora)
        if not isinstance(priority, int) or isinstance(priority, bool) or not -2**31 <= priority < 2**31:
            raise InvalidRequestError(f"priority must be an integer in [-2**31, 2**31), got {priority!r}", "priority")
        if priority and self.config.scheduling_policy == "fcfs":
            raise InvalidRequestError("priority needs --scheduling-policy fair or priority (this server runs fcfs)",
                                      "priority")
        checked = [self._check_prompt(prompt, sp) for prompt, sp in zip(prompts, params)]
        choices = sum(sp.n for sp in params)
        if choices > self.config.max_n:
            what = "n" if len(prompts) == 1 else "n times the number of prompts"
            raise InvalidRequestError(f"{what} must be at most {self.config.max_n}, got {choices}", "n")
        params = self._bound_max_tokens(checked, params, choices)
        loop = asyncio.get_running_loop()
        requests = [self._new_request(rid, prompt, sp, loop, adapter, client, priority)
                    for rid, prompt, sp in zip(request_ids, checked, params)]
        # Under the lock that the dying engine thread also takes: a request is either in the inbox
        # before the thread fails everything in it, or refused here; never left behind.
        with self._submit_lock:
            if self._dead_error is not None or self._detached is None or self._stopping:
                raise EngineDeadError(self._dead_error or "the engine is not running")
            waiting = self._num_unadmitted + self.scheduler.num_waiting
            if waiting + len(requests) > self.config.max_queue:
                raise EngineOverloadedError(f"{waiting} requests are waiting", self._retry_after(waiting))
            self._num_submitted += len(requests)
            self._inbox.extend(("add", request) for request in requests)
        self._wake.set()
        return [RequestStream(request.request_id, request.collector, self._abort_soon(request.request_id))
                for request in requests]

    def _check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt must have at least one token", "prompt")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        limit = self.max_model_len
        if len(prompt) >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {len(prompt)} tokens "
                "(one more is needed for the completion). Shorten the prompt.", "prompt", "context_length_exceeded")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the "
                "completion). Shorten the prompt or ask for fewer completion tokens.",
                "max_tokens", "context_length_exceeded")
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(f"n ({params.n}) is more than max_num_seqs ({self.config.max_num_seqs})", "n")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", "stop")
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab_size:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", "logit_bias")
        if params.structured is not None:
            # Prepared (compiled off the loop) by the HTTP layer; else compiled now. Either way a bad
            # grammar is refused before anything runs.
            self.grammars.check(params.structured)
        return prompt

    def _bound_max_tokens(self, prompts: list[list[int]], params: list[SamplingParams],
                          choices: int) -> list[SamplingParams]:
        """params with max_tokens filled in where the request gave none (default_max_tokens, what
        the context leaves, its share of max_tokens_per_request); InvalidRequestError where the
        given ones ask for more than max_tokens_per_request in all."""
        bound = self.config.max_tokens_per_request
        asked = sum(sp.n * sp.max_tokens for sp in params if sp.max_tokens is not None)
        if asked > bound:
            given = " + ".join(f"{sp.n} x {sp.max_tokens}" for sp in params if sp.max_tokens is not None)
            raise InvalidRequestError(
                f"n x max_tokens ({given} = {asked} tokens) is more than this server's max_tokens_per_request "
                f"({bound}); ask for fewer choices or tokens", "max_tokens")
        share = max(1, bound // choices)
        out = []
        for prompt, sp in zip(prompts, params):
            if sp.max_tokens is None:
                limit = min(share, self.max_model_len - len(prompt))
                if self.config.default_max_tokens is not None:
                    limit = min(limit, self.config.default_max_tokens)
                sp = dataclasses.replace(sp, max_tokens=max(limit, min(sp.min_tokens, self.max_model_len - len(prompt)), 1))
            out.append(sp)
        return out

    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                     loop: asyncio.AbstractEventLoop, lora: Any = None, client: str = "",
                     priority: int = 0) -> Request:
        seqs = [Sequence(request_id, prompt, params, index=i, max_model_len=self.max_model_len,
                         eos_token_ids=self.eos_token_ids, lora=lora, client=client, priority=priority)
                for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self._detok_tokenizer, prompt, params.stop) if self.tokenizer is not None
                  else None for _ in seqs]
        return Request(request_id, seqs, detoks, Collector(), loop)

    def _abort_soon(self, request_id: str):
        """The abort a stream calls when it is closed or collected. Only an append to the inbox
        (atomic, lock-free): it may run inside garbage collection on any thread. A request being
        aborted is queued or running, so the engine thread is awake and sees it at its next step."""
        message = ("abort", request_id)
        return lambda: self._inbox.append(message)

    def abort(self, request_id: str) -> None:
        """Cancel a request (unknown or finished ids are ignored); its blocks are freed at the next step."""
        self._inbox.append(("abort", request_id))
        self._wake.set()

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Pooled embedding vectors of `prompts` (pooling.py: the model's own pooling), computed on
        the engine thread between steps through the engine's prefill path, in batches of at most
        max_num_batched_tokens tokens and max_num_seqs prompts; their keys and values go to scratch
        KV blocks, and the prefix cache is not touched. Raises InvalidRequestError for a prompt
        that breaks a limit, EngineDeadError when the engine is not running."""
        from . import pooling

        # Each prompt's keys and values must fit in the KV cache at once (a sliding-window model's
        # max_model_len can be longer than the cache).
        bm = self.block_manager
        limit = min(self.max_model_len, bm.num_blocks * bm.block_size)
        for prompt in prompts:
            if not prompt:
                raise InvalidRequestError("an input must have at least one token", "input")
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
                raise InvalidRequestError(f"input token ids must be integers in [0, {self.vocab_size})", "input")
            if len(prompt) > limit:
                raise InvalidRequestError(f"This model's maximum context length is {limit} tokens, but "
                                          f"an input has {len(prompt)} tokens.", "input", "context_length_exceeded")
        if self.pooling is None:
            self.pooling = pooling.pooling_for(self.runner.hf_model)
        loop = asyncio.get_running_loop()
        groups = pooling.batches(prompts, self.config.max_num_batched_tokens, self.config.max_num_seqs, bm.block_size,
                                 bm.num_blocks)
        jobs = [pooling.EmbedJob([prompts[i] for i in group], self.pooling, loop) for group in groups]
        with self._submit_lock:  # as generate_many: queued before the thread fails the inbox, or refused
            if self._dead_error is not None or self._detached is None or self._stopping:
                raise EngineDeadError(self._dead_error or "the engine is not running")
            self._inbox.extend(("embed", job) for job in jobs)
        self._wake.set()
        vectors: list[list[float]] = [[] for _ in prompts]
        for group, result in zip(groups, await asyncio.gather(*(job.future for job in jobs))):
            for i, vector in zip(group, result):
                vectors[i] = vector
        return vectors

    def fail_unfinished(self, exc: BaseException) -> None:
        """End every request submitted so far with `exc`, from any thread. Serving uses it when its
        drain limit runs out. The consumers get `exc` at once (the engine thread may be in the middle
        of a long step on a busy CPU); the engine thread ends the requests at its next step and
        frees their blocks."""
        self._inbox.append(("fail", exc))
        self._wake.set()
        # list() of a dict / deque is one C call under the GIL: a consistent snapshot even while the
        # engine thread changes them. A collector ignores errors after its first.
        pending = list(self._requests.values()) + [item for kind, item in list(self._inbox) if kind == "add"]
        for request in pending:
            try:
                request.loop.call_soon_threadsafe(request.collector.put, exc)
            except RuntimeError:  # its event loop is closed: nobody is listening
                pass

    def weight_memory(self) -> dict[str, int]:
        """Bytes of the model's weights as resident while serving ({"total", "<dtype>": ...})."""
        return self.runner.weight_memory()

    def device_memory_plan(self) -> dict[str, float]:
        """How the GPU's memory was shared out at startup (weights and others in use, activation
        peak, CUDA graphs estimated and measured, KV cache); empty on a CPU or a fixed KV size."""
        return dict(self.runner.memory_plan)

    def startup_seconds(self) -> dict[str, float]:
        """The engine's startup phases in seconds (warmup, and on a GPU profile, tune, capture)."""
        return dict(self.runner.startup_seconds)

    def execution(self) -> dict[str, object]:
        """How this engine runs a step, chosen once at start (/health, /metrics): the forward path and
        why, the attention backend, the KV cache dtype, whether decode steps replay CUDA graphs (else
        why not), and the steps run each way."""
        r = self.runner
        return {"forward": r.forward.path, "forward_reason": r.forward.reason, "attention_backend": r.attention.name,
                "kv_cache_dtype": str(r.kv_dtype).removeprefix("torch."),
                "cuda_graphs": "on" if r.graphs is not None else r.graphs_off, "steps": dict(r.steps)}

    def speculation(self) -> Optional[dict[str, object]]:
        """Speculative decoding's counters (vLLM's meaning: drafts, draft tokens, accepted tokens,
        accepted per draft position) and its method; None when it is off."""
        spec = self.spec
        if spec is None:
            return None
        return {"method": spec.proposer.name, "num_speculative_tokens": spec.k, **spec.stats.snapshot()}

    def cpu_load_report(self) -> Optional[dict[str, object]]:
        """The device's thread-count controller's state for /health (None when the count is pinned)."""
        return self.worker.cpu_load_report()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + self._num_unadmitted,
            kv_cache_usage=bm.usage,
            num_kv_blocks=bm.num_blocks,
            block_size=bm.block_size,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            kv_cache_bytes=self.runner.num_blocks * self.runner.bytes_per_block,
            kv_cache_dtype=str(self.runner.kv_dtype).removeprefix("torch."),
            num_requests_finished=self._num_requests_finished,
            num_steps=self._num_steps,
        )

    @property
    def num_unfinished(self) -> int:
        """Requests and embedding batches submitted and not yet finished, read from any thread (the
        registry never unloads a model under them)."""
        return len(self._requests) + self._num_unadmitted + len(self._embed_jobs)

    @property
    def _num_unadmitted(self) -> int:
        return max(0, self._num_submitted - self._num_admitted)

    def _retry_after(self, waiting: int) -> float:
        """Seconds until about `waiting` requests finish, from the recent completion rate (1..60)."""
        times = list(self._recent_finishes)
        if len(times) >= 2 and times[-1] > times[0]:
            rate = (len(times) - 1) / (times[-1] - times[0])
            return float(min(60.0, max(1.0, waiting / rate)))
        return 5.0


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


async def _in_thread(fn: Any, name: str) -> Any:
    """fn() on a daemon thread of its own, awaited (not the default executor, whose threads keep
    OpenMP pools alive and which a stopping process waits for)."""
    import concurrent.futures

    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await asyncio.wrap_future(future)
