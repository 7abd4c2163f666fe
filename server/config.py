"""Settings: the one place where command-line flags and QUANTSERVE_* environment variables are read.

Every field is a flag of `quantserve serve` (`--max-num-seqs 32`) and an environment variable
(`QUANTSERVE_MAX_NUM_SEQS=32`); a flag given on the command line wins over the environment.
The validated Settings object is passed down to the app, the registry and the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.spec_config import SpeculativeConfig


class Settings(BaseSettings):
    # env_ignore_empty: compose passes unset variables as "" (QUANTSERVE_MAX_MODEL_LEN=), meaning "default".
    model_config = SettingsConfigDict(env_prefix="QUANTSERVE_", extra="forbid", frozen=True, env_ignore_empty=True)

    # What to serve
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models loaded at startup, each [NAME=]PATH_OR_ID: an HF folder, hub id "
        "(org/name), .gguf file or prequantized bnb-4bit checkpoint, served as NAME (default: as given); none "
        "(and no --models-dir): the built-in SmolLM2-135M-Instruct"
    )
    model: Optional[str] = Field(
        None, description="one model to serve, as a MODEL argument (kept for QUANTSERVE_MODEL); given with MODEL "
        "arguments it is the first of them"
    )
    models_dir: Optional[str] = Field(
        None, description="a folder of models known by name and loaded on their first request: each model folder "
        "(HF layout) under it by its folder name, each .gguf file by its name without .gguf (llama-server's flag)"
    )
    models_config: Optional[str] = Field(
        None, description="a YAML or TOML file of per-model settings: {NAME: {model: PATH, quant: ..., "
        "max_model_len: ..., lora_modules: [...], chat_template: ..., keep_alive: ..., preload: true}}; each "
        "entry's unset settings are the flags'; a NAME not otherwise known is added"
    )
    models_max: Optional[int] = Field(
        None, ge=1, description="most models loaded at once (llama-server's --models-max, Ollama's "
        "OLLAMA_MAX_LOADED_MODELS); the least recently used idle one is unloaded to make room (default: no count "
        "limit, only --models-memory)"
    )
    models_memory: Optional[float] = Field(
        None, gt=0, description="GiB the loaded models may take together, each counted as `quantserve estimate` "
        "prices it (weights + KV cache + one step's activations); a load that does not fit unloads the least "
        "recently used idle models first (default: 90%% of the host's available memory at startup on CPU, "
        "--gpu-memory-utilization of the GPU's)"
    )
    keep_alive: float = Field(
        300.0, description="how long a model stays loaded after its last request (Ollama's keep_alive: seconds, "
        "or a duration such as 10m, 1h30m; negative: forever; 0: unloaded as soon as it is idle); a request's "
        "keep_alive field overrides it for its model. Models given as MODEL arguments never expire unless this is "
        "set"
    )
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit)")
    served_model_name: Optional[str] = Field(None, description="the model id clients send (default: derived from MODEL)")
    chat_template: Optional[str] = Field(
        None, description="chat template for /v1/chat/completions: a Jinja file, or the template itself (as vLLM's "
        "--chat-template); default: the tokenizer's own (a model without one answers chat requests with 400)"
    )
    quant: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4", description="weight format: 4-bit nf4/fp4, int8 (LLM.int8, bitsandbytes' load_in_8bit), or none"
    )
    double_quant: bool = Field(False, description="double-quantize the absmax statistics (~0.37 bit/param less)")
    int8_activations: bool = Field(
        False, description="with --quant int8: quantize the activations to int8 too (LLM.int8 proper, bitsandbytes' "
        "eval-mode forward byte for byte; faster prefill on int8 dot-product CPUs, ~0.5-0.9%% relative error per "
        "matmul); default: int8 weights times float activations, the dequantized-weight matmul to float rounding"
    )
    quantize_lm_head: Literal["none", "int8", "nf4"] = Field(
        "none", description="output head format: none (16-bit), int8 (per-row absmax, float32 activations) or nf4 "
        "(blocksize 64); half or a quarter of the head's bytes read per token, at some perplexity; a tied input "
        "embedding reads its rows from the quantized head"
    )
    compute_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="dtype the model computes in: weights are loaded in it, unquantized tensors stay in it and "
        "the 4-bit matmuls run in it (default: float32 on CPU, bfloat16 on CUDA); the same in quantize and inspect"
    )
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda when present)")
    cpu_threads: Optional[int] = Field(
        None, ge=1, le=1024, description="threads for CPU compute (torch and the native kernels); default: the cores "
        "this process may use (its affinity mask, capped by a cgroup CPU quota such as docker --cpus), logged at "
        "startup and shown on /health"
    )
    # medium: on the 2-core AVX-512-BF16 CPU we measure on, 4-bit matmuls with many rows run ~2x
    # faster; NF4 perplexity of the default model 31.27 vs 31.11 (bitsandbytes' own CPU kernel: 31.14).
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "medium", description="torch's float32 matmul precision: medium lets CPUs with AVX-512-BF16 run float32 "
        "matmuls (4-bit ones included) with bf16 products and float32 sums, as bitsandbytes' CPU kernel does; "
        "highest keeps float32 products"
    )

    # Engine limits
    max_model_len: Optional[Union[Annotated[int, Field(ge=16)], Literal["auto"]]] = Field(
        None, description="context length limit (default: the model's, capped by the KV cache); auto: the longest "
        "that fits in free memory beside the weights (the KV cache shrunk to fit if it must), as `quantserve estimate` "
        "computes it"
    )
    # 64, not 32: with 64 clients on the 2-core dev machine (bench/engine.py, 128-token prompts, 64
    # tokens each) TTFT p50 fell 22.9 -> 3.6 s and tok/s rose 20%; up to 32 clients nothing changes.
    # The default CPU KV cache holds ~23k tokens of the default model (1 GiB of float32, 0.5 GiB at 16
    # bits), 64 x (prompt + answer) of chat.
    max_num_seqs: int = Field(64, ge=1, le=4096, description="most sequences decoded together in one step (more "
                              "requests wait in the queue)")
    # 512: on a CPU a bigger prefill chunk stalls every running stream for seconds.
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget of one engine step (chunked prefill)")
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 429 + Retry-After")
    # Speculative decoding (server/engine/speculative.py)
    speculative_config: Optional[SpeculativeConfig] = Field(
        None, description="speculative decoding, as vLLM's flag (JSON): {\"method\": \"ngram\", "
        "\"num_speculative_tokens\": k, \"prompt_lookup_max\": n, \"prompt_lookup_min\": m} (prompt lookup; "
        "defaults n 5, m 2) or {\"model\": PATH, \"num_speculative_tokens\": k} (a draft model with the same "
        "vocabulary, loaded 4-bit; \"quantization\": \"none\" keeps it 16/32-bit); optional "
        "\"disable_by_batch_size\": no drafts while more sequences run. Drafts are verified in one forward; "
        "speculation turns itself off where it does not pay (docs/speculative.md)"
    )
    kv_cache_memory: Optional[float] = Field(
        None, gt=0, description="KV cache size in GiB (default on CPU: the tokens 1 GiB of float32 holds, 0.5 GiB at 16 bits; 90%% of free memory on GPU)"
    )
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV cache block")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of the GPU's memory the server may use: the KV cache gets what is "
        "left of it after the weights, one step's activations and the CUDA graphs (measured at startup)"
    )
    forward: Literal["auto", "fused", "layers", "transformers"] = Field(
        "auto", description="forward path, chosen once at start and shown on /health: fused (the decoder stack in one "
        "native call per step: CPU, float32, native attention), layers (the decoder forward layer by layer, any "
        "device), transformers (transformers' own modules with our paged attention, any causal LM), auto (the first "
        "of those that serves the model; the log says why the others did not)"
    )
    attention_backend: Literal["auto", "native", "torch", "triton"] = Field(
        "auto", description="paged attention kernels: auto (Triton on a GPU; native C++ on a CPU), native, torch "
        "(gather + sdpa), triton (on a CPU only with TRITON_INTERPRET=1, for tests)"
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="dtype of the KV cache (as vLLM's flag; fp8 = fp8_e4m3): auto picks bfloat16 on a CPU "
        "where the native attention kernel runs (half the bytes per token: twice the tokens in the same memory), else "
        "the model's compute dtype (on a GPU too); attention computes in float32 on the stored values"
    )
    enforce_eager: bool = Field(False, description="no CUDA graphs: decode steps run eagerly (as vLLM's flag)")
    enable_prefix_caching: bool = Field(True, description="share KV blocks of common prompt prefixes")
    max_n: int = Field(16, ge=1, le=128, description="largest n (choices per request) accepted")
    scheduling_policy: Literal["fair", "priority", "fcfs"] = Field(
        "fair", description="who runs first: fair (clients, by API key or else address, share the running slots "
        "max-min fairly; a newcomer preempts the newest sequence of a client over its share, so its first token "
        "waits about one step; a request's priority orders only its own client's requests), priority (vLLM's: "
        "lower priority first, preempting worse ones), fcfs (arrival order)"
    )
    max_seqs_per_client: Optional[int] = Field(
        None, ge=1, description="most running sequences of one client even when slots are free (default: no fixed "
        "cap, the fair policy shares the slots); not applied under fcfs"
    )
    default_max_tokens: Optional[int] = Field(
        None, ge=1, description="max_tokens of a request that gives none (default: what the context leaves)"
    )
    max_tokens_per_request: int = Field(
        65536, ge=1, description="most output tokens one request may ask for: n x max_tokens, summed over a batched "
        "call's prompts (400 beyond); a request without max_tokens gets at most its share"
    )
    lora_modules: list[str] = Field(
        default_factory=list, description="LoRA adapters (peft folders) served on top of the base: NAME=PATH ... "
        "(or vLLM's JSON '{\"name\": ..., \"path\": ...}'); a request picks one with \"model\": NAME"
    )
    max_loras: int = Field(4, ge=1, le=256, description="most LoRA adapters active in one step (requests for others wait)")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted (higher ones are refused at load)")
    max_cpu_loras: Optional[int] = Field(
        None, ge=1, le=1024, description="most LoRA adapters held in memory, from --lora-modules and runtime loads "
        "together (vLLM's name); a runtime load beyond it is refused until one is unloaded (default: --max-loras)"
    )
    # Off by default, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: loading reads files named by the
    # client, so it is opened only by the operator, and then only under --lora-root.
    enable_lora_runtime_load: bool = Field(
        False, description="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); adapters are then read only from under --lora-root"
    )
    lora_root: Optional[str] = Field(
        None, validate_default=True, description="the folder runtime-loaded adapters must be in (a lora_path relative to it, or absolute "
        "inside it, symlinks resolved); required by --enable-lora-runtime-load"
    )
    tool_call_parser: Optional[Literal["hermes", "llama3_json", "mistral"]] = Field(
        None, description="the model's tool-call format (default: recognized from its chat template)"
    )
    reasoning_parser: Optional[Literal["deepseek_r1", "qwen3"]] = Field(
        None, description="split the model's <think> thinking from its answer (vLLM's names): reasoning_content in "
        "chat completions, reasoning items in /v1/responses, thinking blocks in /v1/messages"
    )
    max_stored_responses: int = Field(
        1000, ge=0, description="responses kept for /v1/responses' previous_response_id and GET (oldest evicted "
        "first; 0 keeps none)"
    )
    max_stored_response_bytes: int = Field(
        64 * 2**20, ge=0, description="bytes of stored responses kept, their input and output items counted "
        "(oldest evicted first)"
    )

    # Structured outputs: what one request's grammar may cost. Compiling runs on worker threads
    # (never the event loop or the engine thread); these bound how long, how big and how many.
    grammar_compile_workers: int = Field(
        2, ge=1, le=64, description="threads that compile structured-output grammars (JSON schemas, regexes, "
        "choices, tool calls); requests beyond wait their turn"
    )
    grammar_compile_timeout: float = Field(
        10.0, gt=0, description="seconds a request's grammar may take to compile, waiting for a thread included "
        "(400 beyond)"
    )
    grammar_cache_bytes: int = Field(
        128 * 2**20, ge=0, description="bytes of compiled grammars kept for reuse, by a hash of the grammar (least "
        "recently used dropped first; a compiled grammar takes ~24x its text)"
    )
    max_grammar_choices: int = Field(
        10_000, ge=1, description="most strings in a structured_outputs.choice (400 beyond)"
    )
    max_grammar_schema_bytes: int = Field(
        2**20, ge=1, description="longest JSON schema of response_format / structured_outputs.json, as JSON text "
        "(400 beyond)"
    )
    max_grammar_regex_length: int = Field(
        16_384, ge=1, description="longest structured_outputs.regex, in characters (400 beyond)"
    )
    max_grammar_bytes: int = Field(
        2**20, ge=1, description="longest grammar text: structured_outputs.grammar (GBNF / Lark), a choice list "
        "as JSON, and the tool-call grammar made from a request's tools (400 beyond)"
    )

    # HTTP
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 picks a free one)")
    api_key: Optional[SecretStr] = Field(None, description="require 'Authorization: Bearer KEY' on /v1/* and /tokenize")
    # NoDecode: the variable is a comma-separated list (QUANTSERVE_CORS_ORIGINS=a,b), which
    # pydantic-settings would otherwise parse as JSON and refuse before the validator below runs.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         description="origins allowed by CORS (e.g. '*')")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="largest request body accepted (413 beyond)")
    # Without a key nothing else stops a web page from reaching a server on 127.0.0.1 through DNS
    # rebinding (its own name pointed at 127.0.0.1): the Host header it sends is that name.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="without --api-key, the Host names requests may carry besides localhost, "
        "IP addresses and --host (DNS-rebinding guard; '*' allows any); with a key every host is accepted"
    )
    # Public by default, as vLLM's: Prometheus scrapers seldom carry the API key, and /metrics holds
    # counts and timings, never prompts or outputs.
    metrics_public: bool = Field(
        True, description="serve /metrics without the API key (--no-metrics-public: /metrics asks for --api-key "
        "like /v1)"
    )
    # nginx waits 60 s for a header block, Apache 20-40 s; one real client sends its headers in one
    # packet. Each slow connection holds a socket: 10 s frees a slowloris's slots 6x faster than nginx.
    header_timeout: float = Field(
        10.0, gt=0, description="seconds for a request's headers to arrive, from the connection opening or the "
        "previous response's end (the connection is closed beyond)"
    )
    # 8 MiB (the largest body) in 60 s is 140 KB/s; a 10 KB chat body needs 170 B/s.
    body_timeout: float = Field(
        60.0, gt=0, description="seconds for a request's body to arrive once its headers have (408 and the "
        "connection closed beyond)"
    )
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @field_validator("chat_template")
    @classmethod
    def _readable_template(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            chat_template_text(value)  # refused at startup, before anything loads
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return comma_list(value)  # QUANTSERVE_MODELS="chat=/models/a,coder=/models/b"

    def model_entries(self) -> list[str]:
        """The models given to load at startup (--model first, then the MODEL arguments)."""
        return ([self.model] if self.model else []) + list(self.models)

    @field_validator("lora_modules")
    @classmethod
    def _lora_pairs(cls, value: list[str]) -> list[str]:
        lora_module_pairs(value)  # a malformed entry is refused at startup, before anything loads
        return value

    def lora_pairs(self) -> list[tuple[str, str]]:
        """--lora-modules as (name, path) pairs."""
        return lora_module_pairs(self.lora_modules)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return comma_list(value)  # QUANTSERVE_ALLOWED_HOSTS="api.example,gpu-box"

    @field_validator("lora_root")
    @classmethod
    def _root_for_runtime_load(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("enable_lora_runtime_load") and not value:
            raise ValueError("--enable-lora-runtime-load needs --lora-root DIR (the folder adapters are loaded from)")
        return value

    @field_validator("max_cpu_loras")
    @classmethod
    def _at_least_max_loras(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and value < info.data.get("max_loras", 1):
            raise ValueError(f"{value} is below --max-loras {info.data.get('max_loras')}")
        return value

    def lora_capacity(self) -> int:
        """Most adapters held at once (--max-cpu-loras, else --max-loras)."""
        return self.max_cpu_loras or self.max_loras

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return comma_list(value)  # QUANTSERVE_CORS_ORIGINS="https://a.example,https://b.example"

    @model_validator(mode="after")
    def _double_quant_is_4bit(self) -> "Settings":
        if self.double_quant and self.quant not in ("nf4", "fp4"):
            raise ValueError(f"--double-quant applies to the 4-bit formats (nf4, fp4), not {self.quant}")
        return self

    def display_name(self) -> str:
        """The model id clients use: --served-model-name, else MODEL as given (like vLLM)."""
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model is not None else "SmolLM2-135M-Instruct"


def chat_template_text(value: str) -> str:
    """A --chat-template value as template text: the file it names, or the value itself when it is
    a template (contains Jinja markup), as vLLM reads the flag. ValueError otherwise."""
    from pathlib import Path

    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read chat template file {value}: {exc}") from None
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"no chat template file {value} (give a Jinja file, or the template itself)")


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> object:
    """A keep-alive as Ollama takes it: a number of seconds, or Go's duration text ("5m", "1h30m",
    "90s", "-1"), as float seconds; other values are left for pydantic to refuse."""
    import re

    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = re.fullmatch(r"(-?)((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", text)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (seconds, or such as 30s, 10m, 1h30m; negative: forever)")
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", match[2]))
    return -seconds if match[1] else seconds


def comma_list(value: object) -> object:
    """A list setting given as text: "a,b" or a JSON array '["a", "b"]'."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)
    return [v.strip() for v in value.split(",") if v.strip()]


def lora_module_pairs(entries: list[str]) -> list[tuple[str, str]]:
    """--lora-modules entries (NAME=PATH, or vLLM's JSON object with "name" and "path") as pairs;
    ValueError for a malformed entry or a name given twice."""
    import json

    pairs: list[tuple[str, str]] = []
    for entry in entries:
        if entry.lstrip().startswith("{"):
            try:
                obj = json.loads(entry)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lora-modules: {entry!r} is not valid JSON ({exc})") from None
            name, path = (obj.get("name"), obj.get("path")) if isinstance(obj, dict) else (None, None)
        else:
            name, _, path = entry.partition("=")
        if not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules: {entry!r} is not NAME=PATH")
        pairs.append((name.strip(), path.strip()))
    names = [n for n, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
    return pairs
