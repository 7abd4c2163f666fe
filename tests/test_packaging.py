"""The distribution as users get it: the wheel built from this repository holds one import
namespace, `quantserve` (quant/ -> quantserve.quant, kernels/ -> quantserve.kernels, server/ ->
quantserve.server), and nothing top-level that could shadow another project's package, notably
Hugging Face's `kernels` (PyPI `kernels`), which transformers and bitsandbytes import.

The proof installs the wheel into a fresh virtualenv next to Hugging Face's `kernels` and
bitsandbytes and imports everything in fresh interpreters started outside the repository. To stay
fast and offline, the fresh venv sees the dev venv's site-packages (torch, transformers,
bitsandbytes, kernels) through a .pth file: such a path is appended after the venv's own
site-packages and the .pth files inside it are not processed, so the editable install of
quantserve there is invisible and `quantserve` can only come from the wheel.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from .wheel import build_wheel

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which Hugging Face's kernels (a test extra) requires there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS.get("package-dir", {})  # "quantserve.quant" -> "quant", ...
# What never belongs in a wheel: bytecode, and the libraries the kernels compile into ~/.cache.
_NOT_SOURCE = ("__pycache__", "*.pyc", "*.so")


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so"))


# ---------------------------------------------------------------------------------------------
# pyproject's package list against the folders (no build needed)


def test_package_dir_maps_the_three_top_level_folders_into_quantserve():
    assert PACKAGE_DIR == {"quantserve.quant": "quant", "quantserve.kernels": "kernels", "quantserve.server": "server"}
    assert PYPROJECT["project"]["scripts"] == {"quantserve": "quantserve.server.cli:main"}


def test_packages_list_matches_every_package_folder():
    """setuptools installs only the listed packages: a new subpackage missing from pyproject's
    `packages` would be left out of the wheel silently (the editable install would still work)."""
    found = set()
    for package, folder in PACKAGE_DIR.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert sorted(SETUPTOOLS["packages"]) == sorted(found)
    # A folder of modules without __init__.py is not a package at all: it would be missing too.
    for folder in PACKAGE_DIR.values():
        for d in [REPO / folder, *(p for p in _walk(REPO / folder) if p.is_dir())]:
            if any(d.glob("*.py")):
                assert (d / "__init__.py").exists(), f"{d.relative_to(REPO)} has modules but no __init__.py"


# ---------------------------------------------------------------------------------------------
# The wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree, built from a copy: a build writes build/ and *.egg-info into
    its source folder, and other people work in this checkout. tests/, bench/, scripts/ are copied
    too, so that the check that they stay out of the wheel means something."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", ".*_cache", *_NOT_SOURCE))
    return build_wheel(src, tmp / "dist")


def test_wheel_holds_exactly_the_mapped_folders_under_quantserve(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    payload = {n for n in names if n not in dist_info}
    # Only quantserve/...: no top-level kernels/, server/, quant/, tests/, bench/, scripts/.
    assert {n.split("/")[0] for n in payload} == {"quantserve"}, sorted({n.split("/")[0] for n in payload})
    # quantserve itself is a PEP 420 namespace: an __init__.py would claim the whole name.
    assert "quantserve/__init__.py" not in payload
    # Every source file of the three folders, the C++/CUDA sources included, and nothing else.
    expected = set()
    for package, folder in PACKAGE_DIR.items():
        for p in _walk(REPO / folder):
            if p.is_file():
                expected.add("/".join([*package.split("."), *p.relative_to(REPO / folder).parts]))
    assert payload == expected, {"missing": sorted(expected - payload), "extra": sorted(payload - expected)}
    for native in ("quantserve/kernels/cpu/quant4_cpu.cpp", "quantserve/kernels/cpu/paged_attention.cpp",
                   "quantserve/kernels/cuda/gemv_4bit.cu", "quantserve/kernels/cuda/gemv_4bit.cuh"):
        assert native in payload


def test_wheel_metadata_names_quantserve_and_its_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (info,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert top_level == ["quantserve"]
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == {"quantserve": "quantserve.server.cli:main"}


# ---------------------------------------------------------------------------------------------
# The wheel in a fresh venv, next to Hugging Face's kernels and bitsandbytes


@pytest.fixture(scope="module")
def hf_kernels() -> metadata.Distribution:
    try:
        return metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` (PyPI `kernels`, a test extra) is not installed in the dev venv")


@pytest.fixture(scope="module")
def fresh(wheel, hf_kernels, tmp_path_factory) -> dict:
    """A new venv with only the wheel installed, the dev venv's site-packages behind it."""
    tmp = tmp_path_factory.mktemp("fresh")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    base = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])  # this (dev) venv
    (site / "_dev_venv_site_packages.pth").write_text("".join(f"{p}\n" for p in base))
    # --ignore-installed: pip also sees the dev venv's quantserve (editable) and would keep it.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed",
         "--no-index", "--disable-pip-version-check", str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Native kernels compiled from the wheel's own C++ sources, not loaded from the user's cache;
    # no Hub traffic from anything that probes it (bitsandbytes' CPU backend, transformers).
    env.update(QUANTSERVE_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1")
    work = tmp / "work"
    work.mkdir()
    return {"venv": venv, "python": python, "site": site, "env": env, "cwd": work}


def _run_in(fresh: dict, code: str, *args: str) -> dict:
    """Run `code` in a fresh isolated (-I) interpreter of the fresh venv, outside the repository;
    it prints one JSON object last."""
    proc = subprocess.run([str(fresh["python"]), "-I", "-c", textwrap.dedent(code), *args], cwd=fresh["cwd"],
                          env=fresh["env"], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_venv_imports_ours_from_the_wheel_and_kernels_from_hugging_face(fresh, hf_kernels):
    out = _run_in(fresh, """
        import importlib.util, json, sys
        import kernels
        import quantserve, quantserve.quant, quantserve.kernels, quantserve.server.cli
        from quantserve.kernels.cpu import build
        from quantserve.kernels.cuda import build as cuda_build
        lib = build.load() if build.find_compiler() else None
        print(json.dumps({
            "namespace_file": getattr(quantserve, "__file__", None),
            "namespace_path": list(quantserve.__path__),
            "ours": [m.__file__ for m in (quantserve.quant, quantserve.kernels, quantserve.server.cli)],
            "kernels": kernels.__file__,
            "has_get_kernel": callable(getattr(kernels, "get_kernel", None)),
            "top_level": [getattr(importlib.util.find_spec(n), "origin", None) for n in ("quant", "server")],
            "compiler": bool(build.find_compiler()),
            "native": lib is not None,
            "native_source": str(build.SOURCE),
            "native_status": build.describe(),
            "cuda_sources": [str(p) for p in (*cuda_build.SOURCES, *cuda_build.HEADERS) if p.exists()],
            "cli_main": callable(quantserve.server.cli.main),
        }))
        """)
    site = str(fresh["site"])
    assert out["namespace_file"] is None and out["namespace_path"] == [os.path.join(site, "quantserve")]
    for f in out["ours"]:
        assert f.startswith(site + os.sep) and not f.startswith(str(REPO) + os.sep), f
    # `import kernels` is Hugging Face's package: the file its distribution installed.
    assert out["kernels"] == str(hf_kernels.locate_file("kernels/__init__.py")) and out["has_get_kernel"]
    for origin in out["top_level"]:  # `import quant` / `import server`: not ours, whatever else has them
        assert origin is None or not origin.startswith((site + os.sep, str(REPO) + os.sep)), origin
    assert out["cli_main"]
    # The C++ sources shipped in the wheel compile and load (into the test's own cache folder).
    assert out["native_source"].startswith(site + os.sep)
    if out["compiler"]:
        assert out["native"] and f"({fresh['env']['QUANTSERVE_CACHE']}{os.sep}" in out["native_status"]
    assert len(out["cuda_sources"]) == 2 and all(p.startswith(site + os.sep) for p in out["cuda_sources"])


def test_fresh_venv_bitsandbytes_reaches_hugging_face_kernels_and_agrees_with_our_round_trip(fresh, hf_kernels):
    out = _run_in(fresh, """
        import json
        import kernels
        # bitsandbytes' CPU backend does `from kernels import get_kernel` at import time (on CPUs
        # with AVX-512-BF16) and falls back to its own gemv when that fails: record that it reaches
        # Hugging Face's function, and fail it rather than fetch from the Hub.
        found = {"file": kernels.__file__, "had_get_kernel": callable(getattr(kernels, "get_kernel", None))}
        calls = []
        def probe(repo_id, *args, **kwargs):
            calls.append(repo_id)
            raise RuntimeError("no Hub in this test")
        kernels.get_kernel = probe

        import torch, bitsandbytes as bnb
        from bitsandbytes.functional import has_avx512bf16
        import quantserve.quant as quant

        torch.manual_seed(0)
        W, x = torch.randn(96, 128), torch.randn(1, 128)
        packed, state = quant.quantize_4bit(W, blocksize=64, quant_type="nf4")
        ref_packed, ref_state = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
        deq = quant.dequantize_4bit(packed, state)
        ref_deq = bnb.functional.dequantize_4bit(ref_packed, ref_state)

        layer = bnb.nn.Linear4bit(128, 96, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, blocksize=64, quant_type="nf4")
        layer = layer.to("cpu").eval()
        with torch.no_grad():
            bnb_out = layer(x)
        ours = quant.matmul_4bit(x, packed, state)
        exact = x @ deq.T
        scale = exact.abs().max().item()
        print(json.dumps({
            "kernels": found, "calls": calls, "avx512bf16": bool(has_avx512bf16()),
            "bytes_equal": torch.equal(packed.view(torch.uint8).flatten(), ref_packed.view(torch.uint8).flatten()),
            "absmax_equal": torch.equal(state.absmax, ref_state.absmax),
            "dequant_equal": torch.equal(deq, ref_deq),
            "round_trip_err": ((deq - W).abs().max() / W.abs().max()).item(),
            "bnb_layer_quantized": bool(layer.weight.bnb_quantized),
            "bnb_err": ((bnb_out - exact).abs().max() / scale).item(),
            "ours_err": ((ours - exact).abs().max() / scale).item(),
        }))
        """)
    assert out["kernels"] == {"file": str(hf_kernels.locate_file("kernels/__init__.py")), "had_get_kernel": True}
    assert out["calls"] == (["kernels-community/quantization-bitsandbytes"] if out["avx512bf16"] else [])
    assert out["bytes_equal"] and out["absmax_equal"] and out["dequant_equal"]
    assert 0 < out["round_trip_err"] < 0.25  # NF4: 16 levels per block's absmax
    assert out["bnb_layer_quantized"]
    assert out["bnb_err"] < 2e-2  # bitsandbytes' CPU gemv rounds activations to bf16
    assert out["ours_err"] < 1e-5


def test_fresh_venv_transformers_finds_hugging_face_kernels_and_runs_a_model(fresh, hf_kernels):
    out = _run_in(fresh, """
        import importlib.util, json, torch, transformers
        from transformers.utils import is_kernels_available
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg)
        model.save_pretrained("tiny")
        again = transformers.AutoModelForCausalLM.from_pretrained("tiny")
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            same = torch.equal(model(ids).logits, again(ids).logits)
            out = again.generate(ids, max_new_tokens=3, do_sample=False)
        print(json.dumps({
            "spec": importlib.util.find_spec("kernels").origin,
            # Any version: whether transformers finds the distribution behind `import kernels`.
            "found": is_kernels_available(MIN_VERSION="0", MAX_VERSION="100000"),
            "same": same, "shape": list(out.shape),
        }))
        """)
    assert out["spec"] == str(hf_kernels.locate_file("kernels/__init__.py"))
    assert out["found"] is True
    assert out["same"] and out["shape"] == [1, 6]


@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_console_script_runs(install, fresh):
    if install == "wheel":
        exe, env = fresh["venv"] / "bin" / "quantserve", fresh["env"]
    else:
        exe, env = Path(sys.executable).with_name("quantserve"), None
    assert exe.exists(), f"no `quantserve` console script next to {exe.parent / 'python'}"
    run = {"check": False, "capture_output": True, "text": True, "timeout": 300, "env": env, "cwd": fresh["cwd"]}
    proc = subprocess.run([exe, "--help"], **run)
    assert proc.returncode == 0 and "quantserve" in proc.stdout, proc.stderr
    proc = subprocess.run([exe, "env"], **run)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith("quantserve "))
    assert lines["quantserve"].strip() == PYPROJECT["project"]["version"]
    assert "backend default" in proc.stdout and "backend cpu" in proc.stdout
    if install == "wheel" and shutil.which("g++"):
        assert f"({fresh['env']['QUANTSERVE_CACHE']}" in proc.stdout  # built from the wheel's sources
