"""POST /v1/embeddings: texts or token ids -> pooled vectors from the served model (the engine's
embed(): the model's own pooling, batched on the engine thread; engine/pooling.py)."""

from __future__ import annotations

import base64
import math

import numpy as np
from fastapi import APIRouter

from .. import protocol_embeddings as pe
from ..convert import api_error
from ..errors import bad_request
from .common import Services, to_thread


def _cut(vector: list[float], dimensions: int) -> list[float]:
    """A Matryoshka vector's first `dimensions` values, renormalized (as OpenAI's text-embedding-3)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.post("/v1/embeddings")
    async def create_embeddings(body: pe.EmbeddingRequest) -> pe.EmbeddingResponse:
        served, lora = await registry.resolve(body.model, body.keep_alive)
        if lora is not None:
            raise bad_request(f"embeddings are not served through a LoRA adapter ('{lora}'): use the base model "
                              f"'{served.name}'", "model")
        embed = getattr(served.engine, "embed", None)
        if embed is None:
            raise bad_request(f"model '{served.name}' does not serve embeddings", "model")
        prompts = [await to_thread(served.encode, x) if isinstance(x, str) else x for x in body.inputs()]
        try:
            vectors = await embed(prompts)
        except Exception as exc:  # the engine's verdict (too long, bad ids) or its failure
            raise api_error(exc, body) from None
        if body.dimensions is not None:
            pooling, width = served.engine.pooling, len(vectors[0])
            if not pooling.matryoshka:
                raise bad_request(f"model '{served.name}' does not support 'dimensions' (not a Matryoshka model: its "
                                  "vectors cannot be shortened)", "dimensions")
            if body.dimensions > width:
                raise bad_request(f"dimensions must be at most {width}", "dimensions")
            vectors = [_cut(v, body.dimensions) for v in vectors]
        if body.encoding_format == "base64":
            data = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors
        tokens = sum(len(p) for p in prompts)
        return pe.EmbeddingResponse(data=[pe.Embedding(embedding=v, index=i) for i, v in enumerate(data)],
                                    model=served.name, usage=pe.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    return api
