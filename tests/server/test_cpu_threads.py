"""The CPU thread count follows the cores the process may use: cgroup v2 / v1 quotas read from
crafted cgroup trees (a temporary folder stands in for /sys/fs/cgroup and /proc/self/cgroup), the
affinity mask of a real child process, and a real server started with --cpu-threads 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from quantserve.server.config import Settings
from quantserve.server.cpu_threads import CpuBudget, cgroup_quota, cpu_budget

from .serving import start_server


def _tree(tmp_path: Path, files: dict[str, str], proc_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_cgroup)
    return root, proc


V2 = {"cgroup.controllers": "cpuset cpu io memory pids\n"}


def test_v2_leaf_quota_rounds_up(tmp_path):
    root, proc = _tree(tmp_path, {**V2, "a/b/cpu.max": "150000 100000\n", "a/cpu.max": "max 100000\n"}, "0::/a/b\n")
    assert cgroup_quota(root, proc) == (1.5, str(root / "a/b/cpu.max"))
    assert cpu_budget(root, proc, affinity=4).threads == 2  # ceil(1.5)
    assert cpu_budget(root, proc, affinity=1).threads == 1  # the affinity mask binds first


def test_v2_a_parents_smaller_quota_binds(tmp_path):
    root, proc = _tree(tmp_path, {**V2, "a/cpu.max": "100000 100000\n", "a/b/cpu.max": "300000 100000\n"}, "0::/a/b\n")
    assert cgroup_quota(root, proc) == (1.0, str(root / "a/cpu.max"))
    assert cpu_budget(root, proc, affinity=8).threads == 1


def test_v2_unlimited(tmp_path):
    root, proc = _tree(tmp_path, {**V2, "a/cpu.max": "max 100000\n"}, "0::/a\n")
    assert cgroup_quota(root, proc) == (None, None)
    assert cpu_budget(root, proc, affinity=6).threads == 6


def test_v2_in_a_container_the_namespace_root_is_read(tmp_path):
    # Inside a container /proc/self/cgroup may name the host's path, which the container's
    # /sys/fs/cgroup does not have: its own root holds the limit (docker --cpus 2.5).
    root, proc = _tree(tmp_path, {**V2, "cpu.max": "250000 100000\n"}, "0::/kubepods/pod1/c1\n")
    assert cgroup_quota(root, proc) == (2.5, str(root / "cpu.max"))
    assert cpu_budget(root, proc, affinity=16).threads == 3


def test_v1_cfs_quota(tmp_path):
    root, proc = _tree(tmp_path, {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert cgroup_quota(root, proc) == (0.5, str(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us"))
    assert cpu_budget(root, proc, affinity=4).threads == 1  # never 0


def test_v1_unlimited_and_no_cgroup_at_all(tmp_path):
    root, proc = _tree(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu:/\n")
    assert cgroup_quota(root, proc) == (None, None)
    assert cgroup_quota(tmp_path / "nothing", tmp_path / "no_such_file") == (None, None)
    assert CpuBudget(affinity=3, quota=None, quota_source=None).threads == 3


def test_malformed_files_are_no_limit(tmp_path):
    root, proc = _tree(tmp_path, {**V2, "a/cpu.max": "garbage\n"}, "0::/a\n")
    assert cgroup_quota(root, proc) == (None, None)


def test_a_real_process_with_a_one_cpu_affinity_mask():
    # The child's mask is set before it starts; it must see one CPU and choose one thread.
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this platform")
    first = min(os.sched_getaffinity(0))
    code = ("import json; from quantserve.server.cpu_threads import cpu_budget; b = cpu_budget(); "
            "print(json.dumps([b.affinity, b.threads]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         preexec_fn=lambda: os.sched_setaffinity(0, {first}))
    assert json.loads(out.stdout) == [1, 1]


def test_the_flag_is_validated():
    assert Settings(cpu_threads=3).cpu_threads == 3
    assert Settings().cpu_threads is None
    with pytest.raises(ValidationError):
        Settings(cpu_threads=0)


def test_a_server_started_with_one_cpu_thread_reports_one(default_model_dir):
    with start_server("--cpu-threads", "1", api_key=None) as srv:
        cpu = httpx.get(srv.url + "/health", timeout=10).json()["cpu"]
        assert cpu["threads"] == 1
        assert cpu["affinity"] == len(os.sched_getaffinity(0))
        assert "CPU threads: 1 (--cpu-threads 1;" in srv.log_text()
        assert cpu["follows_load"] is False  # the flag pins the count: no controller


def test_a_server_at_its_default_follows_the_load(default_model_dir):
    """Without --cpu-threads the engine's controller (engine/cpu_load.py) runs, its ceiling the
    budget's count; /health shows the engine thread's count and the others' use once sampled."""
    budget = cpu_budget().threads
    with start_server(api_key=None) as srv:
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
        body["model"] = models[0]["id"]
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=120).status_code == 200
        cpu = httpx.get(srv.url + "/health", timeout=10).json()["cpu"]
        assert cpu["follows_load"] is True and cpu["threads_max"] == budget
        assert 1 <= cpu["threads"] <= budget
        assert cpu["runqueue_delay_share"] is None or 0 <= cpu["runqueue_delay_share"] <= 1
