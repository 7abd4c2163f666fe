"""Follow the cores we actually get: the CPU thread count, adjusted while serving.

A decode step runs hundreds of OpenMP regions, each split over all our threads. When something
else takes one of our cores, the thread that shares it runs only in scheduler time slices of
several milliseconds, and every region waits for it (while its partner spin-waits, burning the
time the parked thread needs): on the 2-core Xeon a busy loop cut a stream to 5-25% of its idle
throughput, and a niced one in another session (autogroup: nice does not lower a process's share
across sessions) to 4%. Computing with one thread fewer than the cores we get avoids that wait.

Who takes the core does not matter (a niced process, another session, another cgroup, a
hypervisor), so the controller does not guess it from the others' CPU time: it asks the kernel
whether our own threads waited. Between two samples (every `interval` seconds, between steps;
a slow step is one sample by itself):

    wait  = sum over our compute threads of their run-queue delay (/proc/self/task/*/schedstat,
            2nd field: ns runnable but not running)
            - the CPU time our other threads ran (the HTTP loop, tokenizers: they displace a
              compute thread by running, which is our own use, not a core taken from us)
    lost  = wait / busy  +  throttled / wall * threads

in CPUs, `busy` being the engine thread's own time on a CPU or waiting for one in the window (so
a window in which the engine slept between requests is not diluted), `throttled` the cgroup
cpu.stat throttled time along our cgroup path (a quota stops all our threads at once). Compute threads are the engine thread (the one that calls `maybe_update`) and the
threads that were runnable at least half as long as it was in the window: its OpenMP workers,
which spin-wait between regions and so are runnable whenever it is. The main thread (the HTTP
event loop) is never one, however busy streaming keeps it. With threads == the cores we
get, `lost` is ~0; with one more thread than that, our own threads queue behind each other and
the neighbour, which is exactly the signal.

The rule (pure: ThreadCountPolicy):
- Give up at once: lost >= DOWN_AT (0.4 CPUs) drops floor(lost - DOWN_AT) + 1 threads in that
  sample (at least 1 thread stays). No second sample: one slow step is enough evidence.
- Take back by probing: while threads < ceiling, once `backoff` seconds have passed since the
  last change and the CPUs of our mask were idle for at least PROBE_IDLE (0.5) of a CPU in the
  last sample (/proc/stat, nice column counted as busy: the only use of /proc/stat, so a core
  held by a neighbour is not probed for), try one thread more for one sample. Keep it if
  lost < UP_BELOW (0.25), else go back at once. A failed probe, or a kept count given up again
  within HOLD_RESET (5 s), doubles the backoff (0.5 s up to 3 s); holding longer resets it.
The ceiling is the count the server started with (--cpu-threads pins the count: no controller
then). torch.get_num_threads() stays the one count every kernel reads; this module only sets it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..cpu_threads import CGROUP_ROOT, PROC_SELF_CGROUP, _ancestors, _cgroup_paths

logger = logging.getLogger(__name__)

DOWN_AT = 0.4  # CPUs' worth of waiting in a sample that makes us give a core up
UP_BELOW = 0.25  # a probe at one thread more is kept when the waiting stays below this
PROBE_IDLE = 0.5  # idle CPUs in our mask (last sample) before a probe is worth trying
BACKOFF_MIN, BACKOFF_MAX = 0.5, 3.0  # seconds between a change and the next probe
HOLD_RESET = 5.0  # a count held this long resets the backoff
COMPUTE_SHARE = 0.5  # runnable at least this share of the engine thread's time: a compute thread
DEFAULT_INTERVAL = 0.2  # seconds between samples
MIN_BUSY_NS = 20_000_000  # a window in which the engine thread was busy less than 20 ms decides nothing


# ------------------------------------------------------------------------------ kernel readings


def parse_schedstat(text: str) -> tuple[int, int]:
    """(ns on a CPU, ns waiting on a run queue) from /proc/<pid>/task/<tid>/schedstat."""
    fields = text.split()
    return int(fields[0]), int(fields[1])


def parse_cgroup_cpu_stat(text: str) -> Optional[int]:
    """Throttled ns from a cgroup's cpu.stat: v2's throttled_usec, v1's throttled_time (ns);
    None when neither is there (no CPU controller, or an old kernel)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    if "throttled_usec" in values:
        return values["throttled_usec"] * 1000
    if "throttled_time" in values:
        return values["throttled_time"]
    return None


