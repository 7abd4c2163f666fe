"""The fused decoder step (server/engine/models/fused_step.py over kernels/cpu/decode.cpp, forward
path "fused") against the layer-by-layer forward ("layers") and against transformers.

The families tests (test_families.py, test_engine_exact.py) already hold the engine, which now runs
the fused step wherever it covers the model, to transformers' logits and greedy output; here:
- which families it covers (auto chooses it there, and it ran), and what it refuses;
- the fused step is as close to transformers' float32 forward as the layers forward on the same
  weights (same matmul and attention kernels: only the norms, rope and SiLU differ in rounding), for
  decodes, fresh prompts and chunked or prefix-continuing prefills under a scheduler that preempts,
  on every covered family shape;
- LoRA adapter rows, against the Python forward with the same adapters;
- the default model against transformers' own float32 forward.
"""

from __future__ import annotations

import pytest
import torch

from quantserve.server.engine.attention import NativeBackend
from quantserve.server.engine.models import fused_step

from . import family_models as fm
from .test_families import engine_logits

COVERED = ["llama3", "qwen3", "mistral", "smollm2", "smollm3", "phi3", "phi4", "ministral"]
NOT_COVERED = {"gemma2": "pre-norm", "gpt_neox": "norm", "olmo2": "pre-norm", "gemma": "SiLU"}


@pytest.fixture(autouse=True)
def highest():
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")


def teacher_forced(model, fused: bool, tokens, prompt_lens, num_blocks=12, budget=64):
    """{(seq, position): logits} on the fused or the layers forward path, the scheduler's
    preemptions, and the runner."""
    runners: list = []
    got, preemptions, _ = engine_logits(model, tokens, prompt_lens, num_blocks, budget,
                                        forward="fused" if fused else "layers", runners=runners)
    return got, preemptions, runners[0]


