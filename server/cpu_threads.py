"""How many CPU threads to compute with: the cores this process may actually use.

torch picks its intra-op thread count from the machine's cores, and every native kernel
(kernels/cpu) takes torch's count. In a container that is often wrong: a cgroup CPU quota
(docker --cpus 2, a Kubernetes CPU limit) or an affinity mask (taskset, docker --cpuset-cpus)
gives the process fewer cores than the machine has, and OpenMP regions split statically over more
threads than there are cores wait, in every one of the hundreds of regions of a decode step, for a
thread that the scheduler has parked. So the default follows the budget:

    threads = min(len(os.sched_getaffinity(0)), ceil(cgroup quota / period)), at least 1

with the quota read from cgroup v2's cpu.max or cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us,
the smallest along the process's cgroup path (a parent's limit binds its children). The quota is
rounded up, as Go's runtime and the JVM do: 1.5 CPUs of quota get 2 threads. `--cpu-threads N`
overrides it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    """The cores this process may use, and where each limit comes from."""

    affinity: int  # CPUs in the affinity mask (os.sched_getaffinity), or os.cpu_count() where there is none
    quota: Optional[float]  # CPUs' worth of cgroup quota (quota / period); None when unlimited or unreadable
    quota_source: Optional[str]  # the file the binding quota was read from

    @property
    def threads(self) -> int:
        """Threads to compute with: the affinity count, capped by the quota rounded up; at least 1."""
        count = self.affinity if self.quota is None else min(self.affinity, math.ceil(self.quota - 1e-9))
        return max(1, count)

    def describe(self) -> str:
        quota = "no quota" if self.quota is None else f"quota {self.quota:g} CPUs ({self.quota_source})"
        return f"{self.affinity} CPUs in the affinity mask, {quota}"


def affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cgroup_paths(proc_self_cgroup: Path) -> tuple[Optional[str], Optional[str]]:
    """(the v2 path, the v1 cpu controller's path) from /proc/self/cgroup, each None when absent."""
    v2 = v1 = None
    try:
        text = proc_self_cgroup.read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.split(":", 2)  # hierarchy-ID:controller-list:path
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each of its parents up to base itself (deepest first). In a container the
    path in /proc/self/cgroup is often that of the host's hierarchy while base is the container's
    own root: folders that do not exist are skipped, and base itself is always looked at."""
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_v2(folder: Path) -> Optional[float]:
    """CPUs' worth of cpu.max ("max 100000" or "200000 100000"); None when unlimited or unreadable."""
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) < 1 or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_v1(folder: Path) -> Optional[float]:
    """CPUs' worth of cpu.cfs_quota_us / cpu.cfs_period_us; None when unlimited (-1) or unreadable."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().split()[0])
        period = int((folder / "cpu.cfs_period_us").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> tuple[Optional[float], Optional[str]]:
    """(the smallest CPU quota along this process's cgroup path in CPUs, the file it came from);
    (None, None) when there is none. cgroup v2 when /proc/self/cgroup has a v2 entry and root has
    cgroup.controllers; else cgroup v1's cpu controller (mounted at root/cpu,cpuacct or root/cpu)."""
    v2_path, v1_path = _cgroup_paths(proc_self_cgroup)
    found: list[tuple[float, str]] = []
    if v2_path is not None and (root / "cgroup.controllers").exists():
        for folder in _ancestors(root, v2_path):
            quota = _read_v2(folder)
            if quota is not None:
                found.append((quota, str(folder / "cpu.max")))
    elif v1_path is not None:
        for mount in (root / "cpu,cpuacct", root / "cpuacct,cpu", root / "cpu"):
            if mount.is_dir():
                for folder in _ancestors(mount, v1_path):
                    quota = _read_v1(folder)
                    if quota is not None:
                        found.append((quota, str(folder / "cpu.cfs_quota_us")))
                break
    if not found:
        return None, None
    return min(found)


def cpu_budget(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP,
               affinity: Optional[int] = None) -> CpuBudget:
    """The cores this process may use now (root and proc_self_cgroup stand in for the real files in tests)."""
    quota, source = cgroup_quota(root, proc_self_cgroup)
    return CpuBudget(affinity=affinity_count() if affinity is None else affinity, quota=quota, quota_source=source)


def apply_cpu_threads(requested: Optional[int]) -> tuple[int, str]:
    """Set torch's intra-op thread count (which the native kernels also take) to `requested`, or to
    the budget's when None; returns (threads, why) for the startup log."""
    import torch

    budget = cpu_budget()
    threads = requested if requested is not None else budget.threads
    why = f"--cpu-threads {requested}" if requested is not None else "the cores this process may use"
    torch.set_num_threads(threads)
    return threads, f"{why}; {budget.describe()}"


def cpu_report() -> dict[str, object]:
    """What /health shows: the threads torch (and so every native kernel) computes with now, and
    the budget they were sized from."""
    import torch

    budget = cpu_budget()
    return {"threads": torch.get_num_threads(), "cpus_available": budget.threads, "affinity": budget.affinity,
            "quota": budget.quota}
