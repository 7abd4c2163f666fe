"""OpenAI wire types every API shares: the model listing (GET /v1/models) and the error body
({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quantserve"
    root: Optional[str] = None
    parent: Optional[str] = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: Optional[int] = None
    quantization: Optional[dict[str, Any]] = None  # what quantizing cost: routes/quantization.py's summary
    # The registry's (api/registry.py): loaded, loading, unloaded, unloading or error (with why), and
    # what the model costs loaded as `quantserve estimate` prices it (bytes; None until estimated).
    state: Optional[str] = None
    error: Optional[str] = None
    memory: Optional[dict[str, Any]] = None
    keep_alive: Optional[float] = None  # seconds it stays loaded once idle (None: until evicted)
    load_seconds: Optional[float] = None  # how long its last load took, warm-up included


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
