"""Checkpoint files: read a Hugging Face folder's tensors one at a time; write a prequantized one.

Reading never memory-maps safetensors files: each tensor is read with plain file reads into a
buffer of its own, so the process holds only the tensors still in use (an mmap would keep every
page it touched resident and counted in RSS until the file is closed). Headers are validated
when the folder is opened, so a corrupt or truncated file fails before anything is loaded.

    reader = CheckpointReader.open(folder)          # ValueError / FileNotFoundError, one line
    for name in reader.names: tensor = reader.read(name)

`save_checkpoint` writes the safetensors shards (+ index) of a state dict, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_READ_CHUNK = 1 << 30  # one read() syscall returns at most ~2 GiB on Linux


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, byte offset (absolute), dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _corrupt(path: Path, problem: str) -> ValueError:
    return ValueError(f"corrupt safetensors file {path}: {problem}")


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The entries of one .safetensors file, validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, too short for a header")
        header_len = int.from_bytes(head, "little")
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {header_len} does not fit in the file ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name!r}: {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != nbytes:
            raise _corrupt(path, f"{name!r}: offsets {begin}..{end} do not hold {info['dtype']}{list(shape)}")
        if end > data_size:
            raise _corrupt(path, f"{name!r} ends at byte {end} but the file holds {data_size} data bytes (truncated?)")
        entries[name] = TensorEntry(path, data_start + begin, nbytes, dtype, shape)
    return entries


class CheckpointReader:
    """The tensors of a checkpoint folder (safetensors, sharded or not, or PyTorch .bin files),
    in file order. `read(name)` returns a fresh CPU tensor in the file's dtype."""

    def __init__(self, entries: Mapping[str, TensorEntry | Path], files: list[Path]) -> None:
        self._entries = dict(entries)
        self.files = files
        self._handles: dict[Path, object] = {}
        self._bin_cache: tuple[Optional[Path], dict] = (None, {})

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def format(self) -> str:
        return "safetensors" if self.files[0].suffix == ".safetensors" else "pytorch .bin"

    @classmethod
    def open(cls, folder: Path) -> "CheckpointReader":
        files = find_weight_files(folder)
        if files[0].suffix == ".safetensors":
            entries: dict[str, TensorEntry | Path] = {}
            for path in files:
                for name, entry in sorted(read_safetensors_header(path).items(), key=lambda kv: kv[1].offset):
                    entries[name] = entry
            return cls(entries, files)
        entries = {}
        for path in files:
            for name in _load_bin(path):
                entries[name] = path
        return cls(entries, files)

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if isinstance(entry, Path):
            return self._read_bin(entry, name)
        handle = self._handles.get(entry.path)
        if handle is None:
            handle = self._handles[entry.path] = open(entry.path, "rb", buffering=0)
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        handle.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            got = handle.readinto(view[done : done + _READ_CHUNK])
            if not got:
                raise _corrupt(entry.path, f"{name!r} is cut short")
            done += got
        return buffer.view(entry.dtype).reshape(entry.shape)

    def _read_bin(self, path: Path, name: str) -> torch.Tensor:
        # A .bin file is one pickle: keep only the current file's (memory-mapped) dict alive.
        cached_path, tensors = self._bin_cache
        if cached_path != path:
            self._bin_cache = (None, {})
            tensors = _load_bin(path)
            self._bin_cache = (path, tensors)
        return tensors.pop(name).clone()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._bin_cache = (None, {})

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle, zip and torch errors all mean: not a readable checkpoint
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"PyTorch checkpoint {path} is not a flat dict of tensors")
    return state


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors preferred, then .bin; sharded via
    the index file when there is one."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{index} is not a valid checkpoint index (no weight_map)") from None
            files = sorted({folder / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that are not in the folder: {missing[:3]}")
            return files
        files = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("training_args"))
        if files:
            return files
    raise FileNotFoundError(f"no weights in {folder} (expected *.safetensors or pytorch_model*.bin)")


def save_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int = 4 * 2**30
) -> list[Path]:
    """Write tensors as safetensors shards (model.safetensors, or model-0000i-of-0000n.safetensors
    plus model.safetensors.index.json past `max_shard_bytes`), the names transformers reads."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
        total += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / n for n in names]


def replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

