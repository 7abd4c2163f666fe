"""OpenAI wire types (pydantic) of chat completions, completions and models, in the order of the
OpenAI API reference, and what every API's types share. The other APIs' types have their own
modules: protocol_messages (Anthropic), protocol_responses (OpenAI Responses), protocol_embeddings,
protocol_vllm (/tokenize, /detokenize, LoRA adapters), protocol_models (/v1/models, the error body). Requests validate every value's type and API range (a bad one is a
400 naming the field). A field this server does not implement is a 400 naming it, never silently
dropped: every model forbids extras, and the few fields with no effect on the output (user,
metadata, store, service_tier) are declared and ignored.

The engine's own limits (stop strings, logprobs, context length, vocabulary, n) are checked by
the engine, once; convert.py turns these types into the engine's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_serializer,
                      model_validator)

# The model listing and the error body, which every API shares, live in protocol_models.
from .protocol_models import ErrorInfo, ErrorResponse, ModelCard, ModelList  # noqa: F401


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Strict(BaseModel):
    # An unknown field is an error (errors.py words it "not supported"), at every depth.
    model_config = ConfigDict(extra="forbid")


class _Request(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Ollama's: how long the model stays loaded after this request (seconds, or "5m", "1h"; negative:
    # forever; 0: unloaded once idle); it sets the model's keep-alive until another request changes it.
    keep_alive: Optional[float] = None

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        from ..config import parse_duration

        return parse_duration(value)


class _OmitNone(BaseModel):
    """Serialized without its None fields (OpenAI's deltas: the role once, then only what changed)."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far, not only the last one.
    continuous_usage_stats: bool = False


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Always enforced in full, strict or not (OpenAI only guarantees the schema with strict: true).
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputs(_Strict):
    """vLLM's extension: exactly one constraint on the output."""

    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = Field(None, min_length=1)
    grammar: Optional[str] = None  # GBNF (llama.cpp) or Lark
    json_object: Optional[bool] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class _SamplingFields(_Request):
    """The sampling parameters chat and completions share."""

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    # Accepted and ignored: they change nothing in the output.
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # Extensions every open server accepts (vLLM, TGI, llama.cpp).
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    # vLLM's: lower runs first (--scheduling-policy: within the client's own requests under fair).
    priority: int = Field(0, ge=-(2**31), lt=2**31)
    # Token id (as a string key, as OpenAI sends it) -> bias added to its logit.
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    # SGLang's, which the SGLang-family routers (vllm-router, sglang-router) add to every request
    # they forward, at these values: accepted at the value that changes nothing, refused at any other.
    no_stop_trim: Literal[False] = False
    return_hidden_states: Literal[False] = False
    skip_special_tokens: Literal[True] = True

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):  # "²".isdigit() is true, int("²") fails
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias}")
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(cls, value: Optional[StructuredOutputs], info: ValidationInfo) -> Optional[StructuredOutputs]:
        fmt = info.data.get("response_format")
        if value is not None and fmt is not None and fmt.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# ---------------------------------------------------------------- chat completions (request)


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; none means no arguments
    strict: Optional[bool] = None  # arguments always follow the schema when tool calls are constrained


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    # vLLM's: extra variables for the chat template (e.g. {"enable_thinking": false} for Qwen3).
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # Added by the SGLang-family routers too (see _SamplingFields), at the values that change nothing.
    continue_final_message: Literal[False] = False
    separate_reasoning: Literal[True] = True
    stream_reasoning: Literal[True] = True
    include_reasoning: Literal[True] = True
    # The Lark grammar of a constrained tool call ("required" or a named function), set by the
    # route once it knows the model's tool-call format; convert.py turns it into the constraint.
    _tool_grammar: Optional[str] = PrivateAttr(None)
    # How the output's reasoning is delimited (reasoning.Reasoning), set by the route when the
    # server has a reasoning parser: a constraint then applies to the answer after it.
    _reasoning: Any = PrivateAttr(None)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        reserved = {"messages", "tools", "add_generation_prompt", "chat_template", "tokenize", "documents"}
        clash = sorted(reserved & set(value or ()))
        if clash:
            raise ValueError(f"{clash[0]!r} is set by the server, not by chat_template_kwargs")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: Optional[list[ChatTool]]) -> Optional[list[ChatTool]]:
        names = [t.function.name for t in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _known_tool(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if value is not None and value != "none" and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not one of the tools")
        return value

    def effective_tool_choice(self) -> str:
        """none / auto / required / named (OpenAI's default: auto with tools, none without)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them: content flattened to a string."""
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in m.tool_calls
                ]
            out.append(msg)
        return out

    def tool_dicts(self) -> Optional[list[dict[str, Any]]]:
        """Tools as chat templates expect them (OpenAI's shape; parameters always present)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {
            "name": t.function.name, **({"description": t.function.description} if t.function.description else {}),
            "parameters": t.function.parameters if t.function.parameters is not None else
            {"type": "object", "properties": {}}}} for t in self.tools]


def _arguments(text: str) -> Any:
    # Templates expect arguments as a mapping (transformers' convention); OpenAI sends JSON text.
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


# ---------------------------------------------------------------- completions (request)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        # best_of > n would rank candidates by logprob and drop the rest: not implemented.
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], list) and any(not p for p in value):
                raise ValueError("token prompts must not be empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts (OpenAI accepts one or many, as text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[dict[str, int]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    # The model's thinking, split off by --reasoning-parser (vLLM's field name).
    reasoning_content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class _Choice(BaseModel):
    index: int
    logprobs: Optional[Any] = None
    finish_reason: Optional[FinishReason] = None


class _Envelope(BaseModel):
    """What a response and each of its stream's chunks carry around their choices."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class _ChatChoice(_Choice):
    logprobs: Optional[ChoiceLogprobs] = None


class ChatChoice(_ChatChoice):
    message: ChatResponseMessage


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class FunctionCallDelta(_OmitNone):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(_OmitNone):
    """A streamed tool call: the first delta of a call has its id, type and name, later ones
    only argument fragments; concatenated they are the call's arguments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCallDelta


class ChatDelta(_OmitNone):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(_ChatChoice):
    delta: ChatDelta


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
