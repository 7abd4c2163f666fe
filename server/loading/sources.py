"""Where a model comes from: a name (folder, .gguf file, Hub id, or None for the default model)
turned into a local Hugging Face folder, and what that folder holds (config, tokenizer, whether
it is a prequantized bitsandbytes checkpoint). Each failure is one line naming the problem."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from .embedding_folder import encoder_reason

if TYPE_CHECKING:
    from quantserve.quant import QuantConfig

# torch, transformers and the default model's package are imported where they are used: `serve`
# calls check_source before anything heavy is imported, so a mistyped path fails in milliseconds.

logger = logging.getLogger("quantserve.loader")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_HUB_METADATA = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


SourceKind = Literal["default", "gguf", "folder", "hub"]


def locate(model: Optional[str], revision: Optional[str]) -> tuple[SourceKind, Optional[Path]]:
    """What `model` names, from the file system alone (no imports, no network): the default
    model, a .gguf file, a folder with config.json, or a Hub id (path None). Raises ValueError /
    FileNotFoundError with one line for paths that cannot be a model."""
    if model is None:
        return "default", None
    path = Path(model).expanduser()
    if revision is not None and path.exists():
        raise ValueError(f"revision applies to Hub ids only, and {model} is a local path")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file, not a model folder (expected a folder with config.json, or a .gguf file)")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local or not _HUB_ID.match(model):
        raise FileNotFoundError(f"model folder or file {model} does not exist")
    return "hub", None


def check_source(model: Optional[str], revision: Optional[str]) -> None:
    """The checks that cost milliseconds, run before a server opens its port: `locate`, and for
    a local folder a readable config.json and at least one weight file (the patterns of
    checkpoint.find_weight_files, which validates them properly while loading)."""
    kind, path = locate(model, revision)
    if kind != "folder":
        return
    assert path is not None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} is not a JSON object")
    reason = encoder_reason(path, config)
    if reason is not None:
        raise ValueError(reason)
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern)
               if p.is_file() and not p.name.startswith("training_args")]
    if not weights:
        raise FileNotFoundError(f"no weights in {path} (expected *.safetensors or pytorch_model*.bin)")


def resolve_source(model: Optional[str], revision: Optional[str], cache_dir: Path) -> tuple[Path, str]:
    """(local folder with config.json, a description of what was asked for).

    None -> the built-in default model; an existing .gguf file, or a folder holding exactly one,
    -> its cached conversion; an existing folder -> itself; `org/name` -> huggingface_hub's cache
    (downloading what is missing unless HF_HUB_OFFLINE is set)."""
    from .default_model import DEFAULT_MODEL_NAME, default_model_folder, gguf_to_folder

    kind, path = locate(model, revision)
    if kind == "default":
        return default_model_folder(cache_dir), f"built-in default model {DEFAULT_MODEL_NAME}"
    if kind == "hub":
        assert model is not None
        return hub_folder(model, revision), model + (f"@{revision}" if revision else "")
    assert path is not None
    if kind == "gguf":
        return gguf_to_folder(path, cache_dir), f"GGUF file {path}"
    return path, str(path)


def hub_folder(repo_id: str, revision: Optional[str]) -> Path:
    """The snapshot folder of a Hub model in huggingface_hub's cache ($HF_HOME/hub), fetching
    config, tokenizer and only the weight files the index names (Mistral-style repos also ship
    consolidated.* copies); safetensors preferred over .bin."""
    from huggingface_hub import constants, snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))

    try:
        folder = fetch(_HUB_METADATA)
        for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (folder / index).is_file():
                folder = fetch(sorted(set(json.loads((folder / index).read_text())["weight_map"].values())))
                break
            folder = fetch([single])
            if (folder / single).is_file():
                break
    except Exception as exc:  # network, auth, missing repo or revision, not cached while offline
        state = "is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "could not be reached"
        raise FileNotFoundError(
            f"{repo_id} is not a local folder, the Hugging Face Hub {state}, and it is not in the cache "
            f"{constants.HF_HUB_CACHE}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return folder


def load_hf_config(folder: Path) -> Any:
    """The folder's transformers config; ValueError unless AutoModelForCausalLM can build it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {folder / 'config.json'}: {first_line(exc)}") from None
    reason = encoder_reason(folder, hf_config.to_dict(), type(hf_config) in MODEL_FOR_MASKED_LM_MAPPING)
    if reason is not None:  # before the causal-LM check: transformers builds BERT as a causal LM too
        raise ValueError(reason)
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "no architectures listed"
        raise ValueError(
            f"{folder} holds a '{hf_config.model_type}' model ({archs}), not a causal language model "
            "(transformers' AutoModelForCausalLM has no class for it)"
        )
    return hf_config


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None (with a warning) when it has no tokenizer files."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; loading the model without a tokenizer", folder)
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the tokenizer in {folder}: {first_line(exc)}") from None


def checkpoint_quant(hf_config: Any, folder: Path) -> Optional[QuantConfig]:
    """The QuantConfig of a prequantized bitsandbytes checkpoint (4-bit, or 8-bit LLM.int8), None
    for a float one; ValueError for other quantization methods."""
    from quantserve.quant import QuantConfig

    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{folder} is quantized with {method!r}; quantserve loads float and bitsandbytes 4-bit and 8-bit checkpoints")
    try:
        return QuantConfig.from_dict(qc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{folder / 'config.json'}: quantization_config: {exc}") from None