def parse_idle(proc_stat: str, cpus: Iterable[int]) -> tuple[int, int]:
    """(idle + iowait ticks, total ticks) over the `cpuN` lines of /proc/stat whose N is in `cpus`
    (every column but guest, which user already holds). ValueError when one is missing."""
    wanted, seen = set(cpus), set()
    idle = total = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in wanted:
            continue
        fields = [int(f) for f in rest.split()[:8]]
        if len(fields) < 5:
            raise ValueError(f"/proc/stat: too few columns: {line!r}")
        idle += fields[3] + fields[4]
        total += sum(fields)
        seen.add(int(name[3:]))
    if wanted - seen:
        raise ValueError(f"/proc/stat has no line for CPU(s) {sorted(wanted - seen)}")
    return idle, total


@dataclasses.dataclass(frozen=True)
class Reading:
    """One sample of the kernel's counters (cumulative)."""

    time_ns: int
    tasks: Mapping[int, tuple[int, int]]  # tid -> (run ns, wait ns)
    throttled_ns: Mapping[str, int]  # cgroup folder -> throttled ns
    idle: Optional[tuple[int, int]]  # (idle ticks, total ticks) over our mask; None if unreadable
    num_cpus: int = 1  # CPUs in the mask


@dataclasses.dataclass(frozen=True)
class Contention:
    """What one window between two readings says."""

    lost_cpus: float  # wait_cpus + throttled_share * threads
    wait_cpus: float  # our compute threads' run-queue delay beyond our other threads' running
    delay_share: float  # of the compute threads' runnable time, the share spent waiting
    throttled_share: float  # of the wall time, the share our cgroup (or a parent) was throttled
    idle_cpus: Optional[float]  # idle CPUs in our mask
    compute_threads: int


def contention(before: Reading, after: Reading, engine_tid: int, threads: int,
               never_compute: frozenset[int] = frozenset()) -> Optional[Contention]:
    """Pure: the window between two readings, `threads` being the count computed with in it. The
    waiting is per second of the engine thread's busy time (on a CPU or waiting for one), not of
    wall time: a window in which the engine slept between requests is neither diluted nor stale.
    None when the engine thread was busy for less than MIN_BUSY_NS (nothing to judge).
    never_compute: threads of ours that are never compute threads however busy (the HTTP event
    loop: streaming 16 answers keeps it runnable over half the time, and its queueing behind our own
    OpenMP threads is our own use of the cores, not a core taken from us)."""
    deltas = {tid: (run - before.tasks.get(tid, (0, 0))[0], wait - before.tasks.get(tid, (0, 0))[1])
              for tid, (run, wait) in after.tasks.items()}
    engine = deltas.get(engine_tid, (0, 0))
    busy = engine[0] + engine[1]
    if busy < MIN_BUSY_NS:
        return None
    wall = max(busy, after.time_ns - before.time_ns)
    compute = {tid for tid, (run, wait) in deltas.items()
               if tid == engine_tid or (run + wait >= COMPUTE_SHARE * busy and tid not in never_compute)}
    waited = sum(deltas[t][1] for t in compute)
    ran = sum(deltas[t][0] for t in compute)
    others_ran = sum(run for tid, (run, _) in deltas.items() if tid not in compute)
    wait_cpus = max(0, waited - others_ran) / busy
    throttled = max([after.throttled_ns[k] - before.throttled_ns[k] for k in after.throttled_ns
                     if k in before.throttled_ns] or [0])
    throttled_share = min(1.0, max(0, throttled) / wall)
    idle_cpus = None
    if before.idle is not None and after.idle is not None and after.idle[1] > before.idle[1]:
        idle_cpus = (after.idle[0] - before.idle[0]) / (after.idle[1] - before.idle[1]) * after.num_cpus
    return Contention(lost_cpus=wait_cpus + throttled_share * threads, wait_cpus=wait_cpus,
                      delay_share=waited / (waited + ran) if waited + ran > 0 else 0.0,
                      throttled_share=throttled_share, idle_cpus=idle_cpus, compute_threads=len(compute))


