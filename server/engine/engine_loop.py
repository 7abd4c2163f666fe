"""The device worker's side of AsyncEngine (engine.py): warm-up, then the rounds the worker
(device_worker.py) runs: take new requests and aborts from the inbox, run a step (schedule -> run
-> postprocess), detokenize, apply stop strings and hand each request's news to its own
collector. Failures of a step fail that step's requests; an exception escaping a round fails them
all and marks this engine dead (other engines on the device go on)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from .detokenizer import IncrementalDetokenizer
from .errors import EngineDeadError, RequestFailedError
from .model_runner import device_guard
from .outputs import CompletionOutput, RequestOutput
from .scheduler import ScheduledBatch
from .sequence import FinishReason, Sequence
from .streams import Collector, deliver

logger = logging.getLogger(__name__)


class Request:
    """One submitted request: its sequences (n choices), their detokenizers and its output collector."""


    __slots__ = ("request_id", "seqs", "detokenizers", "collector", "loop", "num_prompt_tokens", "arrival",
                 "queue_time")

    def __init__(self, request_id: str, seqs: list[Sequence], detokenizers: list[Optional[IncrementalDetokenizer]],
                 collector: Collector, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.seqs = seqs
        self.detokenizers = detokenizers
        self.collector = collector
        self.loop = loop
        self.num_prompt_tokens = seqs[0].num_prompt_tokens
        self.arrival = time.monotonic()
        self.queue_time: Optional[float] = None  # arrival -> first step that ran it


class EngineLoop:
    """What runs on the device worker's thread. AsyncEngine holds the state it reads: runner,
    scheduler, block_manager, config, tokenizer, the inbox and its lock, the requests by id, counters."""

    # ------------------------------------------------------------------------------ engine thread

    def prepare(self) -> None:
        """Warm the model up (every kernel and shape it serves; on a GPU the tuning and CUDA graphs)
        on the calling thread: the loader's, so that a device worker stepping other models is not
        held up by it. start() runs it if nobody has."""
        if self._prepared:
            return
        with device_guard(self.runner.device):
            self.runner.warmup(self.max_model_len)
        # llguidance's view of the vocabulary (~0.4 s of Python holding the GIL): built before
        # serving, not on the first constrained request, where it would stall every stream.
        self.grammars.warm()
        self._prepared = True

    def _wants_step(self) -> bool:
        """Whether the device worker has anything to do for this engine now."""
        return bool(self._inbox or self._embed_jobs or self.scheduler.has_work())

    def _tick(self) -> None:
        """One round on the device worker's thread: new requests and aborts, the embedding batches
        that fit, one step, and the outputs delivered."""
        self._drain_inbox()
        if self._embed_jobs:
            self._embed_between_steps()
        if self.scheduler.has_work():
            self._step()
        self._flush()

    def _stop_requests(self) -> None:
        """The engine stops (shutdown): every request still running ends with "abort"."""
        with self._submit_lock:
            self._dead_error = "engine shut down"
        for request in list(self._requests.values()):
            self._abort_request(request)
        self._drain_inbox_on_exit()
        self._flush()

    def _die(self, exc: BaseException) -> None:
        """The step loop raised: no state can be trusted; fail every request, refuse new ones."""
        with self._submit_lock:  # see generate_many: nothing can be queued after this
            self._dead_error = f"engine thread died: {exc!r}"
        self._fail_all(EngineDeadError(self._dead_error))
        self._flush()

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            kind, item = inbox.popleft()
            if kind == "add":
                self._num_admitted += 1
                if item.request_id in self._requests:
                    self._send(item, RequestFailedError(f"request id {item.request_id!r} is already running"))
                    continue
                self._requests[item.request_id] = item
                self._prompt_tokens_total += item.num_prompt_tokens
                for seq in item.seqs:
                    self.scheduler.add(seq)
            elif kind == "fail":
                for request in list(self._requests.values()):
                    self._fail_request(request, item)
            elif kind == "embed":  # a batch of embeddings (pooling.py): run between two steps
                self._embed_jobs.append(item)
            else:
                request = self._requests.get(item)
                if request is not None:
                    self._abort_request(request)

    def _embed_between_steps(self) -> None:
        """The oldest embedding batch whose caller still waits (pooling.py), through the prefill path
        with scratch KV blocks, once enough blocks are free: running sequences are never preempted
        for it; it waits for them to free theirs."""
        jobs, bm = self._embed_jobs, self.block_manager
        while jobs and jobs[0].abandoned:
            jobs.popleft()
        if not jobs:
            return
        job = jobs[0]
        blocks = bm.take_scratch(job.blocks_needed(bm.block_size))
        if blocks is None:
            if not self.scheduler.has_work():  # pragma: no cover - embed() cuts batches to fit the cache
                jobs.popleft()
                job.fail(RuntimeError(f"an embedding batch needs {job.blocks_needed(bm.block_size)} KV blocks; "
                                      f"the cache has {bm.num_blocks}"))
            return
        jobs.popleft()
        job.run(self.runner, blocks, self.config.max_num_batched_tokens, bm.return_scratch)

    def _drain_inbox_on_exit(self) -> None:
        while self._embed_jobs:
            self._embed_jobs.popleft().fail(EngineDeadError("engine shut down"))
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._num_admitted += 1
                self._send(item, EngineDeadError("engine shut down"))
            elif kind == "embed":
                item.fail(EngineDeadError("engine shut down"))

    def _step(self) -> None:
        batch: Optional[ScheduledBatch] = None
        try:
            if self.spec is not None:  # drafts for the decoding sequences (speculative.py)
                self.spec.plan(self.scheduler.running)
            batch = self.scheduler.schedule()
            if batch.seqs:
                self._note_first_scheduled(batch)
                result = self.runner.run(batch)
                before = [s.num_tokens for s in batch.seqs]
                updated = self.scheduler.postprocess(batch, result.token_ids)
            elif not batch.cut_off:
                raise RuntimeError("the scheduler found nothing it could run")  # pragma: no cover
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            logger.exception("engine step failed")
            self._fail_step(batch, exc)
            return
        news: dict[str, list[CompletionOutput]] = {}
        for seq in batch.cut_off:  # too long for the whole KV cache: ends with "length"
            logger.warning("request %s: sequence of %d tokens does not fit in the KV cache", seq.request_id,
                           seq.num_tokens)
            news.setdefault(seq.request_id, []).append(
                CompletionOutput(seq.index, "", [], None, FinishReason.LENGTH.value))
        if not batch.seqs:
            updated, logprobs, first = [], {}, {}
        else:
            self._num_steps += 1
            logprobs = {id(s): lp for s, lp in zip(batch.seqs, result.logprobs)}
            first = {id(s): n for s, n in zip(batch.seqs, before)}  # where each one's new tokens start
            if batch.num_drafts:
                self._record_drafts(batch, result.token_ids)
        for seq in updated:
            request = self._requests.get(seq.request_id)
            if request is None:  # pragma: no cover - finished requests leave the scheduler
                continue
            start = first[id(seq)]
            tokens = seq.token_ids[start:]  # one, or several after a verification (speculative decoding)
            detok = request.detokenizers[seq.index]
            text = ""
            if detok is not None:
                try:
                    for k, token in enumerate(tokens):
                        last = k == len(tokens) - 1
                        piece, stopped = detok.update([token], seq.is_finished and last)
                        text += piece
                        if stopped:
                            break
                except Exception as exc:  # noqa: BLE001 - a tokenizer failure ends only this request
                    logger.exception("detokenizing request %s failed", seq.request_id)
                    news.pop(seq.request_id, None)
                    self._fail_request(request, RequestFailedError(f"detokenization failed: {exc!r}"))
                    continue
                if stopped and not last:  # a stop string inside an accepted run: the rest is dropped
                    tokens = tokens[: k + 1]
                    del seq.token_ids[start + k + 1:]
                if stopped and not seq.is_finished:
                    self.scheduler.finish(seq, FinishReason.STOP)
            self._generation_tokens_total += len(tokens)
            lp = logprobs.get(id(seq))
            lps = None if lp is None else (lp[: len(tokens)] if isinstance(lp, list) else [lp])
            news.setdefault(seq.request_id, []).append(CompletionOutput(
                index=seq.index, text=text, token_ids=tokens, logprobs=lps,
                finish_reason=None if seq.finish_reason is None else seq.finish_reason.value,
            ))
        for request_id, outputs in news.items():
            request = self._requests.get(request_id)
            if request is None:  # failed above
                continue
            finished = all(s.is_finished for s in request.seqs)
            if finished:
                self._retire(request)
            self._send(request, RequestOutput(
                request_id=request_id, outputs=outputs, num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=request.seqs[0].num_cached_tokens, finished=finished,
                queue_time=request.queue_time,
            ))

    def _record_drafts(self, batch: ScheduledBatch, emitted: list) -> None:
        """Speculation statistics and each sequence's acceptance estimate (speculative.py)."""
        for seq, d, tokens in zip(batch.seqs, batch.num_drafts, emitted):
            if d and isinstance(tokens, list):
                self.spec.record(seq, d, len(tokens) - 1)

    def _note_first_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for seq in batch.seqs:
            request = self._requests.get(seq.request_id)
            if request is not None and request.queue_time is None:
                request.queue_time = now - request.arrival

    # ------------------------------------------------------------------------------ helpers

    def _send(self, request: Request, item: Any) -> None:
        """Queue an output or error for its request; _flush delivers them."""
        self._outbox.setdefault(request.loop, []).append((request, item))

    def _flush(self) -> None:
        """Deliver the queued outputs: one wake-up per event loop per step, not one per request
        (each wake-up is Python work competing with the model for the CPU)."""
        while self._outbox:
            outbox, self._outbox = self._outbox, {}
            for loop, items in outbox.items():
                try:
                    loop.call_soon_threadsafe(deliver, [(request.collector, item) for request, item in items])
                except RuntimeError:  # the consumers' event loop is closed: nobody is listening
                    for request, _ in items:
                        if request.request_id in self._requests:
                            self._abort_request(request)

    def _retire(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        for seq in request.seqs:
            self.runner.release(seq)
            if self.spec is not None:
                self.spec.release(seq)
        self._num_requests_finished += 1
        self._recent_finishes.append(time.monotonic())

    def _abort_request(self, request: Request) -> None:
        outputs = []
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
                outputs.append(CompletionOutput(seq.index, "", [], None, FinishReason.ABORT.value))
        self._retire(request)
        self._send(request, RequestOutput(request.request_id, outputs, request.num_prompt_tokens,
                                          request.seqs[0].num_cached_tokens, finished=True))

    def _fail_request(self, request: Request, exc: BaseException) -> None:
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        self._retire(request)
        self._send(request, exc)

    def _fail_step(self, batch: Optional[ScheduledBatch], exc: Exception) -> None:
        error = RequestFailedError(f"engine step failed: {exc!r}")
        error.__cause__ = exc
        if batch is None:  # the scheduler itself failed: nothing is known to be consistent
            failed = list(self._requests.values())
        else:
            ids = dict.fromkeys(s.request_id for s in batch.seqs)
            failed = [self._requests[i] for i in ids if i in self._requests]
        for request in failed:
            self._fail_request(request, error)
        # Blocks of the failed step may have been registered for prefix sharing but never written.
        self.block_manager.evict_free_cached()

    def _fail_all(self, exc: BaseException) -> None:
        for request in list(self._requests.values()):
            try:
                self._fail_request(request, exc)
            except Exception:  # noqa: BLE001 - best effort while dying
                self._send(request, exc)
        while self._embed_jobs:
            self._embed_jobs.popleft().fail(exc)
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._send(item, exc)
            elif kind == "embed":
                item.fail(exc)
