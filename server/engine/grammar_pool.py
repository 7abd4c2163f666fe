"""Where grammars compile: a bounded pool of worker threads with a time budget, the size caps a
request's grammar must meet first, and the cache of compiled grammars, bounded in bytes.

Compiling is llguidance building an LLMatcher (its lexer over the whole vocabulary): ~1 ms for a
typical schema, ~1 s for 30,000 choices, growing faster than linearly. llguidance drops the GIL
while it builds (measured: a pure-Python thread keeps ~85% of its pace meanwhile), so a compile
on a worker thread delays neither the event loop nor the engine thread. A compile that runs past
the budget cannot be interrupted (it is Rust code): the request gets its 400 at the deadline, the
worker finishes in the background, and the pool's size bounds how many such compiles run at once.

Pure Python (no llguidance import): the compile function is handed in.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import dataclasses
import threading
from typing import Any, Callable, Generic, Hashable, Optional, TypeVar

from .errors import InvalidRequestError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class GrammarLimits:
    """What a request's grammar may cost (the server's --grammar-* and --max-grammar-* options).

    Attributes:
        compile_workers: threads that compile grammars (requests beyond wait their turn).
        compile_timeout: seconds a request's grammar may take to compile, waiting included.
        cache_bytes: bytes of compiled grammars kept for reuse (least recently used dropped first).
        max_choices: most strings in a choice constraint.
        max_schema_bytes: longest JSON schema, as JSON text.
        max_regex_length: longest regex, in characters.
        max_grammar_bytes: longest grammar text (GBNF / Lark, and the tool-call grammar built from
            the request's tools).
    """

    compile_workers: int = 2
    compile_timeout: float = 10.0
    cache_bytes: int = 128 * 2**20
    max_choices: int = 10_000
    max_schema_bytes: int = 2**20
    max_regex_length: int = 16_384
    max_grammar_bytes: int = 2**20

    @classmethod
    def from_config(cls, config: Any) -> "GrammarLimits":
        """From an EngineConfig (or Settings): its grammar_* / max_grammar_* fields."""
        names = {"compile_workers": "grammar_compile_workers", "compile_timeout": "grammar_compile_timeout",
                 "cache_bytes": "grammar_cache_bytes", "max_choices": "max_grammar_choices",
                 "max_schema_bytes": "max_grammar_schema_bytes", "max_regex_length": "max_grammar_regex_length",
                 "max_grammar_bytes": "max_grammar_bytes"}
        defaults = cls()
        return cls(**{ours: getattr(config, theirs, getattr(defaults, ours)) for ours, theirs in names.items()})


class ByteLRU(Generic[T]):
    """A thread-safe LRU map bounded by the summed sizes of its values (each given on put).
    A value larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[Hashable, tuple[T, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[T]:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put_new(self, key: Hashable, value: T, nbytes: int) -> T:
        """Put unless the key is there already; the value kept."""
        with self._lock:
            hit = self._items.get(key)
        if hit is not None:
            return hit[0]
        self.put(key, value, nbytes)
        return value

    def put(self, key: Hashable, value: T, nbytes: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if nbytes > self.max_bytes:
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.nbytes -= size


# The workers' nice value: a grammar that takes seconds to compile yields a contended core to the
# engine thread's step and the event loop. Per-thread niceness orders threads of one process (they
# share a scheduling group, so autogroup does not flatten it as it does across sessions). Mild on
# purpose: at 19, a 1.6 s compile starved past --grammar-compile-timeout under a busy engine
# (bench/structured.py --delays: every big request refused); at 5 it compiles and no chat waits on it.
COMPILE_NICE = 5


def _lower_priority() -> None:
    """Run in each worker as it starts: this thread only (Linux: a thread id is a PRIO_PROCESS id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the compile still runs
        pass


class CompilePool:
    """Runs compile(spec) on a few low-priority worker threads; `run` awaits it within the time budget."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.timeout = timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="quantserve-compile",
                                                               initializer=_lower_priority)

    async def run(self, compile: Callable[[], T], field: Optional[str]) -> T:
        """compile() on a worker; InvalidRequestError (field) naming the limit when the budget
        runs out first (waiting for a free worker counts)."""
        future = self._executor.submit(compile)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: never runs; running: finishes on its own
            raise InvalidRequestError(
                f"the grammar did not compile within the server's limit of {self.timeout:g} s "
                "(--grammar-compile-timeout): simplify it (fewer choices, a smaller schema)", field) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
