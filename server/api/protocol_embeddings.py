"""OpenAI embeddings wire types (POST /v1/embeddings)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from .protocol import _Request


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    # Matryoshka models only (their config says so): the first `dimensions` values, renormalized.
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None  # accepted and ignored

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Union[str, list]) -> Union[str, list]:
        if isinstance(value, list):
            if not value:
                raise ValueError("input must not be empty")
            if any(isinstance(x, str) and not x for x in value) or any(isinstance(x, list) and not x for x in value):
                raise ValueError("inputs must not be empty")
        elif not value:
            raise ValueError("input must not be empty")
        return value

    def inputs(self) -> list[Union[str, list[int]]]:
        """The batch: texts, or token id lists (one list of ints is one input)."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(x, int) for x in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]  # base64: the float32 values' little-endian bytes
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
