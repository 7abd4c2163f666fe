"""The CPU-load controller (server/engine/cpu_load.py) on synthetic kernel readings: schedstat,
cgroup cpu.stat and /proc/stat parsing, what a window between two readings says (run-queue wait of
our compute threads, throttling, idle CPUs), and the thread count the policy makes of it (give a
core up at once, take it back by probing, back off)."""

from __future__ import annotations

import pytest
from quantserve.server.engine.cpu_load import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    CpuLoadFollower,
    Reading,
    ThreadCountPolicy,
    contention,
    parse_cgroup_cpu_stat,
    parse_idle,
    parse_schedstat,
)

S = 1_000_000_000  # ns per second
ENGINE = 100  # the engine thread's tid in the synthetic readings


def test_parse_schedstat_and_cpu_stat():
    assert parse_schedstat("106628 2619637 2\n") == (106628, 2619637)
    v2 = "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 250000\n"
    assert parse_cgroup_cpu_stat(v2) == 250_000_000
    v1 = "nr_periods 10\nnr_throttled 4\nthrottled_time 123456789\nnr_bursts 0\nburst_time 0\n"
    assert parse_cgroup_cpu_stat(v1) == 123456789
    assert parse_cgroup_cpu_stat("usage_usec 5\n") is None


def test_parse_idle_sums_the_mask_only():
    text = ("cpu  10 10 10 10 0 0 0 0 0 0\n"
            "cpu0 1 2 3 100 4 5 6 7 0 0\n"
            "cpu1 10 20 30 1000 40 50 60 70 0 0\n"
            "cpu2 100 200 300 10000 400 500 600 700 0 0\n"
            "intr 1 2 3\n")
    # idle + iowait; total = every column up to steal (niced time is busy: it is not ours to use)
    assert parse_idle(text, [0, 2]) == (104 + 10400, 128 + 12800)
    with pytest.raises(ValueError, match=r"no line for CPU\(s\) \[3\]"):
        parse_idle(text, [0, 3])


def reading(t: float, tasks: dict[int, tuple[float, float]], throttled: float | None = None,
            idle: tuple[int, int] | None = None, num_cpus: int = 2) -> Reading:
    """tasks: tid -> (seconds run, seconds waited), cumulative; throttled in seconds."""
    return Reading(time_ns=int(t * S), tasks={tid: (int(r * S), int(w * S)) for tid, (r, w) in tasks.items()},
                   throttled_ns={} if throttled is None else {"/cg/cpu.stat": int(throttled * S)}, idle=idle,
                   num_cpus=num_cpus)


def test_two_threads_on_two_free_cores_lose_nothing():
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0), 7: (0, 0)}, idle=(0, 0))
    after = reading(1, {ENGINE: (0.99, 0.01), 101: (0.98, 0.02), 7: (0.0, 0.0)}, idle=(2, 200))
    window = contention(before, after, ENGINE, threads=2)
    assert window.lost_cpus == pytest.approx(0.03) and window.compute_threads == 2
    assert window.delay_share == pytest.approx(0.015) and window.idle_cpus == pytest.approx(0.02)


def test_a_neighbour_on_one_core_shows_as_our_threads_waiting():
    # Our two threads share the cores with a third runnable task: each runs 2/3 of the time.
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0)})
    after = reading(1, {ENGINE: (0.67, 0.33), 101: (0.66, 0.34)})
    window = contention(before, after, ENGINE, threads=2)
    assert window.wait_cpus == pytest.approx(0.67) and window.delay_share == pytest.approx(0.335)
    # Another session's group (autogroup) takes its full half: each of ours waits half the time.
    after = reading(1, {ENGINE: (0.5, 0.5), 101: (0.5, 0.5)})
    assert contention(before, after, ENGINE, threads=2).wait_cpus == pytest.approx(1.0)


def test_our_own_other_threads_running_is_not_a_core_taken():
    # The HTTP loop (tid 7) ran 0.3 s: a compute thread waited that long behind it; ours, not lost.
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0), 7: (0, 0)})
    after = reading(1, {ENGINE: (0.85, 0.15), 101: (0.85, 0.15), 7: (0.3, 0.05)})
    window = contention(before, after, ENGINE, threads=2)
    assert window.compute_threads == 2  # tid 7 was runnable 0.35 s of the engine's 1 s: not a compute thread
    assert window.wait_cpus == pytest.approx(0.0)


def test_a_busy_http_loop_is_never_a_compute_thread():
    # Streaming 16 answers, the HTTP loop (tid 7) ran 0.5 s and queued 0.3 s behind our two compute
    # threads, which each waited 0.25 s behind it: all our own use of the two cores.
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0), 7: (0, 0)})
    after = reading(1, {ENGINE: (0.75, 0.25), 101: (0.75, 0.25), 7: (0.5, 0.3)})
    judged_by_time = contention(before, after, ENGINE, threads=2)
    assert judged_by_time.compute_threads == 3 and judged_by_time.lost_cpus >= 0.4  # would give a core up
    window = contention(before, after, ENGINE, threads=2, never_compute=frozenset({7}))
    assert window.compute_threads == 2 and window.lost_cpus == pytest.approx(0.0)
    assert contention(before, after, ENGINE, threads=2, never_compute=frozenset({ENGINE})).compute_threads == 3


