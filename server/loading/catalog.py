"""The models a server knows: MODEL arguments, --models-dir, --models-config, as one list of specs.

Each spec carries the Settings its model is loaded with: the server's, with the model's path and
name and its own entries from --models-config over them (one config object per model, passed
down to the loader and the engine as a single model's Settings always were).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from ..config import Settings

# Settings that belong to the process, not to one model: a models-config entry may not set them.
SERVER_ONLY = frozenset({
    "models", "model", "models_dir", "models_config", "models_max", "models_memory", "host", "port", "api_key",
    "cors_origins", "max_body_bytes", "allowed_hosts", "metrics_public", "header_timeout", "body_timeout",
    "shutdown_timeout", "log_level", "cpu_threads", "matmul_precision", "max_stored_responses",
    "max_stored_response_bytes",
})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*(/[A-Za-z0-9][A-Za-z0-9._:@+-]*)?")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One known model: its name, the settings it loads with, and how it came to be known."""

    name: str
    settings: Settings
    source: str  # "argument", "default", "models-dir", "models-config"
    preload: bool  # loaded at startup (MODEL arguments, the default, preload: true)
    keep_alive: Optional[float]  # seconds after its last request; None: stays until evicted


@dataclasses.dataclass(frozen=True)
class Catalog:
    specs: list[ModelSpec]
    single: bool  # one model, given at startup, nothing on demand: serving ends if it fails (as ever)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]


def split_entry(entry: str) -> tuple[Optional[str], str]:
    """"NAME=PATH" -> (NAME, PATH); a plain path or hub id -> (None, it)."""
    name, sep, path = entry.partition("=")
    if sep and name and path and "/" not in name and "\\" not in name and not Path(entry).exists():
        return name, path
    return None, entry


def build_catalog(settings: Settings) -> Catalog:
    """Every model the server knows (ValueError naming the problem: a name given twice, a bad
    models-config entry, a missing --models-dir)."""
    entries = settings.model_entries()
    keep_set = "keep_alive" in settings.model_fields_set
    # Models given at startup stay loaded unless --keep-alive was set (a one-model server that
    # unloads its model after five idle minutes would make the next user wait for a load).
    startup_keep = settings.keep_alive if keep_set else None
    specs: dict[str, ModelSpec] = {}

    def add(spec: ModelSpec) -> None:
        if spec.name in specs:
            raise ValueError(f"two models are named {spec.name!r} ({specs[spec.name].source} and {spec.source}): "
                             "name one of them with NAME=PATH")
        specs[spec.name] = spec

    for entry in entries:
        name, path = split_entry(entry)
        if name is None:
            name = settings.served_model_name if len(entries) == 1 and settings.served_model_name else path
        add(ModelSpec(name, model_settings(settings, {"model": path}, name), "argument", True, startup_keep))
    if settings.models_dir is not None:
        for name, path in scan_models_dir(settings.models_dir):
            add(ModelSpec(name, model_settings(settings, {"model": path}, name), "models-dir", False,
                          settings.keep_alive))
    if settings.models_config is not None:
        for name, values in read_models_config(settings.models_config).items():
            values = dict(values)
            preload = values.pop("preload", None)
            keep = values.pop("keep_alive", None)
            known = specs.get(name)
            if known is None and "model" not in values:
                raise ValueError(f"--models-config: {name!r} names no model (give model: PATH) and is no MODEL "
                                 "argument or --models-dir model")
            base = {"model": known.settings.model} if known is not None else {}
            merged = model_settings(settings, {**base, **values}, name)
            if keep is not None:
                from ..config import parse_duration

                keep = float(parse_duration(keep))
            spec = ModelSpec(
                name, merged, known.source if known is not None else "models-config",
                bool(preload) if preload is not None else (known.preload if known is not None else False),
                keep if keep is not None else (known.keep_alive if known is not None else settings.keep_alive))
            specs[name] = spec
    if not specs:  # nothing given: the built-in default, as a one-model server always served
        name = settings.display_name()
        specs[name] = ModelSpec(name, model_settings(settings, {}, name), "default", True, startup_keep)
    single = len(specs) == 1 and settings.models_dir is None and next(iter(specs.values())).preload
    return Catalog(list(specs.values()), single)


def model_settings(settings: Settings, update: dict[str, Any], name: str) -> Settings:
    """The server's settings with `update` over them, validated as Settings (a bad value is refused
    as a flag would be), served as `name`."""
    bad = sorted(set(update) & SERVER_ONLY - {"model"})
    if bad:
        raise ValueError(f"model {name!r}: {', '.join(bad)} belong to the server, not to one model")
    unknown = sorted(set(update) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"model {name!r}: unknown settings {', '.join(unknown)}")
    values = {k: getattr(settings, k) for k in Settings.model_fields}
    values.update(update, served_model_name=name, models=[])
    try:
        return Settings(**values)
    except ValueError as exc:
        raise ValueError(f"model {name!r}: {' '.join(str(exc).split())}") from None


def scan_models_dir(folder: str) -> list[tuple[str, str]]:
    """(name, path) of each model under `folder`: a folder with a config.json (HF layout) by its
    name, a .gguf file by its name without .gguf; sorted by name."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"--models-dir {folder}: no such folder")
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and (child / "config.json").is_file():
            found.append((child.name, str(child)))
        elif child.is_file() and child.suffix == ".gguf":
            found.append((child.stem, str(child)))
    return found


def read_models_config(path: str) -> dict[str, dict[str, Any]]:
    """{name: {setting: value}} from a YAML (.yaml/.yml) or TOML (.toml) file; dashes in a
    setting's name read as underscores (max-model-len = max_model_len)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ValueError(f"--models-config {path}: {exc.strerror or exc}") from None
    try:
        if file.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - the parser's message names the line
        raise ValueError(f"--models-config {path}: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if isinstance(data, dict) and isinstance(data.get("models"), dict) and len(data) == 1:
        data = data["models"]  # a top-level "models:" table is accepted too
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--models-config {path}: expected a mapping of model names to their settings")
    out = {}
    for name, values in data.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"--models-config {path}: {name!r} is not a model name (letters, digits, . _ - : @ +)")
        out[name] = {str(k).replace("-", "_"): v for k, v in values.items()}
    return out
