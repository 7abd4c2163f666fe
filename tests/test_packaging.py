"""The installed distribution: import names, console script, and our `kernels` package not being
mistaken for the PyPI `kernels` hub package that transformers and bitsandbytes probe for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter started outside the repo, so imports resolve through the installation.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_transformers_does_not_mistake_our_kernels_package(tmp_path):
    proc = _run(
        f"""
        import importlib.util, json, torch, transformers
        from transformers.utils import is_kernels_available
        import quantserve.kernels as kernels
        # The name `kernels` resolves to this project's package...
        assert kernels.__file__.startswith({str(REPO)!r}) or "site-packages" in kernels.__file__, kernels.__file__
        assert not hasattr(kernels, "get_kernel")
        # ...and transformers does not take it for the hub-kernels package.
        assert is_kernels_available() is False
        # Models load and run normally through transformers' own code paths.
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg)
        model.save_pretrained("tiny")
        again = transformers.AutoModelForCausalLM.from_pretrained("tiny")
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, again(ids).logits)
            out = again.generate(ids, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_bitsandbytes_still_imports_and_runs_next_to_our_kernels(tmp_path):
    proc = _run(
        """
        import torch, bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.bfloat16).to("cpu")
        with torch.no_grad():
            out = layer.eval()(torch.randn(1, 64, dtype=torch.bfloat16))
        assert out.shape == (1, 32) and torch.isfinite(out).all()
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_console_script_help():
    exe = shutil.which("quantserve", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail("the `quantserve` console script is not installed next to this interpreter")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "quantserve" in proc.stdout
    proc = subprocess.run([exe, "env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend default" in proc.stdout and "backend cpu" in proc.stdout
