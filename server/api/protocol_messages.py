"""Anthropic Messages API wire types (POST /v1/messages, /v1/messages/count_tokens), in the order
of Anthropic's API reference. As everywhere, an unknown field or block type is a 400 naming it;
fields with no effect on a local model's output (metadata, service_tier, cache_control) are
declared and ignored. convert.py turns a request into the chat request every API shares.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from .protocol import _Request, _Strict


class _Block(_Strict):
    cache_control: Optional[dict[str, Any]] = None  # prompt caching is automatic here (prefix cache)


class TextBlockParam(_Block):
    type: Literal["text"]
    text: str
    citations: Optional[list[dict[str, Any]]] = None


class ToolUseBlockParam(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlockParam(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Optional[Union[str, list[TextBlockParam]]] = None
    is_error: Optional[bool] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlockParam(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlockParam(_Block):
    type: Literal["redacted_thinking"]
    data: str


ContentBlockParam = Annotated[
    Union[TextBlockParam, ToolUseBlockParam, ToolResultBlockParam, ThinkingBlockParam, RedactedThinkingBlockParam],
    Field(discriminator="type"),
]


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: Union[str, list[ContentBlockParam]]

    @model_validator(mode="after")
    def _blocks_fit_role(self) -> "MessageParam":
        if isinstance(self.content, list):
            kinds = {b.type for b in self.content}
            if self.role == "user" and kinds & {"tool_use", "thinking", "redacted_thinking"}:
                raise ValueError("a user message cannot hold tool_use or thinking blocks")
            if self.role == "assistant" and "tool_result" in kinds:
                raise ValueError("tool_result blocks belong in a user message")
        return self


class Tool(_Strict):
    type: Optional[Literal["custom"]] = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    input_schema: dict[str, Any]
    cache_control: Optional[dict[str, Any]] = None
    # Arguments always follow input_schema when calls are constrained (tool_choice any/tool), strict or not.
    strict: Optional[bool] = None
    # Accepted and ignored: scheduling hints and examples for Anthropic's own tool machinery.
    eager_input_streaming: Optional[bool] = None
    defer_loading: Optional[bool] = None
    input_examples: Optional[list[dict[str, Any]]] = None
    allowed_callers: Optional[list[Any]] = None


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone], Field(discriminator="type")]


class ThinkingConfig(_Strict):
    """Passed to the chat template as enable_thinking (Qwen3's switch: on for every type but
    "disabled"); budget_tokens is not enforced."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Optional[int] = Field(None, ge=1)
    display: Optional[Literal["summarized", "omitted"]] = None


class JSONOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    """format: the answer follows this JSON schema (the same grammar as OpenAI's json_schema)."""

    format: Optional[JSONOutputFormat] = None
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = None  # a hint a local model cannot follow


class _Prompt(_Request):
    """What a prompt is made of: the fields count_tokens and messages share."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlockParam]]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[ThinkingConfig] = None

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: Optional[list[Tool]]) -> Optional[list[Tool]]:
        names = [t.name for t in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return value

    @model_validator(mode="after")
    def _known_tool(self) -> "_Prompt":
        choice, names = self.tool_choice, {t.name for t in self.tools or ()}
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise ValueError(f"tool_choice '{choice.type}' needs tools")
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not one of the tools")
        return self

    def system_text(self) -> Optional[str]:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "\n\n".join(b.text for b in self.system)


class MessagesRequest(_Prompt):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    output_config: Optional[OutputConfig] = None
    # Accepted and ignored: they change nothing in a local model's output.
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    cache_control: Optional[dict[str, Any]] = None
    inference_geo: Optional[str] = None
    speed: Optional[str] = None
    user_profile_id: Optional[str] = None
    workspace_id: Optional[str] = None
    diagnostics: Optional[dict[str, Any]] = None


class CountTokensRequest(_Prompt):
    pass


# ---------------------------------------------------------------- responses


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # nothing to sign: the thinking is the local model's own


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Union[TextBlock, ThinkingBlock, ToolUseBlock]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(BaseModel):
    """Anthropic's counts: input_tokens are the prompt tokens not read from the (prefix) cache."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: Optional[StopReason] = None
    stop_sequence: Optional[str] = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int
