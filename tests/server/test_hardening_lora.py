"""Runtime LoRA loading as an attacker would try it (issue 25), on a real server started with
--enable-lora-runtime-load --lora-root ROOT --max-loras 1: paths outside the root (absolute,
`..`, `~`, a symlink inside the root pointing out, a config symlinked to a secret) all get one
404 that names no path and echoes nothing; oversized files are refused before they are read; a
5000-character path or a NUL byte is a 400/404, never a 500; --max-cpu-loras (here --max-loras)
bounds the adapters held; /v1/models shows no server path. The server is healthy after each."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from .serving import start_server

SECRET = "s3cr3t-value-never-echoed"


@pytest.fixture(scope="module")
def root(tmp_path_factory, lora_adapters):
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(lora_adapters["attn"], root / "good")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(lora_adapters["mlp"], outside / "elsewhere")
    (outside / "secret.json").write_text('{"r": "%s", "peft_type": "%s"}' % (SECRET, SECRET))
    os.symlink(outside / "elsewhere", root / "link-out")  # a folder link leaving the root
    leak = root / "leak"
    leak.mkdir()
    os.symlink(outside / "secret.json", leak / "adapter_config.json")  # a config link leaving it
    shutil.copy(lora_adapters["attn"] / "adapter_model.safetensors", leak / "adapter_model.safetensors")
    big = root / "big-config"
    big.mkdir()
    (big / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "pad": "' + "x" * (2 << 20) + '"}')
    shutil.copy(lora_adapters["attn"] / "adapter_model.safetensors", big / "adapter_model.safetensors")
    fat = root / "big-weights"
    shutil.copytree(lora_adapters["attn"], fat)
    with open(fat / "adapter_model.safetensors", "ab") as f:  # sparse: no disk used
        f.truncate(8 << 30)
    bad_json = root / "not-utf8"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_bytes(b"\xff\xfe" + SECRET.encode())
    shutil.copy(lora_adapters["attn"] / "adapter_model.safetensors", bad_json / "adapter_model.safetensors")
    return root, outside


@pytest.fixture(scope="module")
def server(root):
    with start_server("--enable-lora-runtime-load", "--lora-root", str(root[0]), "--max-loras", "1") as srv:
        yield srv


def _load(server, name, path):
    return httpx.post(server.url + "/v1/load_lora_adapter", headers=server.headers(), timeout=120,
                      json={"lora_name": name, "lora_path": path})


def test_paths_outside_the_root_get_one_answer(server, root):
    folder, outside = root
    answers = []
    for path in (str(outside / "elsewhere"),  # exists, outside
                 str(outside / "missing"),  # does not exist, outside
                 str(folder / ".." / outside.name / "elsewhere"),  # .. out of the root
                 "~", "/etc", "/proc/self", "../../../../etc",
                 "link-out", str(folder / "link-out"),  # a symlink inside the root pointing out
                 "leak",  # its adapter_config.json is a symlink to a secret outside
                 "missing-inside", "good/adapter_config.json"):
        r = _load(server, "probe", path)
        assert r.status_code == 404, (path, r.text)
        assert SECRET not in r.text and str(outside) not in r.text and str(folder) not in r.text
        answers.append(r.json()["error"])
    assert all(a == answers[0] for a in answers), answers  # no "which folder exists" oracle
    assert httpx.get(server.url + "/health").status_code == 200


def test_long_and_odd_paths_are_400_not_500(server):
    for path, status in (("a" * 5000, 400), ("x/" * 2100, 400), ("a" * 300, 404), ("good\x00", 404),
                         ("good/\u202e", 404)):
        r = _load(server, "odd", path)
        assert r.status_code == status, (len(path), r.status_code, r.text)
    r = _load(server, "n" * 300, "good")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert httpx.get(server.url + "/health").status_code == 200


def test_files_over_their_caps_are_refused_unread(server):
    rss = server_rss(server)
    r = _load(server, "big", "big-config")
    assert r.status_code == 400 and "is over 1048576 bytes" in r.json()["error"]["message"], r.text
    r = _load(server, "fat", "big-weights")
    assert r.status_code == 400 and "larger than an adapter of rank" in r.json()["error"]["message"], r.text
    r = _load(server, "utf", "not-utf8")
    assert r.status_code == 400 and SECRET not in r.text and "not readable JSON" in r.text
    assert server_rss(server) - rss < 64 << 20  # neither file was read whole


def server_rss(server) -> int:
    with open(f"/proc/{server.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_capacity_and_listing(server, root):
    r = _load(server, "ok", "good")
    assert r.status_code == 200, r.text
    try:
        r = _load(server, "ok2", str(root[0] / "good"))  # absolute inside the root: allowed, but no room
        assert r.status_code == 400 and "--max-cpu-loras" in r.json()["error"]["message"], r.text
        models = httpx.get(server.url + "/v1/models", headers=server.headers()).json()["data"]
        card = next(m for m in models if m["id"] == "ok")
        assert card["root"] == "ok" and str(root[0]) not in str(models)
        chat = server.client().chat.completions.create(model="ok", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=3)
        assert chat.model == "ok"
    finally:
        assert httpx.post(server.url + "/v1/unload_lora_adapter", headers=server.headers(),
                          json={"lora_name": "ok"}).status_code == 200
    assert _load(server, "ok2", str(root[0] / "good")).status_code == 200  # room again


def test_runtime_loading_is_off_by_default():
    from quantserve.server.config import Settings

    assert Settings().enable_lora_runtime_load is False
    with pytest.raises(ValueError, match="needs --lora-root"):
        Settings(enable_lora_runtime_load=True)
