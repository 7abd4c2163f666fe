"""server.loader on small random models of three architecture families (Llama, Qwen2, GPT-2),
checked against transformers + bitsandbytes quantizing or loading the same checkpoint (the oracle),
never against our own code run twice."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import subprocess
import sys

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant import Linear4bit
from quantserve.server.loading.export import save_quantized
from quantserve.server.loading.loader import LoadConfig, load_model
from quantserve.server.loading.weight_stream import plan_quantization

from .loader_helpers import (
    ARCHS,
    bnb_quantized_modules,
    bnb_reference,
    logits,
    save_tiny,
    tiny_model,
)

SETTINGS = {
    "nf4": quant.QuantConfig(),
    "fp4": quant.QuantConfig(bnb_4bit_quant_type="fp4"),
    "nf4-dq": quant.QuantConfig(bnb_4bit_use_double_quant=True),
    "fp4-dq-bf16storage": quant.QuantConfig(
        bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))


def _load(folder, **kwargs):
    return load_model(LoadConfig(str(folder), progress=False, **kwargs))


def _assert_same_bytes_as_bnb(ours, ref, double_quant: bool):
    ref_layers = bnb_quantized_modules(ref)
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(our_layers) == sorted(ref_layers)
    for name, layer in our_layers.items():
        theirs = ref_layers[name].weight
        assert torch.equal(layer.weight.data.view(torch.uint8), theirs.data.view(torch.uint8)), name
        if double_quant:
            # bitsandbytes' CPU library picks the 8-bit absmax codes through a coarse lookup table
            # (notes/bnb-4bit-format.md): a few codes differ by a step; the nested stats are identical.
            nested, their_nested = layer.quant_state.nested, theirs.quant_state.state2
            assert torch.equal(nested.absmax, their_nested.absmax), name
            assert nested.offset == pytest.approx(theirs.quant_state.offset.item(), rel=1e-6)
            differ = (layer.quant_state.absmax.int() - theirs.quant_state.absmax.int()).abs()
            assert differ.max() <= 2 and (differ > 0).float().mean() < 0.02, name
        else:
            assert torch.equal(layer.quant_state.absmax, theirs.quant_state.absmax), name


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_bitsandbytes(folders, ids, arch, setting):
    q = SETTINGS[setting]
    result = _load(folders[arch], quant=q)
    ref = bnb_reference(folders[arch], q)
    _assert_same_bytes_as_bnb(result.model, ref, q.bnb_4bit_use_double_quant)
    ours, theirs = logits(result.model, ids), logits(ref, ids)
    if q.bnb_4bit_use_double_quant:  # a few absmax codes a step apart (see above)
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    else:
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert ours.abs().max() > 0.1  # not a degenerate model
    report = result.report
    assert "lm_head" in report.skipped and len(report.quantized) == len(bnb_quantized_modules(ref))
    if arch == "gpt2":
        assert report.transposed == sorted(report.quantized)  # every GPT-2 Conv1D, stored transposed


def test_blocksize_and_skip_modules_match_bitsandbytes_functional(folders, ids):
    """transformers' BitsAndBytesConfig has no blocksize: build that reference by hand, quantizing
    the same float weights with bitsandbytes.functional and dequantizing into a float copy."""
    import bitsandbytes as bnb
    import transformers as tf

    from quantserve.server.engine.models.sixteen_bit import to_16bit

    q = quant.QuantConfig(blocksize=128, llm_int8_skip_modules=["lm_head", "mlp.down_proj"])
    result = _load(folders["llama"], quant=q)
    ref = tf.AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32).eval()
    to_16bit(ref)  # embeddings and head at 16 bits, as quantserve loads them
    assert all(".mlp.down_proj" in n or n == "lm_head" for n in result.report.skipped)
    assert len(result.report.skipped) == 3 and len(result.report.quantized) == 12
    for name in result.report.quantized:
        linear = ref.get_submodule(name)
        packed, state = bnb.functional.quantize_4bit(linear.weight.data, blocksize=128, quant_type="nf4")
        assert torch.equal(result.model.get_submodule(name).weight.data, packed), name
        linear.weight.data = bnb.functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(logits(result.model, ids), logits(ref, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_equals_transformers(folders, ids, arch):
    import transformers as tf

    from quantserve.server.engine.models.sixteen_bit import to_16bit

    result = _load(folders[arch], quant=None)
    ref = tf.AutoModelForCausalLM.from_pretrained(folders[arch], dtype=torch.float32).eval()
    to_16bit(ref)  # embeddings and head at 16 bits, as quantserve loads them
    assert torch.equal(logits(result.model, ids), logits(ref, ids))
    assert result.report.quantized == [] and result.report.quant is None
    assert result.report.weight_bytes == sum(p.numel() * p.element_size() for p in ref.parameters())
    if arch != "llama":  # tied embeddings stay one tensor
        assert result.model.lm_head.weight is result.model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("skip", [None, ("lm_head", "q_proj"), ("layers.1",)])
def test_plan_is_quant_quantize_model(arch, skip):
    """The streaming loader decides what to quantize exactly as quant.quantize_model does."""
    q = quant.QuantConfig(llm_int8_skip_modules=skip)
    model = tiny_model(arch)
    to_quantize, kept = plan_quantization(model, q)
    report = quant.quantize_model(model, q)
    assert sorted(to_quantize) == sorted(report.quantized)
    assert sorted(kept) == sorted(report.skipped)


PREQUANTIZED = {"llama": "nf4-dq", "qwen2": "fp4-dq-bf16storage", "gpt2": "nf4"}


@pytest.mark.parametrize("arch", ARCHS)
def test_prequantized_checkpoint_loads_as_stored(folders, ids, tmp_path, arch):
    """A Hub-style "bnb-4bit" checkpoint written by transformers + bitsandbytes: our Linear4bit
    holds the stored bytes (no requantization) and computes what transformers + bitsandbytes
    loading the same checkpoint computes."""
    from safetensors import safe_open

    q = SETTINGS[PREQUANTIZED[arch]]
    bnb_reference(folders[arch], q).save_pretrained(tmp_path / "bnb")
    result = _load(tmp_path / "bnb")
    report = result.report
    assert report.prequantized and report.quant.bnb_4bit_quant_type == q.bnb_4bit_quant_type
    assert report.quant.bnb_4bit_use_double_quant == q.bnb_4bit_use_double_quant
    with safe_open(tmp_path / "bnb" / "model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert report.quantized
    for name in report.quantized:
        layer = result.model.get_submodule(name)
        assert torch.equal(layer.weight.data.view(torch.uint8), stored[name + ".weight"].view(torch.uint8)), name
        assert layer.weight.data.dtype == q.bnb_4bit_quant_storage
    ref = bnb_reference(tmp_path / "bnb")
    torch.testing.assert_close(logits(result.model, ids), logits(ref, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,setting,shard", [("llama", "nf4-dq", False), ("gpt2", "fp4", True), ("qwen2", "nf4", False)])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(folders, ids, tmp_path, arch, setting, shard):
    q = SETTINGS[setting]
    result = _load(folders[arch], quant=q)
    out = save_quantized(result, tmp_path / "out", max_shard_bytes=100_000 if shard else 4 * 2**30)
    assert (out / "model.safetensors.index.json").is_file() == shard
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_compute_dtype"] == "float32"
    ours = logits(result.model, ids)
    theirs = bnb_reference(out)  # transformers + bitsandbytes, prequantized path
    assert sorted(bnb_quantized_modules(theirs)) == sorted(result.report.quantized)
    torch.testing.assert_close(logits(theirs, ids), ours, atol=2e-5, rtol=1e-5)
    again = _load(out)
    assert again.report.prequantized and torch.equal(logits(again.model, ids), ours)
    assert again.report.weight_bytes == result.report.weight_bytes


def test_sharded_bin_and_prefixless_checkpoints(folders, ids, tmp_path):
    """The same weights as sharded safetensors, a PyTorch .bin, and GPT-2's Hub layout (keys
    without the `transformer.` prefix) load to the same model."""
    expected = logits(_load(folders["llama"]).model, ids)
    tiny_model("llama").save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert torch.equal(logits(_load(tmp_path / "sharded").model, ids), expected)

    shutil.copytree(folders["llama"], tmp_path / "bin")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "bin" / "model.safetensors")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    result = _load(tmp_path / "bin")
    assert result.report.checkpoint_format == "pytorch .bin"
    assert torch.equal(logits(result.model, ids), expected)

    shutil.copytree(folders["gpt2"], tmp_path / "gpt2")
    from safetensors.torch import save_file

    state = load_file(tmp_path / "gpt2" / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "gpt2" / "model.safetensors")
    torch.testing.assert_close(
        logits(_load(tmp_path / "gpt2").model, ids), logits(_load(folders["gpt2"]).model, ids), atol=0, rtol=0
    )


def test_streaming_peak_memory_is_near_the_quantized_size(tmp_path):
    """~84M parameters (336 MB in fp32): the load's peak RSS stays near the final footprint plus
    the largest tensor, far below the float model."""
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8,
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in tf.LlamaForCausalLM(config).named_parameters()}
    from safetensors.torch import save_file

    config.save_pretrained(tmp_path)
    save_file({n: torch.randn(s) * 0.02 for n, s in shapes.items()}, tmp_path / "model.safetensors")
    float_bytes = sum(s.numel() * 4 for s in shapes.values())
    largest = max(s.numel() * 4 for s in shapes.values())
    gc.collect()
    report = _load(tmp_path).report
    above_start = report.peak_rss - report.rss_before
    assert report.weight_bytes < 0.35 * float_bytes
    print(f"peak above start {above_start / 2**20:.0f} MiB, final {report.weight_bytes / 2**20:.0f} MiB, largest {largest / 2**20:.0f} MiB")
    assert above_start < report.weight_bytes + 2 * largest + 48 * 2**20, (above_start, report.weight_bytes)
    assert above_start < 0.6 * float_bytes


def test_cli_quantize_and_inspect(folders, tmp_path, capsys):
    from quantserve.server.cli import main

    assert main(["quantize", str(folders["qwen2"]), str(tmp_path / "q"), "--double-quant", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
    assert main(["inspect", str(tmp_path / "q"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prequantized" in out and "model.layers.0.self_attn.q_proj" in out and "theory 4.127" in out
    assert main(["inspect", str(folders["gpt2"]), "--quant", "fp4", "--totals-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4.500 bits/param (theory 4.500" in out and "transformer.h.0" not in out
    # An existing output folder is refused, with one line on stderr.
    assert main(["quantize", str(folders["qwen2"]), str(tmp_path / "q"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err


def test_cli_help_explains_itself():
    for command, words in (("quantize", ["OUT_DIR", "bitsandbytes", "--double-quant", "--skip-modules"]),
                           ("inspect", ["per layer", "4.5", "--totals-only", "--quant"])):
        proc = subprocess.run([sys.executable, "-m", "quantserve.server", command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        for word in words:
            assert word in text, (command, word)


def test_cli_model_is_optional_before_out_dir():
    from quantserve.server.cli import build_parser

    args = build_parser().parse_args(["quantize", "out"])
    assert args.model is None and args.out_dir == "out"
    args = build_parser().parse_args(["quantize", "org/name", "out", "--quant", "fp4"])
    assert args.model == "org/name" and args.out_dir == "out"


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the problem, and nothing half-loaded left in memory


def _live_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(issubclass(type(o), PreTrainedModel) for o in gc.get_objects())


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        _load(tmp_path / "nope")
    assert "nope" in _one_line(e) and "does not exist" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        _load(tmp_path / "empty")
    assert "no config.json" in _one_line(e)


def test_not_a_causal_lm(tmp_path):
    import transformers as tf

    tf.ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        _load(tmp_path)
    assert "'vit'" in _one_line(e) and "not a causal language model" in _one_line(e)


def test_corrupt_safetensors(folders, tmp_path):
    shutil.copytree(folders["llama"], tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "m")
    assert str(path) in _one_line(e) and "truncated" in _one_line(e)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "m")
    assert "corrupt safetensors file" in _one_line(e) and "JSON" in _one_line(e)


def test_failure_mid_stream_leaves_nothing_loaded(tmp_path):
    """The second shard holds a tensor of the wrong shape: the load fails after the first shard's
    layers were quantized, and no model (nor its tensors) survives the exception."""
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="200KB")
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    state = load_file(last)
    name = next(iter(state))
    state[name] = torch.zeros(3, 5)
    save_file(state, last)
    before = _live_models()
    with pytest.raises(ValueError) as e:
        _load(tmp_path)
    assert name in _one_line(e) and "shape" in _one_line(e)
    assert _live_models() == before


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quant="nf4"), "quant must be a quant.QuantConfig"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(device="tpu"), "device must be"),
        (dict(device="cuda:0"), "no CUDA GPU"),
    ],
)
def test_bad_load_settings(folders, kwargs, match):
    if "cuda" in str(kwargs.get("device")) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match):
        LoadConfig(str(folders["llama"]), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocksize=48), "blocksize must be a power of two"),
        (dict(bnb_4bit_quant_type="int3"), "bnb_4bit_quant_type must be one of"),
        (dict(load_in_8bit=True, load_in_4bit=True), "exactly one of load_in_4bit and load_in_8bit"),
        (dict(bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage must be one of"),
    ],
)
def test_unsupported_quant_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.QuantConfig(**kwargs)


def test_cli_reports_bad_settings_in_one_line(folders, capsys):
    from quantserve.server.cli import main

    assert main(["inspect", str(folders["llama"]), "--blocksize", "48", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "blocksize must be a power of two" in err


def test_prequantized_checkpoint_settings_are_not_overridden(folders, tmp_path):
    bnb_reference(folders["llama"], SETTINGS["nf4"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot be loaded unquantized"):
        _load(tmp_path, quant=None)
    with pytest.raises(ValueError, match="already quantized"):
        _load(tmp_path, quant=quant.QuantConfig(bnb_4bit_quant_type="fp4"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        _load(tmp_path)


def test_hub_id_not_cached_while_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        _load("some-org/some-model")
    text = _one_line(e)
    assert "some-org/some-model" in text and "offline" in text and "not in the cache" in text


def test_hub_id_from_cache_via_hf_home(folders, tmp_path):
    """A model in huggingface_hub's cache layout under $HF_HOME loads by its Hub id, offline,
    through the `quantserve inspect` command."""
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-qwen2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folders["qwen2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "quantserve.server", "inspect", "tiny-org/tiny-qwen2", "--totals-only", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "quantized  14 layers" in proc.stdout and commit in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_matches_bitsandbytes(folders, ids):
    q = dataclasses.replace(SETTINGS["nf4"], bnb_4bit_compute_dtype=torch.float32)
    result = _load(folders["llama"], quant=q, device="cuda", dtype=torch.float32)
    assert result.report.device_peak_bytes is not None
    ref = bnb_reference(folders["llama"], q).to("cuda")
    torch.testing.assert_close(
        logits(result.model, ids.cuda()), logits(ref, ids.cuda()), atol=1e-3, rtol=1e-3
    )