# ------------------------------------------------------------------------------ the decision


class ThreadCountPolicy:
    """Pure decision: one window's lost CPUs (and idle CPUs) -> the thread count to compute with.
    See the module docstring for the rule."""

    def __init__(self, ceiling: int) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.threads = ceiling
        self.probing = False  # the current count is a probe, judged by the next window
        self.probes = 0
        self.backoff = BACKOFF_MIN
        self._changed_at: Optional[float] = None  # when the count last changed (None: never)
        self._kept_at: Optional[float] = None  # when a probe was last kept

    def update(self, lost: float, idle: Optional[float], now: float) -> int:
        """Feed one window (lost and idle CPUs, at time `now` in seconds); returns the count to use."""
        if self.probing:
            self.probing = False
            if lost >= UP_BELOW:  # the extra thread waited: the core is still taken
                self._set(self.threads - 1, now)
                self.backoff = min(BACKOFF_MAX, self.backoff * 2)
            else:
                self._kept_at = now
            return self.threads
        if lost >= DOWN_AT and self.threads > 1:
            drop = min(self.threads - 1, math.floor(lost - DOWN_AT) + 1)
            recently_kept = self._kept_at is not None and now - self._kept_at < HOLD_RESET
            self.backoff = min(BACKOFF_MAX, self.backoff * 2) if recently_kept else BACKOFF_MIN
            self._kept_at = None
            self._set(self.threads - drop, now)
            return self.threads
        if self._kept_at is not None and now - self._kept_at >= HOLD_RESET:
            self.backoff = BACKOFF_MIN
        waited_enough = self._changed_at is None or now - self._changed_at >= self.backoff
        if self.threads < self.ceiling and waited_enough and (idle is None or idle >= PROBE_IDLE):
            self._set(self.threads + 1, now)
            self.probing = True
            self.probes += 1
        return self.threads

    def _set(self, threads: int, now: float) -> None:
        self.threads = max(1, min(self.ceiling, threads))
        self._changed_at = now


