"""bench/gpu_check.sh's plumbing without a GPU: the --dry-run runs every part on a tiny CPU model and
writes the report; the report's arithmetic (targets, ceiling) is checked on made-up part results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "QUANTSERVE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["pytest"]["tests"] > 0 and data["pytest"]["failures"] == 0  # collected, skipped without a GPU
    assert data["kernels"]["skipped"] == "needs a GPU"
    e2e = data["e2e"]
    for key in ("engine_nf4", "engine_bf16", "hf_bnb"):
        assert "error" not in e2e[key], e2e[key]
        assert e2e[key]["batch1_decode_tok_s"] > 0
        assert e2e[key]["c2_generated_tok_s"] > 0 and e2e[key]["c4_generated_tok_s"] > 0
    assert e2e["engine_nf4"]["startup_cold"]["warmup"] > 0 and e2e["engine_nf4"]["attention"] == "native"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| quantserve engine, NF4 |" in md and "Startup by phase" in md
    assert set(data["part_seconds"]) == {"pytest", "kernels", "e2e"}


def test_report_marks_targets(tmp_path):
    gc = _gpu_check()
    (tmp_path / "kernels.json").write_text(json.dumps({"copy_gbs": 4000.0, "rows": [
        dict(layer="q", K=4096, N=4096, M=1, ours_us=10.0, pct_copy_bw=80.0, bnb_us=14.0, bnb_path="matmul_4bit",
             x_bnb=1.4, cublas_us=20.0, x_cublas=2.0),
        dict(layer="q", K=4096, N=4096, M=16, ours_us=10.0, pct_copy_bw=80.0, bnb_us=30.0, bnb_path="x",
             x_bnb=3.0, cublas_us=20.0, x_cublas=2.0)]}))
    (tmp_path / "e2e.json").write_text(json.dumps({
        "gpu": "NVIDIA H200", "levels": [16, 64], "prompt_len": 128, "new_tokens": 128, "hf_new_tokens": 64,
        "batch1_ceiling_tok_s": 800.0,
        "engine_nf4": {"batch1_decode_tok_s": 600.0, "c16_generated_tok_s": 5000.0, "c64_generated_tok_s": 9000.0},
        "engine_bf16": {"batch1_decode_tok_s": 200.0, "c64_generated_tok_s": 7000.0},
        "hf_bnb": {"label": "transformers + bitsandbytes NF4", "batch1_decode_tok_s": 100.0}}))
    data = gc.report(tmp_path)
    assert data["checks"]["batch-1 decode, % of the bandwidth ceiling"] == pytest.approx(75.0)
    assert data["checks"]["batch-1 decode, x transformers + bitsandbytes"] == pytest.approx(6.0)
    assert data["checks"]["64 concurrent, x our bf16 engine"] == pytest.approx(9000 / 7000)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "75.00 (ok, target >= 70.0)" in md and "1.29 (MISS, target >= 1.5)" in md
    assert "1.40 (ok, target >= 1.3)" in md and "2.00 (MISS, target >= 2.5)" in md  # M=1 vs bnb, M=16 vs cuBLAS
    assert "no pytest.xml" in md