def relative_errors(got, want):
    """Per position, max |got - want| over the logits' scale (at least 1), sorted."""
    return sorted((got[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1.0) for k in got)


def transformers_logits(model, tokens):
    """{(seq, position): logits} of transformers' own float32 forward over each whole sequence."""
    with torch.inference_mode():
        full = [model(torch.tensor([toks])).logits[0].float() for toks in tokens]
    return {(i, p): full[i][p] for i, toks in enumerate(tokens) for p in range(len(toks))}


def _tokens(count=6, extra=6, seed=3):
    prompts = fm.prompts(count=count)
    g = torch.Generator().manual_seed(seed)
    tokens = [p + torch.randint(3, fm.VOCAB, (extra,), generator=g).tolist() for p in prompts]
    return tokens, [len(p) for p in prompts]


# Reordering noise of float32 arithmetic: its unit roundoff (2^-24) times ~2000 roundings along the
# deepest chain of a step (layers x the matmuls' reduction lengths). Two correct orders of the same
# float32 sums may differ by this much; a wrong rope dim, norm or cache slot moves every position by
# 1e-2 of the logits' scale or more.
REORDERING = 2**-24 * 2000


def assert_as_close_as_layers(model, tokens, lens, slack):
    """The fused path is no further from transformers' float32 forward (the oracle) than the layers
    path: worst and median position within `slack` x the layers path's error, plus REORDERING."""
    fused, _, runner = teacher_forced(model, True, tokens, lens)
    layers, _, other = teacher_forced(model, False, tokens, lens)
    assert runner.forward.path == "fused" and other.forward.path == "layers" and other.model.fused_step is None
    want = transformers_logits(model, tokens)
    ours, theirs = relative_errors(fused, want), relative_errors(layers, {k: want[k] for k in layers})
    mid = len(ours) // 2
    assert ours[-1] <= slack * theirs[-1] + REORDERING, f"worst {ours[-1]:.2e} vs the layers path's {theirs[-1]:.2e}"
    assert ours[mid] <= slack * theirs[mid] + REORDERING, f"median {ours[mid]:.2e} vs the layers path's {theirs[mid]:.2e}"
    return runner.model.fused_step


@pytest.mark.parametrize("family", COVERED)
def test_fused_step_as_close_to_transformers_as_layers(family):
    tokens, lens = _tokens()
    assert_as_close_as_layers(fm.family_model(family), tokens, lens, slack=1.1)


@pytest.mark.parametrize("family", ["llama3", "smollm2", "qwen3", "phi3"])
def test_fused_step_at_medium_precision(family):
    """bf16 products (the server's default precision): prompt rows through the AMX kernel where the
    CPU has it (kernels/cpu/amx.cpp), decode rows through the AVX-512-BF16 kernel; the layers path
    sends every row through the AVX-512-BF16 kernel. Both round the same products to bf16 and sum in
    float32 in other orders, so each is as far from transformers' float32 forward as the other,
    within a factor 1.5 (a wrong tile pairing or panel moves the logits by their own size)."""
    from quantserve.kernels.cpu import amx

    torch.set_float32_matmul_precision("medium")
    tokens, lens = _tokens()
    step = assert_as_close_as_layers(fm.family_model(family), tokens, lens, slack=1.5)
    assert (step._kernels["amx"] is not None) == amx.available()


@pytest.mark.parametrize("family", sorted(NOT_COVERED))
def test_uncovered_families_say_why_and_fused_is_refused(family):
    from quantserve.server.engine.forward_path import build_forward
    from quantserve.server.engine.models import UnsupportedModelError
    from quantserve.server.engine.models.decoder import DecoderModel

    model = fm.family_model(family)
    attention = NativeBackend(torch.device("cpu"), 4, 2, 32)
    assert NOT_COVERED[family] in fused_step.reason(DecoderModel(model, attention), torch.float32)
    adapter, choice = build_forward(model, "auto", attention, torch.float32)
    assert choice.path == "layers" and adapter.fused_step is None and NOT_COVERED[family] in choice.reason
    with pytest.raises(UnsupportedModelError, match=NOT_COVERED[family]):
        build_forward(model, "fused", attention, torch.float32)


def test_fused_needs_the_native_attention_backend():
    from quantserve.server.engine.attention import SdpaBackend
    from quantserve.server.engine.forward_path import build_forward

    model = fm.family_model("llama3")
    adapter, choice = build_forward(model, "auto", SdpaBackend(torch.device("cpu"), 4, 2, 32), torch.float32)
    assert choice.path == "layers" and "attention backend is torch" in choice.reason


def test_default_model_matches_transformers(smollm):
    """The real default model against transformers' own float32 forward of the same quantized model
    (full sequences, every position): the fused step is as close to it as the Python forward is.
    Neither is exact: transformers runs each prompt as one many-row matmul, the engine in chunks and
    single-row decodes (measured worst 1.9e-2 of the logits' scale for both paths, 5 prompts)."""
    model, _ = smollm
    tokens, lens = _tokens(count=5, extra=5)
    with torch.inference_mode():
        want = [model(torch.tensor([toks])).logits[0].float() for toks in tokens]

    def errors(fused):
        got, _, runner = teacher_forced(model, fused, tokens, lens, num_blocks=30, budget=64)
        assert (runner.model.fused_step is not None) == fused
        return sorted((got[(i, p)] - want[i][p]).abs().max().item() / max(want[i][p].abs().max().item(), 1.0)
                      for i, p in got)

    fused, python = errors(True), errors(False)
    assert fused[-1] <= 1.05 * python[-1] + 1e-4, f"worst {fused[-1]:.2e} vs the Python forward's {python[-1]:.2e}"
    mid = len(fused) // 2
    assert fused[mid] <= 1.05 * python[mid] + 1e-5, f"median {fused[mid]:.2e} vs {python[mid]:.2e}"


def test_weight_count_leaves_the_step_scratch_and_cache_out():
    """/v1/memory's weights (engine/memory.resident_bytes) are the same before and after the fused step
    has run: its KV-cache plan and scratch are not weights (the KV cache once showed up there)."""
    from quantserve.server.engine import SamplingParams
    from quantserve.server.engine.block_manager import BlockManager
    from quantserve.server.engine.config import EngineConfig
    from quantserve.server.engine.memory import resident_bytes
    from quantserve.server.engine.model_runner import ModelRunner
    from quantserve.server.engine.scheduler import Scheduler
    from quantserve.server.engine.sequence import Sequence

    model = fm.family_model("smollm2")
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=64))
    before = resident_bytes(runner.hf_model, runner.model)
    sched = Scheduler(BlockManager(runner.num_blocks, 16, False), max_num_seqs=8, max_num_batched_tokens=64)
    tokens, lens = _tokens(count=5)
    for i, (toks, n) in enumerate(zip(tokens, lens)):
        sched.add(Sequence(f"r{i}", toks[:n], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
    while sched.has_work():
        batch = sched.schedule()
        sched.postprocess(batch, runner.run(batch).token_ids)
    assert runner.forward.path == "fused" and runner.steps["eager"] > 0
    assert resident_bytes(runner.hf_model, runner.model) == before
