"""Follow the cores other processes leave us: the CPU thread count, adjusted while serving.

A decode step runs hundreds of OpenMP regions, each split over all our threads. When another
process takes one of our cores, the thread that shares it runs only in scheduler time slices of
several milliseconds, and every region waits for it (while its partner spin-waits, burning the
time the parked thread needs): on the 2-core Xeon a Python busy loop cut a stream to ~5% of its
idle throughput. Computing with one thread fewer than the cores left over avoids that wait.

How much CPU the others take, between two samples (every `interval` seconds, between steps):

    others = (busy time of the CPUs in our affinity mask, from /proc/stat)
             - (our own process's CPU time, /proc/self/stat utime + stime)

in CPUs (divided by the mask's total time per CPU over the interval). Busy is user + system +
irq + softirq + steal (a hypervisor's steal is a core taken from us too); the `nice` column
(user time of niced processes) counts by default only when we run niced ourselves: a process at a
higher nice value than ours gets a sliver of a shared core (weight 15 vs 1024 at nice 19), so it
costs us nothing. Our own user time sits in the nice column when we are niced, our system time
always in the system column: each is subtracted only from the column it is in. Our own threads'
spinning is ours, never counted as the others'.

The others take `lost` whole cores, with hysteresis: `lost` moves only when `others` leaves the band
[lost - 1 + UP_BELOW ... lost + DOWN_AT), i.e. a core is given up once the others use DOWN_AT
(0.4) of it and taken back once they use less than UP_BELOW (0.25); and a new count must be seen
on two samples in a row before it is applied, so one noisy sample does not flap. Threads =
max(1, min(ceiling, cpus in the mask - lost)), the ceiling being the count the server started with
(--cpu-threads pins the count: no controller then). torch.get_num_threads() stays the one count
every kernel reads; this module only sets it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Callable, Iterable, Optional

logger = logging.getLogger(__name__)

DOWN_AT = 0.4  # the others' use of one more core (in CPUs) that makes us give it up
UP_BELOW = 0.25  # ... and below which we take it back
CONFIRM_SAMPLES = 2  # a new thread count must be proposed this many samples in a row
# ... except giving a core up when the others clearly hold it: computing on a shared core stalls
# every OpenMP region of every step (a one-stream step ~20x slower), while a thread given up
# needlessly costs ~30% for a sample or two. bench/peers.py --systems quantserve --concurrency 1 16
# --busy-concurrency 1 16, three runs in one window (2-core Xeon): busy / idle at one stream 0.45x
# waiting for the second sample, 0.61x and 0.55x giving up at once (0.77x vs 0.82x, 0.82x at 16).
GIVE_UP_AT_ONCE = 0.75
DEFAULT_INTERVAL = 0.2  # seconds between samples
STALE_AFTER = 2.0  # seconds: a longer gap (the engine idled) restarts the window instead of deciding

# /proc/stat cpuN columns: user nice system idle iowait irq softirq steal guest guest_nice.
# guest and guest_nice are already included in user and nice.
_BUSY_COLUMNS = (0, 2, 5, 6, 7)  # user, system, irq, softirq, steal
_NICE_COLUMN = 1
_IDLE_COLUMNS = (3, 4)  # idle, iowait


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Cumulative clock ticks: the mask's CPUs' busy and total time, and our own process's
    user and system time."""

    busy: int
    total: int
    own_user: int
    own_system: int


def parse_proc_stat(text: str, cpus: Iterable[int], count_nice: bool) -> tuple[int, int]:
    """(busy ticks, total ticks) summed over the `cpuN` lines of /proc/stat whose N is in `cpus`.
    ValueError when one of them is missing or malformed."""
    wanted = set(cpus)
    busy = total = 0
    seen: set[int] = set()
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, _, rest = line.partition(" ")
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu not in wanted:
            continue
        fields = [int(f) for f in rest.split()[:8]]
        if len(fields) < 5:
            raise ValueError(f"/proc/stat: too few columns for {name}: {line!r}")
        fields += [0] * (8 - len(fields))  # old kernels lack irq/softirq/steal
        line_busy = sum(fields[i] for i in _BUSY_COLUMNS) + (fields[_NICE_COLUMN] if count_nice else 0)
        busy += line_busy
        total += line_busy + sum(fields[i] for i in _IDLE_COLUMNS) + (0 if count_nice else fields[_NICE_COLUMN])
        seen.add(cpu)
    missing = wanted - seen
    if missing:
        raise ValueError(f"/proc/stat has no line for CPU(s) {sorted(missing)}")
    return busy, total