def test_a_thread_new_in_the_window_counts_from_zero_and_an_ended_one_is_dropped():
    before = reading(0, {ENGINE: (5, 1), 55: (3, 3)})  # 55 ends in the window
    after = reading(1, {ENGINE: (5.6, 1.4), 102: (0.5, 0.4)})  # 102 is an OpenMP worker started in it
    window = contention(before, after, ENGINE, threads=2)
    assert window.compute_threads == 2 and window.wait_cpus == pytest.approx(0.8)


def test_wait_is_per_second_the_engine_was_busy_not_per_wall_second():
    # 10 s window, the engine stepped for 1 s of it (it slept between requests): not diluted.
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0)})
    after = reading(10, {ENGINE: (0.5, 0.5), 101: (0.5, 0.5)})
    assert contention(before, after, ENGINE, threads=2).wait_cpus == pytest.approx(1.0)
    # ... and a window in which it hardly ran decides nothing.
    assert contention(before, reading(10, {ENGINE: (0.005, 0.001)}), ENGINE, threads=2) is None


def test_cgroup_throttling_counts_every_thread():
    before = reading(0, {ENGINE: (0, 0), 101: (0, 0)}, throttled=7.0)
    after = reading(1, {ENGINE: (0.5, 0.0), 101: (0.5, 0.0)}, throttled=7.5)  # a 1-CPU quota, two threads
    window = contention(before, after, ENGINE, threads=2)
    assert window.throttled_share == pytest.approx(0.5) and window.lost_cpus == pytest.approx(1.0)


def test_policy_gives_a_core_up_in_one_window():
    policy = ThreadCountPolicy(ceiling=2)
    assert policy.update(0.1, idle=0.0, now=0.2) == 2
    assert policy.update(0.39, idle=0.0, now=0.4) == 2
    assert policy.update(0.7, idle=0.0, now=0.6) == 1  # one window, no confirmation
    assert policy.update(5.0, idle=0.0, now=0.8) == 1  # never below one
    wide = ThreadCountPolicy(ceiling=8)
    assert wide.update(2.5, idle=0.0, now=0.2) == 5  # floor(2.5 - 0.4) + 1 = 3 threads given up


def test_policy_probes_only_when_our_cpus_have_room_and_keeps_a_good_probe():
    policy = ThreadCountPolicy(ceiling=2)
    policy.update(1.0, idle=0.0, now=1.0)
    assert policy.threads == 1
    for t in (1.2, 2.0, 5.0, 9.0):  # the neighbour holds the other core: no idle CPU, no probe
        assert policy.update(0.0, idle=0.1, now=t) == 1
    assert policy.probes == 0
    assert policy.update(0.0, idle=0.9, now=9.2) == 2 and policy.probing  # the core came back: try it
    assert policy.update(0.1, idle=0.0, now=9.4) == 2 and not policy.probing  # kept
    assert policy.update(0.2, idle=0.0, now=9.6) == 2


def test_policy_failed_probe_goes_back_at_once_and_backs_off():
    policy = ThreadCountPolicy(ceiling=2)
    policy.update(1.0, idle=0.0, now=0.0)
    now, gaps, last_probe = 0.0, [], 0.0
    for _ in range(80):  # idle CPU shows (e.g. a cgroup quota), yet every probe waits
        now += 0.2
        threads = policy.update(0.6 if policy.probing else 0.0, idle=1.0, now=now)
        if threads == 2:
            gaps.append(round(now - last_probe, 1))
            last_probe = now
        else:
            assert not policy.probing
    assert policy.threads == 1 or policy.probing
    assert gaps[0] == pytest.approx(BACKOFF_MIN, abs=0.2)
    assert gaps[1] > gaps[0] and max(gaps) <= BACKOFF_MAX + 0.4  # doubling, capped
    assert gaps[-1] == gaps[-2]


def test_policy_backoff_grows_when_a_kept_count_is_lost_again_soon_and_resets_after_holding():
    policy = ThreadCountPolicy(ceiling=2)
    policy.update(1.0, idle=0.0, now=0.0)  # down
    policy.update(0.0, idle=1.0, now=1.0)  # probe
    policy.update(0.0, idle=0.0, now=1.2)  # kept
    policy.update(1.0, idle=0.0, now=1.4)  # lost again at once: flapping neighbour
    assert policy.threads == 1 and policy.backoff == 2 * BACKOFF_MIN
    policy.update(0.0, idle=1.0, now=3.0)  # probe
    policy.update(0.0, idle=0.0, now=3.2)  # kept
    policy.update(0.0, idle=0.0, now=9.0)  # held for over 5 s
    policy.update(1.0, idle=0.0, now=9.2)
    assert policy.threads == 1 and policy.backoff == BACKOFF_MIN


