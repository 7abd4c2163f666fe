"""The engine: continuous batching over a paged KV cache, one thread owning the device.

    engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    await engine.start()
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64), "req-1"):
        print(out.outputs[0].text, end="")

Pure-Python parts (no torch): config, sequence, outputs, block_manager, scheduler, detokenizer.
The device side: model_runner (with forward_path, kv_cache, step_inputs, startup), attention/ (the
backends), sampler, models/.
"""

from .config import EngineConfig
from .errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from .sequence import FinishReason, SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]

_ENGINE_NAMES = ("AsyncEngine",)


def __getattr__(name: str):
    # The engine pulls in torch; importing SamplingParams (protocol.py) should not.
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