def parse_self_stat(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from /proc/<pid>/stat: fields 14 and 15, counted after the
    command name, which is in parentheses and may itself hold spaces or parentheses."""
    after = text[text.rindex(")") + 2:].split()  # field 3 (state) onwards
    return int(after[11]), int(after[12])


class ThreadCountPolicy:
    """Pure decision: the others' use in CPUs per sample -> the thread count to compute with."""

    def __init__(self, num_cpus: int, ceiling: int) -> None:
        if num_cpus < 1 or ceiling < 1:
            raise ValueError(f"num_cpus and ceiling must be >= 1, got {num_cpus} and {ceiling}")
        self.num_cpus = num_cpus
        self.ceiling = ceiling
        self.lost = 0  # whole cores the others take, as last applied
        self._proposal: Optional[int] = None
        self._proposal_count = 0

    @property
    def threads(self) -> int:
        return max(1, min(self.ceiling, self.num_cpus - self.lost))

    def _wanted_lost(self, others: float) -> int:
        # Keep `lost` while lost - 1 + UP_BELOW <= others < lost + DOWN_AT; else the nearest value
        # that satisfies it.
        low = math.floor(others - DOWN_AT) + 1  # smallest lost with others < lost + DOWN_AT
        high = math.floor(others - UP_BELOW) + 1  # largest lost with lost - 1 + UP_BELOW <= others
        return max(0, min(self.num_cpus - 1, min(max(self.lost, low), high)))

    def update(self, others: float) -> int:
        """Feed one sample (the others' use in CPUs); returns the thread count to use now."""
        wanted = self._wanted_lost(others)
        if wanted == self.lost:
            self._proposal, self._proposal_count = None, 0
            return self.threads
        if wanted == self._proposal:
            self._proposal_count += 1
        else:
            self._proposal, self._proposal_count = wanted, 1
        at_once = wanted > self.lost and others >= wanted - 1 + GIVE_UP_AT_ONCE
        if at_once or self._proposal_count >= CONFIRM_SAMPLES:
            self.lost = wanted
            self._proposal, self._proposal_count = None, 0
        return self.threads


class CpuLoadSampler:
    """Turns successive readings of /proc/stat and /proc/self/stat into the others' use in CPUs."""

    def __init__(self, cpus: Iterable[int], count_nice: bool, we_are_niced: bool) -> None:
        self.cpus = sorted(set(cpus))
        if not self.cpus:
            raise ValueError("no CPUs to watch")
        self.count_nice = count_nice
        # Our user time is in the busy sum unless it sits in a nice column that is left out.
        self._own_user_counted = count_nice or not we_are_niced
        self._last: Optional[CpuSample] = None

    def reset(self) -> None:
        self._last = None

    def sample(self, proc_stat: str, self_stat: str) -> Optional[float]:
        """The others' use in CPUs since the previous sample; None for the first one (or when no
        tick elapsed)."""
        busy, total = parse_proc_stat(proc_stat, self.cpus, self.count_nice)
        user, system = parse_self_stat(self_stat)
        current = CpuSample(busy=busy, total=total, own_user=user, own_system=system)
        last, self._last = self._last, current
        if last is None or current.total <= last.total:
            return None
        per_cpu = (current.total - last.total) / len(self.cpus)  # ticks of wall time per CPU
        own = (current.own_system - last.own_system) + (
            current.own_user - last.own_user if self._own_user_counted else 0)
        others = (current.busy - last.busy) - own
        return max(0.0, others / per_cpu)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class CpuLoadFollower:
    """The controller wired to the real files and to torch: call `maybe_update()` between steps
    (it returns at once unless `interval` has passed). Runs on the engine thread only."""

    def __init__(self, ceiling: int, cpus: Optional[Iterable[int]] = None, interval: float = DEFAULT_INTERVAL,
                 count_nice: Optional[bool] = None, we_are_niced: Optional[bool] = None, set_threads: Optional[Callable[[int], None]] = None,
                 read: Callable[[str], str] = _read, clock: Callable[[], float] = time.monotonic) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(set(cpus))
        if we_are_niced is None:
            we_are_niced = os.nice(0) > 0
        if count_nice is None:
            count_nice = we_are_niced  # niced processes compete with a niced server as equals
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.policy = ThreadCountPolicy(len(cpus), ceiling)
        self.sampler = CpuLoadSampler(cpus, count_nice, we_are_niced)
        self.interval = interval
        self.others: Optional[float] = None  # the latest sample, for /health
        self.changes = 0
        self._set_threads = set_threads
        self._read = read
        self._clock = clock
        self._next = 0.0
        self._last_time: Optional[float] = None
        self._failed = False

    @classmethod
    def for_current_threads(cls, **kwargs) -> "CpuLoadFollower":
        """A follower whose ceiling is torch's thread count now (what the server started with)."""
        import torch

        return cls(ceiling=torch.get_num_threads(), **kwargs)

    @property
    def threads(self) -> int:
        return self.policy.threads

    def maybe_update(self) -> None:
        now = self._clock()
        if now < self._next or self._failed:
            return
        self._next = now + self.interval
        if self._last_time is not None and now - self._last_time > STALE_AFTER:
            self.sampler.reset()  # the engine slept: start a fresh window rather than average an old one
        self._last_time = now
        try:
            others = self.sampler.sample(self._read("/proc/stat"), self._read("/proc/self/stat"))
        except (OSError, ValueError, IndexError) as exc:
            self._failed = True  # not Linux, or an unexpected format: keep the thread count as it is
            logger.warning("CPU load: cannot read /proc (%s); the thread count stays %d", exc, self.threads)
            return
        if others is None:
            return
        self.others = others
        before = self.threads
        after = self.policy.update(others)
        if after != before:
            self._set_threads(after)
            self.changes += 1
            logger.info("CPU threads: %d -> %d (other processes use %.2f of our %d CPUs)", before, after, others,
                        self.policy.num_cpus)

    def close(self) -> None:
        """Back to the ceiling (the engine stops; the process's count is no longer ours to lower)."""
        if self.policy.threads != self.policy.ceiling:
            self._set_threads(self.policy.ceiling)
        self._failed = True

    def report(self) -> dict[str, object]:
        """What /health shows next to the thread count."""
        # torch.get_num_threads() is per thread once a thread has used it (each keeps its own OpenMP
        # count): only the engine thread's count, this one, is what the kernels compute with.
        return {"threads": self.policy.threads, "follows_load": True, "threads_max": self.policy.ceiling,
                "others_cpus": None if self.others is None else round(self.others, 2), "changes": self.changes}