# ------------------------------------------------------------------------------ the real files


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def cgroup_cpu_stat_files(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> list[str]:
    """cpu.stat along this process's cgroup path (deepest first), those that exist: a quota on
    any of them throttles us. cgroup v2 where root has cgroup.controllers, else v1's cpu controller."""
    v2_path, v1_path = _cgroup_paths(proc_self_cgroup)
    folders: list[Path] = []
    if v2_path is not None and (root / "cgroup.controllers").exists():
        folders = _ancestors(root, v2_path)
    elif v1_path is not None:
        for mount in (root / "cpu,cpuacct", root / "cpuacct,cpu", root / "cpu"):
            if mount.is_dir():
                folders = _ancestors(mount, v1_path)
                break
    return [str(f / "cpu.stat") for f in folders if (f / "cpu.stat").is_file()]


class CpuLoadFollower:
    """The controller wired to the real files and to torch: call `maybe_update()` between steps,
    on the engine thread (it returns at once unless `interval` has passed)."""

    def __init__(self, ceiling: int, cpus: Optional[Iterable[int]] = None, interval: float = DEFAULT_INTERVAL,
                 set_threads: Optional[Callable[[int], None]] = None, read: Callable[[str], str] = _read,
                 list_tasks: Optional[Callable[[], list[int]]] = None, cpu_stat_files: Optional[list[str]] = None,
                 clock: Callable[[], float] = time.monotonic, engine_tid: Optional[Callable[[], int]] = None) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(set(cpus))
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.policy = ThreadCountPolicy(ceiling)
        self.interval = interval
        self.last: Optional[Contention] = None  # the latest window, for /health
        self.changes = 0
        self._set_threads = set_threads
        self._read = read
        self._list_tasks = list_tasks or (lambda: [int(t) for t in os.listdir("/proc/self/task")])
        self._cpu_stat_files = cgroup_cpu_stat_files() if cpu_stat_files is None else cpu_stat_files
        self._clock = clock
        self._engine_tid = engine_tid or threading.get_native_id
        self._next = 0.0
        self._reading: Optional[Reading] = None
        self._failed = False

    @classmethod
    def for_current_threads(cls, **kwargs) -> "CpuLoadFollower":
        """A follower whose ceiling is torch's thread count now (what the server started with)."""
        import torch

        return cls(ceiling=torch.get_num_threads(), **kwargs)

    @property
    def threads(self) -> int:
        return self.policy.threads

    def _take_reading(self, now: float) -> Reading:
        tasks = {}
        for tid in self._list_tasks():
            try:
                tasks[tid] = parse_schedstat(self._read(f"/proc/self/task/{tid}/schedstat"))
            except (OSError, IndexError, ValueError):
                continue  # the thread ended meanwhile
        throttled = {}
        for path in self._cpu_stat_files:
            try:
                value = parse_cgroup_cpu_stat(self._read(path))
            except OSError:
                continue
            if value is not None:
                throttled[path] = value
        try:
            idle: Optional[tuple[int, int]] = parse_idle(self._read("/proc/stat"), self.cpus)
        except (OSError, ValueError):
            idle = None
        return Reading(time_ns=int(now * 1e9), tasks=tasks, throttled_ns=throttled, idle=idle,
                       num_cpus=len(self.cpus))

    def maybe_update(self) -> None:
        now = self._clock()
        if now < self._next or self._failed:
            return
        self._next = now + self.interval
        reading = self._take_reading(now)
        engine_tid = self._engine_tid()
        if engine_tid not in reading.tasks:
            self._failed = True  # not Linux, or no schedstat (CONFIG_SCHEDSTATS off): keep the count
            logger.warning("CPU load: cannot read this thread's /proc/self/task/%d/schedstat; the thread count "
                           "stays %d", engine_tid, self.threads)
            return
        before, self._reading = self._reading, reading
        # The main thread runs the HTTP event loop (uvicorn) unless it is the engine thread itself.
        loop = frozenset({os.getpid()} - {engine_tid})
        window = None if before is None else contention(before, reading, engine_tid, self.policy.threads, loop)
        if window is None:
            return
        self.last = window
        was = self.threads
        now_threads = self.policy.update(window.lost_cpus, window.idle_cpus, now)
        if now_threads != was:
            self._set_threads(now_threads)
            self.changes += 1
            why = "probe" if self.policy.probing else (
                f"run-queue wait {window.wait_cpus:.2f} CPUs, throttled {window.throttled_share:.0%}")
            logger.info("CPU threads: %d -> %d (%s)", was, now_threads, why)

    def close(self) -> None:
        """Back to the ceiling (the engine stops; the process's count is no longer ours to lower)."""
        if self.policy.threads != self.policy.ceiling:
            self._set_threads(self.policy.ceiling)
        self._failed = True

    def report(self) -> dict[str, object]:
        """What /health shows next to the thread count."""
        # torch.get_num_threads() is per thread once a thread has used it (each keeps its own OpenMP
        # count): only the engine thread's count, this one, is what the kernels compute with.
        last = self.last
        return {"threads": self.policy.threads, "follows_load": True, "threads_max": self.policy.ceiling,
                "runqueue_delay_share": None if last is None else round(last.delay_share, 3),
                "runqueue_wait_cpus": None if last is None else round(last.wait_cpus, 2),
                "throttled_share": None if last is None else round(last.throttled_share, 3),
                "idle_cpus": None if last is None or last.idle_cpus is None else round(last.idle_cpus, 2),
                "changes": self.changes, "probes": self.policy.probes}
