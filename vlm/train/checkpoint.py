"""Checkpoints as safetensors + JSON (never pickle), and a `last` that always names a complete one.

Lightning hands its checkpoint dict (state_dict, optimizer and scheduler states, loop progress,
callback states) to a `CheckpointIO`. Ours stores it as a directory: every tensor in
`tensors.safetensors` under its path in the dict, everything else in `state.json` with tensors
replaced by references. The LightningModule trims `state_dict` to what was trained (projector +
LoRA), so a checkpoint of an 8B run is megabytes, not gigabytes.

Publishing: a checkpoint is written in full under a temporary name and renamed to `step_NNNNNN`; then
`last`, a symlink, is swapped to it with one `os.replace`. A crash at any moment leaves `last` naming
the previous complete checkpoint (or the new one). The final step is always saved, as is the step at
which SIGTERM/SIGINT stopped the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlm.util.errors import RunFailure, UsageError
from vlm.util.files import publish_dir, swap_link, temp_dir_beside

TENSOR = "__tensor__"
INT_KEYS = "__int_keys__"
TUPLE = "__tuple__"
LAST = "last"


class CheckpointError(UsageError):
    """A checkpoint directory that cannot be used: names the file and the reason."""


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
    """Write `checkpoint` as a directory at `path`, complete before it appears under that name."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    state = _flatten(checkpoint, "", tensors)
    try:
        tmp = temp_dir_beside(path)
        try:
            save_file(tensors, tmp / "tensors.safetensors")
            (tmp / "state.json").write_text(json.dumps(state, ensure_ascii=False, indent=1))
            publish_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (OSError, SafetensorError) as e:  # the previous checkpoint (and `last`) are untouched
        why = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise RunFailure(
            f"checkpoint {path}: cannot write ({why}); `last` still names the previous one"
        ) from None


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part only (step, epoch, config): cheap, no tensors loaded. Raises CheckpointError."""
    path = Path(path)
    state_file = path / "state.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a kovicap checkpoint (no state.json)")
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file}: damaged ({' '.join(str(e).split())})") from None


def load_dir(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint directory back as Lightning's dict; a missing or damaged file is a CheckpointError."""
    path = Path(path)
    state = read_state(path)
    tensor_file = path / "tensors.safetensors"
    try:
        tensors = load_file(tensor_file)
    except FileNotFoundError:
        raise CheckpointError(f"{tensor_file}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tensor_file}: damaged ({' '.join(str(e).split())})") from None
    try:
        return _unflatten(state, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: state.json names tensor {e} that tensors.safetensors lacks") from None


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


class StepCheckpoint(ModelCheckpoint):
    """`step_NNNNNN` directories every `every` steps, at the last step and at a stop; `last` links the newest."""

    FILE_EXTENSION = ""  # checkpoints are directories
    CHECKPOINT_NAME_LAST = LAST

    def __init__(self, dirpath: Path, every: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step_{step:06d}",  # no "=": paths stay usable as Hydra override values
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=-1,
            save_last="link",
            enable_version_counter=False,
        )

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            swap_link(filepath, linkpath)  # never a moment without `last`
        trainer.strategy.barrier()

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
            self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        # The last step (max_steps, or a stop a signal asked for) is saved here, at the same point in the
        # loop as the periodic ones (before this step's scheduler update), so resuming from it continues
        # exactly as the uninterrupted run does.
        if trainer.should_stop or trainer.global_step >= trainer.max_steps:
            self._save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)  # any other way the loop ended
        super().on_train_end(trainer, pl_module)
