"""Vision towers behind one interface (`base.VisionTower`), chosen by `vision.type`; `build_vision` makes one.

A new tower is one file here (registered with `@register`) plus one conf/vision/<name>.yaml; modules are
found by listing this package. Weights: an open_clip pretrained tag (downloaded once), a local safetensors
file (`vision.weights`: the tower's own state dict, or a whole open_clip model's), or random seeded
weights when `pretrained` is null. OpenAI's weights need QuickGELU: a tower whose activation does not
match its tag is refused instead of silently producing distorted features.
"""

from __future__ import annotations

import importlib
import pkgutil

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from vlm.config.schema import VisionConfig
from vlm.model.vision.base import VisionTower
from vlm.model.vision.registry import TOWERS, lookup

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["TOWERS", "VisionTower", "build_clip", "build_vision", "model_config"]


def model_config(cfg: VisionConfig) -> dict:
    """open_clip's model config (embed_dim, vision_cfg, text_cfg, quick_gelu) for a vision config."""
    if cfg.arch is None:
        if cfg.model_cfg is None:
            raise ValueError("vision: give `arch` (an open_clip model name) or `model_cfg`")
        return dict(cfg.model_cfg)
    mc = open_clip.get_model_config(cfg.arch)
    if mc is None:
        raise ValueError(f"vision.arch={cfg.arch!r}: not an open_clip model name")
    return mc


def check_activation(cfg: VisionConfig) -> None:
    """OpenAI-tagged weights were trained with QuickGELU; loading them into a GELU tower is an error."""
    if cfg.arch is None or cfg.pretrained is None:
        return
    tag = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained)
    if not tag:
        raise ValueError(f"vision.pretrained={cfg.pretrained!r} is not a known tag of {cfg.arch}")
    want, have = bool(tag.get("quick_gelu", False)), bool(model_config(cfg).get("quick_gelu", False))
    if want != have:
        fix = f"{cfg.arch}-quickgelu" if want else cfg.arch.removesuffix("-quickgelu")
        raise ValueError(
            f"vision.arch={cfg.arch} uses {'QuickGELU' if have else 'GELU'} but the {cfg.pretrained!r} weights "
            f"were trained with {'QuickGELU' if want else 'GELU'}: use vision.arch={fix}"
        )


def _visual_arch(cfg: VisionConfig) -> nn.Module:
    """The vision tower alone (no text tower, no download), initialised however the current device does."""
    from open_clip.model import _build_vision_tower

    mc = model_config(cfg)
    return _build_vision_tower(
        mc["embed_dim"], mc["vision_cfg"], quick_gelu=bool(mc.get("quick_gelu", False))
    )


def _random_visual(cfg: VisionConfig) -> nn.Module:
    """The vision tower with seeded random weights."""
    torch.manual_seed(cfg.init_seed)
    return _visual_arch(cfg)


def load_weights(visual: nn.Module, path: str) -> None:
    """A tower's state dict, or a whole open_clip model's (its `visual.*` entries), strictly, into a tower
    built on the meta device: the file's tensors become its parameters (in the default dtype, as a
    tower built on the CPU holds them), so no random init is drawn only to be overwritten (~15 s for
    SigLIP2 so400m on a CPU core, measured in the a100 tier's run)."""
    state = load_file(path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    dtype = torch.get_default_dtype()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    visual.load_state_dict(state, strict=True, assign=True)
    unset = [n for n, t in [*visual.named_parameters(), *visual.named_buffers()] if t.is_meta]
    if unset:  # a buffer the state dict does not carry (none in open_clip's or timm's towers today)
        raise ValueError(f"vision.weights={path}: no value for {unset[0]} of {type(visual).__name__}")


def build_vision(cfg: VisionConfig) -> VisionTower:
    """The tower `cfg` describes, with its weights, frozen unless `cfg.freeze` is false."""
    check_activation(cfg)
    if cfg.weights is not None:
        with torch.device("meta"):
            visual = _visual_arch(cfg)
        load_weights(visual, cfg.weights)
    elif cfg.pretrained is not None:
        visual = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained).visual
    else:
        visual = _random_visual(cfg)
    tower = lookup(cfg.type)(visual, cfg)
    tower.cache_key = tower.fingerprint()
    return tower


def build_clip(cfg: VisionConfig) -> nn.Module:
    """The whole open_clip CLIP model (text tower included) with random seeded weights: the demo's
    contrastive warm-up trains it; its `visual` is the same seeded tower `build_vision` makes."""
    mc = model_config(cfg)
    torch.manual_seed(cfg.init_seed)
    return open_clip.CLIP(
        embed_dim=mc["embed_dim"], vision_cfg=mc["vision_cfg"], text_cfg=mc["text_cfg"],
        quick_gelu=bool(mc.get("quick_gelu", False)),
    )  # fmt: skip


def build_vision_on_meta(cfg: VisionConfig) -> VisionTower:
    """The tower's module with no storage (the planner's counts): no weights, no download."""
    with torch.device("meta"):
        return lookup(cfg.type)(_visual_arch(cfg), cfg)
