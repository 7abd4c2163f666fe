"""A `quantserve serve` process for tests and benchmarks, the one way they start a server:

    with ServerProcess("--max-model-len", "512", api_key="k") as server:   # ready: /health said 200
        server.client().chat.completions.create(...)
    # left: SIGTERM, then SIGKILL after `stop_timeout`; an exit status other than 0 is an error

It runs on a free port of 127.0.0.1, its stdout and stderr in one log file (unbuffered, so the
lines are in the order they were written and none is lost to a kill), and dies with the process
that started it (Linux). Any failure to become ready raises with the tail of that log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import httpx

SERVE = (sys.executable, "-m", "quantserve.server", "serve")


class ServerExited(RuntimeError):
    """The server process ended while it was expected to come up."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (another process may still take it before the server
    binds it; the server then exits 1 saying so)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the thread that started it exits (Linux's
    PR_SET_PDEATHSIG), so that no server outlives a killed test run or benchmark."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: sum over its label sets} (one model: one value each)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
    return out


def wait_healthy(url: str, timeout: float, exited: Callable[[], Optional[str]] = lambda: None,
                 ready: Optional[Callable[[], bool]] = None) -> Optional[httpx.Response]:
    """Poll `url`/health until it answers 200 (or `ready()` is true); return the first 503 seen
    meanwhile (the server says it is loading), None if there was none. `exited()` returns a reason
    when the server is gone: ServerExited then, TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    loading = None
    while True:
        reason = exited()
        if reason is not None:
            raise ServerExited(reason)
        if ready is not None:
            if ready():
                return loading
        else:
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200:
                    return loading
                if r.status_code == 503 and loading is None:
                    loading = r
            except httpx.HTTPError:
                pass  # the port is not open yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:g} s")
        time.sleep(0.1)


class ServerProcess:
    """A server process on a free port: `quantserve serve *args` unless `command` names another
    (a wrapper script that ends in `quantserve serve`, llama-server); `--port N` is appended unless
    `port_flag` is False (then `port` must be where the command listens, e.g. set through
    QUANTSERVE_PORT in `env`). `env`: variables set (None: removed) over this process's own.
    `api_key`: passed as --api-key and sent by headers() and client()."""

    def __init__(self, *args: str, command: Sequence[str] = SERVE, env: Optional[Mapping[str, Optional[str]]] = None,
                 api_key: Optional[str] = None, port: Optional[int] = None, port_flag: bool = True,
                 log_dir: Optional[Path] = None, name: str = "quantserve", startup_timeout: float = 600,
                 stop_timeout: float = 60) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.argv = [*command, *args]
        if api_key:
            self.argv += ["--api-key", api_key]
        if port_flag:
            self.argv += ["--port", str(self.port)]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        fd, path = tempfile.mkstemp(prefix=f"{name}-{self.port}-", suffix=".log", dir=log_dir)
        self.log = Path(path)
        try:
            self.proc = subprocess.Popen(self.argv, stdout=fd, stderr=subprocess.STDOUT, env=child_env,
                                         preexec_fn=die_with_parent)
        finally:
            os.close(fd)
        self.loading_response: Optional[httpx.Response] = None  # what /health said while loading

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------------ lifetime

    def wait_ready(self, timeout: Optional[float] = None, ready: Optional[Callable[[], bool]] = None) -> None:
        """Until /health answers 200 (or `ready()` is true). ServerExited or TimeoutError, each with
        the log's tail, when the process ends or the time runs out first."""
        timeout = self.startup_timeout if timeout is None else timeout
        try:
            self.loading_response = wait_healthy(self.url, timeout, self._exit_reason, ready)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self.argv}:\n{self.log_tail()}") from None

    def _exit_reason(self) -> Optional[str]:
        if self.proc.poll() is None:
            return None
        return f"the server exited with {self.proc.returncode} ({self.argv}):\n{self.log_tail()}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit status once the process ends; TimeoutError (with the log's tail) if it does not
        within `timeout` seconds. The process is left running then: stop() or kill() it."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the server did not exit within {timeout:g} s:\n{self.log_tail()}") from None

    def stop(self, timeout: Optional[float] = None) -> int:
        """SIGTERM (the server drains its requests and exits 0), SIGKILL if it has not exited after
        `timeout` seconds; the exit status (negative: the signal that ended it)."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        self.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        code = self.stop()
        if kind is None and code != 0:
            raise RuntimeError(f"the server exited with {code} on SIGTERM (expected 0):\n{self.log_tail()}")

    # ------------------------------------------------------------------ its output

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def last_log_line(self) -> str:
        """The last non-empty line: where `quantserve serve` writes its one-line reason for exiting 1."""
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    # ------------------------------------------------------------------ talking to it

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> Any:
        """The official openai client on this server (the openai package: a test extra)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def metric(self, name: str) -> float:
        """One sample of /metrics summed over its labels; KeyError when the server does not export it."""
        values = self.metrics()
        if name not in values:
            raise KeyError(f"{name} is not in /metrics")
        return values[name]


def run_serve(*args: str, timeout: float = 300, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """`quantserve serve *args` run to its end (a setting refused, a model that cannot fit):
    its exit status, stdout and stderr. For a server that is meant to come up, ServerProcess."""
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=None if env is None else {**os.environ, **env})
