"""SpeculativeConfig: `--speculative-config` (vLLM's flag), validated once (pure pydantic: the
server's Settings and the EngineConfig both carry it). What it drives is in speculative.py."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfig(BaseModel):
    """`--speculative-config` (vLLM's flag): JSON text or an object.

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
    or {"model": PATH, "num_speculative_tokens": k} (a draft model with the target's vocabulary,
    loaded through quantserve's loader, 4-bit "nf4" unless "quantization" says "fp4" or "none").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Optional[Literal["ngram", "draft_model"]] = None
    model: Optional[str] = None
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPECULATIVE_TOKENS)
    prompt_lookup_max: Optional[int] = Field(None, ge=1, le=64)
    prompt_lookup_min: Optional[int] = Field(None, ge=1, le=64)
    disable_by_batch_size: Optional[int] = Field(None, ge=1)
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    # Overrides of the adaptive rule's cost model (see the module docstring); None: the device's.
    row_cost: Optional[float] = Field(None, gt=0, le=1)
    draft_cost: Optional[float] = Field(None, ge=0, le=4)
    initial_acceptance: float = Field(0.6, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _from_json(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"speculative_config is not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError("speculative_config must be a JSON object")
        if isinstance(value, dict) and "num_speculative_tokens" not in value:
            raise ValueError('speculative_config needs "num_speculative_tokens" (the most tokens drafted per step)')
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SpeculativeConfig":
        method = self.method or ("draft_model" if self.model is not None else None)
        if method is None:
            raise ValueError('speculative_config needs "method": "ngram" or a draft "model" path')
        object.__setattr__(self, "method", method)
        if method == "ngram":
            if self.model is not None:
                raise ValueError('speculative_config: method "ngram" takes no "model" (n-gram lookup needs no draft)')
            lo = self.prompt_lookup_min if self.prompt_lookup_min is not None else min(2, self.prompt_lookup_max or 2)
            hi = self.prompt_lookup_max if self.prompt_lookup_max is not None else max(5, lo)
            if lo > hi:
                raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) is more than prompt_lookup_max ({hi})")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if not self.model or not str(self.model).strip():
                raise ValueError('speculative_config: method "draft_model" needs a "model" (a folder or Hub id)')
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ValueError("speculative_config: prompt_lookup_max / prompt_lookup_min are for method ngram")
        return self
