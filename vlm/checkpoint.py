"""Checkpoints as safetensors + JSON (never pickle), written to a temporary name and renamed.

Lightning hands its checkpoint dict (state_dict, optimizer and scheduler states, loop progress,
callback states) to a `CheckpointIO`. Ours stores it as a directory: every tensor in
`tensors.safetensors` under its path in the dict, everything else in `state.json` with tensors
replaced by references. The LightningModule trims `state_dict` to what was trained (projector +
LoRA), so a checkpoint of an 8B run is megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors.torch import load_file, save_file

TENSOR = "__tensor__"
INT_KEYS = "__int_keys__"
TUPLE = "__tuple__"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):  # optimizer state is keyed by param index
            return {INT_KEYS: {str(k): _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        return {str(k): _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {TUPLE: [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint entry {path} has type {type(obj).__name__}, which is not JSON or a tensor")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if TENSOR in obj:
            return tensors[obj[TENSOR]]
        if INT_KEYS in obj:
            return {int(k): _unflatten(v, tensors) for k, v in obj[INT_KEYS].items()}
        if TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[TUPLE])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_dir(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `checkpoint` as a directory at `path`, atomically (temp dir + rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    state = _flatten(checkpoint, "", tensors)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, ensure_ascii=False, indent=1))
    publish_dir(tmp, path)


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename a finished directory over `path`; an old one is moved aside first, so a crash never
    leaves neither."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def load_dir(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a kovicap checkpoint (no state.json)")
    tensors = load_file(path / "tensors.safetensors")
    return _unflatten(json.loads((path / "state.json").read_text()), tensors)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part only (step, epoch, config): cheap, no tensors loaded."""
    return json.loads((Path(path) / "state.json").read_text())


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_dir(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_dir(path)

    def remove_checkpoint(self, path: Any) -> None:
        p = Path(path)
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
