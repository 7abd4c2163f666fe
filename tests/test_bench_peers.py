"""bench/peers.py and bench/shaped_model.py: the peer is built at its best (no -march=native, every
SIMD extension the CPU lists, AMX off, repacking never turned off), and the random-weight model of
a real model's shape is one that transformers itself loads with no weight missing or left over."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("peers", "shaped_model", "soak"):
        sys.modules.pop(name, None)
    import peers
    import shaped_model

    return peers, shaped_model


def test_the_fair_build_has_this_cpus_simd_and_no_amx(bench_modules, monkeypatch):
    peers, _ = bench_modules
    monkeypatch.setattr(peers, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f",
                                                      "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"})
    flags = peers.cmake_flags("fair")
    assert "-DGGML_NATIVE=OFF" in flags
    for on in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{on}=ON" in flags
    assert "-DGGML_AVX512_VBMI=OFF" in flags and "-DGGML_AVX_VNNI=OFF" in flags  # not in this CPU's list
    for amx in ("TILE", "INT8", "BF16"):
        assert f"-DGGML_AMX_{amx}=OFF" in flags  # listed by the CPU, still off
    assert "-DGGML_NATIVE=ON" in peers.cmake_flags("native")


@pytest.mark.parametrize("model, slots, concurrency", [("default", "-np 64 -c 32768 -t 2", [1, 4, 16, 64]),
                                                       ("1.7b", "-np 16 -c 8192 -t 2", [1, 4, 16])])
def test_llama_server_runs_with_repacking_on(bench_modules, model, slots, concurrency):
    peers, _ = bench_modules
    args = peers.parse_args(["--model", model])
    assert " ".join(args.llama_args) == slots and "--no-repack" not in args.llama_args
    assert args.concurrency == concurrency and not args.native
    assert peers.parse_args(["--llama-args", "-t 1"]).llama_args == ["-t", "1"]


def test_the_shaped_model_loads_in_transformers(bench_modules, monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, shaped_model = bench_modules
    monkeypatch.setitem(shaped_model.SHAPES, "tiny", {"hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, "head_dim": 16})
    monkeypatch.setattr(shaped_model, "cache_root", lambda: tmp_path)
    folder = shaped_model.shaped_model("tiny")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.shape == (64, 128) and 0.015 < float(weight.float().std()) < 0.025  # N(0, 0.02)
    assert bool((model.model.norm.weight == 1).all())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert shaped_model.shaped_model("tiny") == folder  # written once
