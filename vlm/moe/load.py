"""Loading a Qwen3-MoE checkpoint straight into NF4 experts: no layer's experts ever exist in 16 bits whole.

transformers' `from_pretrained` would materialize every layer's experts in the compute dtype (54 GiB in
bf16 for Qwen3-30B-A3B) before anything could quantize them. Instead the loader
1. builds the model with `FusedMoeExperts` in place of `Qwen3MoeExperts` (`fused_experts_at_init`), so
   `from_pretrained` loads everything else (bitsandbytes quantizing the Linear layers as usual) and skips
   the experts' checkpoint tensors, which have no parameter to go to;
2. streams the experts from the safetensors shards (`stream_experts`): per layer and tensor, a few experts
   at a time are read in the checkpoint's dtype (the shards mapped only while one chunk is read), moved
   to the module's device and quantized there, so the transient is one chunk (64 MiB of 16-bit weights,
   see `nf4.CHUNK_BYTES`, and its scratch), far below one layer's experts (1.2 GB), and nothing else of
   the dense experts is ever held.
An NF4 checkpoint written by `vlm.model.decoder.save_nf4` holds the buffers themselves, which step 1
loads like any other weight (nothing is streamed or quantized).

Checkpoint layouts read: the hub's per-expert tensors (`...experts.{e}.gate_proj.weight`, `up_proj`,
`down_proj`, each `(out, in)`), and transformers' fused ones (`...experts.gate_up_proj` `(E, 2I, H)`,
`...experts.down_proj` `(E, H, I)`). gate_up stacks gate before up, as transformers' conversion does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlm.moe.integrate import check_activation
from vlm.moe.module import BackendName, FusedMoeExperts
from vlm.moe.nf4 import experts_per_chunk

NF4_BUFFERS = ("_q", "_absmax", "_absmax2", "_offset")
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


# transformers' load report should not list what the stream handles: the buffers it fills (missing) and
# the dense expert tensors it reads (unexpected). Regexes as `_keys_to_ignore_on_load_*` take them.
_STREAMED_MISSING = r"\.experts\.(gate_up_proj|down_proj)_(q|absmax|absmax2|offset)$"
_STREAMED_UNEXPECTED = r"\.experts\.(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)$"


@contextmanager
def fused_experts_at_init(backend: BackendName = "auto", streaming: bool = True) -> Iterator[None]:
    """While active, Qwen3-MoE blocks built by transformers get `FusedMoeExperts` (empty NF4 buffers).

    The name `Qwen3MoeExperts` in transformers' module is swapped for a factory whose instances are *not*
    of the factory's type, so transformers' own `isinstance(module, Qwen3MoeExperts)` (weight init) stays
    false for them. `streaming`: the experts will be streamed, so their buffers may be missing from the
    checkpoint and its dense expert tensors left over (kept out of transformers' load report). Process-wide
    while active: build one model at a time."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as modeling

    class _Factory:
        def __new__(cls, config) -> FusedMoeExperts:  # type: ignore[misc]
            check_activation("Qwen3MoeExperts", config)
            return FusedMoeExperts(
                config.num_experts, config.hidden_size, config.moe_intermediate_size, backend=backend
            )

    base = modeling.Qwen3MoePreTrainedModel
    saved = (
        modeling.Qwen3MoeExperts,
        base._keys_to_ignore_on_load_missing,
        base._keys_to_ignore_on_load_unexpected,
    )
    modeling.Qwen3MoeExperts = _Factory
    if streaming:
        base._keys_to_ignore_on_load_missing = [*(saved[1] or []), _STREAMED_MISSING]
        base._keys_to_ignore_on_load_unexpected = [*(saved[2] or []), _STREAMED_UNEXPECTED]
    try:
        yield
    finally:
        modeling.Qwen3MoeExperts = saved[0]
        base._keys_to_ignore_on_load_missing, base._keys_to_ignore_on_load_unexpected = saved[1:]


def is_expert_key(key: str) -> bool:
    """A dense expert tensor of the checkpoint (streamed, never loaded by transformers)."""
    return bool(_PER_EXPERT.match(key) or _FUSED.match(key))


def is_expert_buffer(key: str) -> bool:
    """An NF4 buffer of `FusedMoeExperts` (filled by streaming, or loaded from an NF4 checkpoint)."""
    return ".experts." in key and key.rsplit(".", 1)[-1].startswith(("gate_up_proj_", "down_proj_"))


def checkpoint_files(source: str, revision: str | None = None) -> list[Path]:
    """The safetensors shards of a model directory or (already downloaded) hub id."""
    root = Path(source)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no safetensors weights")
    return files


def expert_index(files: list[Path]) -> dict[str, Path]:
    """Every dense expert tensor of the checkpoint -> the shard holding it."""
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys() if is_expert_key(k)})  # noqa: SIM118 (no dict)
    return out


class _Reader:
    """Reads experts e0:e1 of one tensor from the shards, in the checkpoint's dtype."""

    def __init__(self, index: dict[str, Path], stack: ExitStack):
        self.index, self.stack, self.open = index, stack, {}

    def _file(self, key: str):
        f = self.index[key]
        if f not in self.open:
            self.open[f] = self.stack.enter_context(safe_open(str(f), framework="pt"))
        return self.open[f]

    def fused(self, module: str, part: str) -> bool:
        return f"{module}.{part}" in self.index

    def read(self, module: str, part: str, e0: int, e1: int) -> torch.Tensor:
        if self.fused(module, part):
            key = f"{module}.{part}"
            return self._file(key).get_slice(key)[e0:e1]  # (e, N, K)

        def stack(proj: str) -> torch.Tensor:
            keys = [f"{module}.{e}.{proj}.weight" for e in range(e0, e1)]
            return torch.stack([self._file(k).get_tensor(k) for k in keys])  # (e, out, in)

        if part == "down_proj":
            return stack("down_proj")
        return torch.cat((stack("gate_proj"), stack("up_proj")), dim=1)  # (e, 2I, H): gate first


def stream_experts(model: nn.Module, files: list[Path]) -> int:
    """Quantize every `FusedMoeExperts` of `model` from the dense expert tensors in `files`, layer by
    layer, a chunk of experts at a time, on each module's own device. Returns the layers filled."""
    index = expert_index(files)
    done = 0
    for name, module in model.named_modules():
        if not isinstance(module, FusedMoeExperts):
            continue
        for part in ("gate_up_proj", "down_proj"):
            build = module.quantizer(part)
            step = experts_per_chunk(*build.shape[1:])
            for e0 in range(0, module.num_experts, step):
                e1 = min(module.num_experts, e0 + step)
                # Shards are mapped for one chunk at a time: the pages read count in the resident set
                # while mapped, and a layer's worth of them would be 1.2 GB at Qwen3-30B-A3B's shape.
                with ExitStack() as stack:
                    try:
                        chunk = _Reader(index, stack).read(name, part, e0, e1)
                    except KeyError as err:
                        raise KeyError(
                            f"{name}: the checkpoint lacks {err} ({part} of experts {e0}-{e1 - 1})"
                        ) from None
                build.add(e0, chunk)
                del chunk
            module.set_nf4(part, build.finish())
        done += 1
    return done