def test_policy_comes_up_one_thread_per_probe_to_the_ceiling_only():
    policy = ThreadCountPolicy(ceiling=4)
    policy.update(3.0, idle=0.0, now=0.0)
    assert policy.threads == 1
    now = 0.0
    seen = []
    for _ in range(30):
        now += 0.2
        seen.append(policy.update(0.0, idle=3.0, now=now))
    assert max(seen) == 4 and sorted(set(seen)) == [1, 2, 3, 4]
    assert all(b - a in (0, 1) for a, b in zip(seen, seen[1:]))
    with pytest.raises(ValueError):
        ThreadCountPolicy(ceiling=0)


class FakeProc:
    """/proc/self/task/*/schedstat, /proc/stat and one cgroup cpu.stat, advanced by run()."""

    def __init__(self) -> None:
        self.tasks = {ENGINE: [0, 0], 101: [0, 0], 7: [0, 0]}
        self.idle = [0, 0]
        self.throttled = 0

    def run(self, seconds: float, wait_share: float, idle_cpus: float = 0.0, throttled: float = 0.0,
            threads: int = 2) -> None:
        for tid in [ENGINE, 101][:threads]:
            self.tasks[tid][0] += int(seconds * (1 - wait_share) * S)
            self.tasks[tid][1] += int(seconds * wait_share * S)
        self.tasks[7][0] += int(seconds * 0.01 * S)
        self.idle[0] += round(seconds * 100 * idle_cpus)
        self.idle[1] += round(seconds * 100 * 2)
        self.throttled += int(throttled * seconds * 1e6)

    def read(self, path: str) -> str:
        if path == "/proc/stat":
            return (f"cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 {self.idle[1] // 2 - self.idle[0] // 2} 0 0 {self.idle[0] // 2} 0 0 0 0 0 0\n"
                    f"cpu1 {self.idle[1] // 2 - (self.idle[0] - self.idle[0] // 2)} 0 0 {self.idle[0] - self.idle[0] // 2} 0 0 0 0 0 0\n")
        if path == "/cg/cpu.stat":
            return f"nr_periods 1\nnr_throttled 0\nthrottled_usec {self.throttled}\n"
        tid = int(path.split("/")[4])
        run, wait = self.tasks[tid]
        return f"{run} {wait} 3\n"


def make_follower(proc: FakeProc, now: list[float], set_to: list[int]) -> CpuLoadFollower:
    return CpuLoadFollower(ceiling=2, cpus=[0, 1], interval=0.2, set_threads=set_to.append, read=proc.read,
                           list_tasks=lambda: list(proc.tasks), cpu_stat_files=["/cg/cpu.stat"],
                           clock=lambda: now[0], engine_tid=lambda: ENGINE)


def test_follower_drops_in_one_window_and_comes_back_by_probe(caplog):
    proc, now, set_to = FakeProc(), [0.0], []
    follower = make_follower(proc, now, set_to)

    def tick(seconds: float, **run) -> None:
        proc.run(seconds, threads=follower.threads, **run)
        now[0] += seconds
        follower.maybe_update()

    follower.maybe_update()
    for _ in range(3):
        tick(0.2, wait_share=0.01)
    assert set_to == []
    with caplog.at_level("INFO", logger="quantserve.server.engine.cpu_load"):
        tick(0.6, wait_share=0.5)  # one slow step: our threads waited half of it
    assert set_to == [1] and "CPU threads: 2 -> 1" in caplog.text
    report = follower.report()
    assert report["runqueue_delay_share"] == pytest.approx(0.5, abs=0.01) and report["threads"] == 1
    for _ in range(10):
        tick(0.2, wait_share=0.0, idle_cpus=0.0)  # the neighbour keeps the other core: no probe
    assert set_to == [1]
    tick(0.2, wait_share=0.0, idle_cpus=1.0)  # it left
    assert set_to == [1, 2]
    tick(0.2, wait_share=0.02)
    assert set_to == [1, 2] and follower.report()["changes"] == 2 and follower.report()["probes"] == 1
    reads = []  # calls within the interval read nothing
    follower._read = lambda p: reads.append(p) or ""
    follower.maybe_update()
    assert reads == []


def test_follower_quota_throttling_drops_a_thread():
    proc, now, set_to = FakeProc(), [0.0], []
    follower = make_follower(proc, now, set_to)
    follower.maybe_update()
    proc.run(0.2, wait_share=0.0, throttled=0.5)
    now[0] += 0.2
    follower.maybe_update()
    assert set_to == [1] and follower.report()["throttled_share"] == pytest.approx(0.5)


def test_follower_without_schedstat_keeps_the_count(caplog):
    set_to: list[int] = []

    def fail(path: str) -> str:
        raise OSError("no /proc here")

    follower = CpuLoadFollower(ceiling=2, cpus=[0, 1], set_threads=set_to.append, read=fail, list_tasks=lambda: [ENGINE],
                               cpu_stat_files=[], clock=lambda: 1.0, engine_tid=lambda: ENGINE)
    follower.maybe_update()
    assert set_to == [] and follower.threads == 2 and "cannot read" in caplog.text
    assert follower.report()["runqueue_delay_share"] is None
