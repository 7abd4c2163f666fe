"""The CPU-load controller (server/engine/cpu_load.py) on crafted /proc text: what it counts as the
others' use, and the thread count it turns that into (hysteresis, debounce, affinity subset)."""

from __future__ import annotations

import pytest
from quantserve.server.engine.cpu_load import (
    CONFIRM_SAMPLES,
    CpuLoadFollower,
    CpuLoadSampler,
    ThreadCountPolicy,
    parse_proc_stat,
    parse_self_stat,
)

HZ = 100  # ticks per second, as in /proc/stat


class FakeMachine:
    """Cumulative /proc/stat and /proc/self/stat of a machine advanced by `run()` calls.
    Columns: user nice system idle iowait irq softirq steal guest guest_nice."""

    def __init__(self, num_cpus: int = 2, we_are_niced: bool = False) -> None:
        self.cpus = [[1000, 0, 500, 50000, 10, 0, 5, 0, 0, 0] for _ in range(num_cpus)]
        self.utime, self.stime = 700, 77  # our process's
        self.we_are_niced = we_are_niced  # then our user time lands in the nice column

    def run(self, seconds: float, busy: dict[int, float], ours: dict[int, float] | None = None,
            niced: dict[int, float] | None = None, steal: dict[int, float] | None = None) -> None:
        """Advance by `seconds`: per CPU, the others' busy fraction, ours, niced processes', steal."""
        ours, niced, steal = ours or {}, niced or {}, steal or {}
        ticks = round(seconds * HZ)
        for cpu, row in enumerate(self.cpus):
            other = round(busy.get(cpu, 0.0) * ticks)
            mine = round(ours.get(cpu, 0.0) * ticks)
            nice = round(niced.get(cpu, 0.0) * ticks)
            stolen = round(steal.get(cpu, 0.0) * ticks)
            # 3/4 user, 1/4 system time, for the others and for us
            row[0] += other - other // 4
            row[0 if not self.we_are_niced else 1] += mine - mine // 4
            row[2] += other // 4 + mine // 4
            row[1] += nice
            row[7] += stolen
            row[3] += ticks - other - mine - nice - stolen
            self.utime += mine - mine // 4
            self.stime += mine // 4

    def proc_stat(self) -> str:
        total = [sum(col) for col in zip(*self.cpus)]
        lines = ["cpu  " + " ".join(map(str, total))]
        lines += [f"cpu{i} " + " ".join(map(str, row)) for i, row in enumerate(self.cpus)]
        lines += ["intr 1234 0 0", "ctxt 99", "btime 1700000000", "processes 5", "procs_running 2"]
        return "\n".join(lines) + "\n"

    def self_stat(self) -> str:
        # The command name may hold spaces and parentheses: fields are counted after the last ')'.
        return (f"4242 (python (x) y) R 1 4242 4242 0 -1 4194304 100 0 0 0 {self.utime} {self.stime} 0 0 20 0 7 0 "
                "3325704 3133440 382 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


def test_parse_proc_stat_sums_the_mask_only():
    text = ("cpu  10 10 10 10 0 0 0 0 0 0\n"
            "cpu0 1 2 3 100 4 5 6 7 0 0\n"
            "cpu1 10 20 30 1000 40 50 60 70 0 0\n"
            "cpu2 100 200 300 10000 400 500 600 700 0 0\n")
    # busy = user + system + irq + softirq + steal; total = every column but guest (inside user)
    assert parse_proc_stat(text, [0, 2], count_nice=False) == ((1 + 3 + 5 + 6 + 7) + (100 + 300 + 500 + 600 + 700),
                                                                128 + 12800)
    busy_nice, total_nice = parse_proc_stat(text, [1], count_nice=True)
    assert busy_nice == 10 + 20 + 30 + 50 + 60 + 70 and total_nice == 10 + 20 + 30 + 1000 + 40 + 50 + 60 + 70


def test_parse_proc_stat_missing_cpu_is_an_error():
    with pytest.raises(ValueError, match=r"no line for CPU\(s\) \[3\]"):
        parse_proc_stat("cpu0 1 2 3 4 5 6 7 8 0 0\n", [0, 3], count_nice=False)


def test_parse_self_stat_name_with_spaces_and_parentheses():
    machine = FakeMachine()
    assert parse_self_stat(machine.self_stat()) == (machine.utime, machine.stime)
    assert parse_self_stat("15426 (cat) R 15418 15418 11320 0 -1 4194304 100 0 0 0 12 34 0 0 20 0 1 0") == (12, 34)


def sampled_others(machine: FakeMachine, sampler: CpuLoadSampler, **run) -> float:
    sampler.sample(machine.proc_stat(), machine.self_stat())
    machine.run(1.0, **run)
    others = sampler.sample(machine.proc_stat(), machine.self_stat())
    assert others is not None
    return others


def test_sampler_counts_others_not_our_own_use():
    machine = FakeMachine(2)
    sampler = CpuLoadSampler([0, 1], count_nice=False, we_are_niced=False)
    # We use both cores fully (spinning included): nothing is the others'.
    assert sampled_others(machine, sampler, busy={}, ours={0: 1.0, 1: 1.0}) == pytest.approx(0.0, abs=0.02)
    # A busy loop takes most of core 1 from us.
    assert sampled_others(machine, sampler, busy={1: 0.9}, ours={0: 1.0, 1: 0.1}) == pytest.approx(0.9, abs=0.02)
    # Steal is a core taken too.
    assert sampled_others(machine, sampler, busy={}, ours={0: 1.0}, steal={1: 0.5}) == pytest.approx(0.5, abs=0.02)


def test_sampler_niced_processes_count_only_when_we_are_niced():
    machine = FakeMachine(2)
    assert sampled_others(machine, CpuLoadSampler([0, 1], count_nice=False, we_are_niced=False), busy={},
                          niced={1: 1.0}, ours={0: 1.0}) == pytest.approx(0.0, abs=0.02)
    niced = FakeMachine(2, we_are_niced=True)
    assert sampled_others(niced, CpuLoadSampler([0, 1], count_nice=True, we_are_niced=True), busy={},
                          niced={1: 1.0}, ours={0: 1.0}) == pytest.approx(1.0, abs=0.02)
    # Niced ourselves but told to leave niced time out: our user time is in the nice column, and
    # only our system time is taken from the busy sum (an unniced busy loop is still seen).
    sampler = CpuLoadSampler([0, 1], count_nice=False, we_are_niced=True)
    assert sampled_others(niced, sampler, busy={}, niced={1: 1.0}, ours={0: 1.0}) == pytest.approx(0.0, abs=0.02)
    assert sampled_others(niced, sampler, busy={1: 0.8}, ours={0: 1.0, 1: 0.2}) == pytest.approx(0.8, abs=0.02)


def test_sampler_affinity_subset_ignores_other_cpus():
    machine = FakeMachine(4)
    sampler = CpuLoadSampler([0, 1], count_nice=False, we_are_niced=False)  # we may run on CPUs 0 and 1 only
    # CPUs 2 and 3 fully busy with others' work: none of it is on our cores.
    assert sampled_others(machine, sampler, busy={2: 1.0, 3: 1.0}, ours={0: 1.0, 1: 1.0}) == pytest.approx(0.0, abs=0.02)
    assert sampled_others(machine, sampler, busy={1: 1.0, 2: 1.0}, ours={0: 1.0}) == pytest.approx(1.0, abs=0.02)


def test_sampler_first_sample_is_none():
    machine = FakeMachine(2)
    sampler = CpuLoadSampler([0, 1], count_nice=False, we_are_niced=False)
    assert sampler.sample(machine.proc_stat(), machine.self_stat()) is None
    assert sampler.sample(machine.proc_stat(), machine.self_stat()) is None  # no tick elapsed


def feed(policy: ThreadCountPolicy, others: float, times: int = CONFIRM_SAMPLES) -> int:
    threads = policy.threads
    for _ in range(times):
        threads = policy.update(others)
    return threads


def test_policy_busy_core_means_fewer_threads_and_back_up_when_idle():
    policy = ThreadCountPolicy(num_cpus=2, ceiling=2)
    assert feed(policy, 0.05) == 2
    assert feed(policy, 0.6) == 1  # a busy loop sharing a core with one of our two threads
    assert feed(policy, 1.0) == 1  # ... and owning that core once we let it go
    assert feed(policy, 0.05) == 2  # the other load stopped


def test_policy_hysteresis_band():
    policy = ThreadCountPolicy(num_cpus=2, ceiling=2)
    assert feed(policy, 0.35, times=10) == 2  # below DOWN_AT: keep both
    assert feed(policy, 0.4) == 1
    assert feed(policy, 0.3, times=10) == 1  # above UP_BELOW: keep one
    assert feed(policy, 0.2) == 2


def test_policy_one_noisy_sample_does_not_flap():
    policy = ThreadCountPolicy(num_cpus=2, ceiling=2)
    for others in (0.0, 0.6, 0.0, 0.6, 0.0):  # alternating: never two in a row
        assert policy.update(others) == 2
    assert policy.update(0.6) == 2 and policy.update(0.6) == 1
    for others in (1.0, 0.0, 1.0, 0.0):  # taking a core back always waits for a second sample
        assert policy.update(others) == 1


def test_policy_gives_a_clearly_taken_core_up_at_once():
    policy = ThreadCountPolicy(num_cpus=2, ceiling=2)
    assert policy.update(0.7) == 2  # likely taken: confirm first
    assert policy.update(0.0) == 2
    assert policy.update(0.9) == 1  # the others hold most of a core: at once
    policy = ThreadCountPolicy(num_cpus=4, ceiling=4)
    assert policy.update(1.8) == 2  # two cores' worth, the second clearly: both at once


def test_policy_never_below_one_and_never_above_ceiling():
    policy = ThreadCountPolicy(num_cpus=2, ceiling=2)
    assert feed(policy, 5.0) == 1
    wide = ThreadCountPolicy(num_cpus=8, ceiling=2)  # e.g. a cgroup quota of 2 CPUs on 8 cores
    assert feed(wide, 1.0) == 2  # 7 cores left: still the 2 we may use
    assert feed(wide, 6.5) == 1
    assert feed(wide, 3.0) == 2
    with pytest.raises(ValueError):
        ThreadCountPolicy(num_cpus=0, ceiling=2)


def test_policy_several_cores_lost():
    policy = ThreadCountPolicy(num_cpus=8, ceiling=8)
    assert feed(policy, 2.5) == 5
    assert feed(policy, 2.3) == 5  # inside the band of 3 lost cores
    assert feed(policy, 1.3) == 6  # 2 lost: kept while 1.25 <= others < 2.4
    assert feed(policy, 1.1) == 7


def test_follower_sets_threads_and_logs(caplog):
    machine = FakeMachine(2)
    now = [0.0]
    set_to: list[int] = []
    follower = CpuLoadFollower(ceiling=2, cpus=[0, 1], interval=0.2, count_nice=False, we_are_niced=False,
                               set_threads=set_to.append,
                               read=lambda p: machine.proc_stat() if p == "/proc/stat" else machine.self_stat(),
                               clock=lambda: now[0])

    def tick(busy, ours, samples):
        for _ in range(samples):
            machine.run(0.2, busy=busy, ours=ours)
            now[0] += 0.2
            follower.maybe_update()

    tick({}, {0: 1.0, 1: 1.0}, 3)
    assert set_to == [] and follower.threads == 2
    with caplog.at_level("INFO", logger="quantserve.server.engine.cpu_load"):
        tick({1: 0.7}, {0: 1.0, 1: 0.3}, 3)
    assert set_to == [1] and "CPU threads: 2 -> 1" in caplog.text
    tick({1: 1.0}, {0: 1.0}, 5)
    assert set_to == [1]
    tick({}, {0: 1.0}, 3)
    assert set_to == [1, 2]
    report = follower.report()
    assert report["follows_load"] is True and report["threads_max"] == 2 and report["changes"] == 2
    # Calls within the interval read nothing.
    reads = []
    follower._read = lambda p: reads.append(p) or ""
    follower.maybe_update()
    assert reads == []


def test_follower_stale_window_restarts_instead_of_deciding():
    machine = FakeMachine(2)
    now = [0.0]
    set_to: list[int] = []
    follower = CpuLoadFollower(ceiling=2, cpus=[0, 1], count_nice=False, we_are_niced=False,
                               set_threads=set_to.append, read=lambda p: machine.proc_stat() if p == "/proc/stat" else machine.self_stat(),
                               clock=lambda: now[0])
    follower.maybe_update()
    machine.run(30.0, busy={1: 1.0})  # the engine slept 30 s while something else ran
    now[0] += 30.0
    follower.maybe_update()
    assert follower.others is None  # not averaged over the gap


def test_follower_unreadable_proc_keeps_the_count(caplog):
    set_to: list[int] = []

    def fail(path):
        raise OSError("no /proc here")

    follower = CpuLoadFollower(ceiling=2, cpus=[0, 1], count_nice=False, we_are_niced=False,
                               set_threads=set_to.append, read=fail, clock=lambda: 1.0)
    follower.maybe_update()
    assert set_to == [] and follower.threads == 2 and "cannot read /proc" in caplog.text
