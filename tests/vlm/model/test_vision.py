"""Vision towers behind one interface: every conf/vision YAML builds offline with random weights and gives
the patch tokens the projector expects; OpenAI weights need QuickGELU; cache keys follow the weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from projector import build_projector
from vlm.config.schema import VisionConfig
from vlm.model.vision import TOWERS, build_clip, build_vision, check_activation

CONF = Path(__file__).resolve().parents[3] / "conf" / "vision"
# yaml -> (tower type, patch grid, width Dv, activation the tag needs)
EXPECT = {
    "tiny": ("open_clip", (8, 8), 128, None),
    "vit_b_16": ("open_clip", (14, 14), 768, "QuickGELU"),
    "vit_l_14": ("open_clip", (16, 16), 1024, "QuickGELU"),
    "siglip2_so400m": ("open_clip_timm", (24, 24), 1152, "GELU"),
}


def vision_cfg(name: str, **changes) -> VisionConfig:
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(VisionConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    )
    return replace(cfg, **changes)


def test_every_yaml_is_covered():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(EXPECT)
    assert set(TOWERS) == {"open_clip", "open_clip_timm"}


@pytest.mark.parametrize("name", EXPECT)
def test_builds_offline_and_feeds_the_projector(name):
    kind, grid, width, _ = EXPECT[name]
    cfg = vision_cfg(name, pretrained=None)  # architecture only: random seeded weights, no download
    tower = build_vision(cfg)
    assert type(tower).__name__ == {"open_clip": "ClipViT", "open_clip_timm": "TimmTrunk"}[kind]
    assert (tower.grid, tower.width, tower.image_size) == (grid, width, (cfg.image_size,) * 2)
    assert tower.frozen and not any(p.requires_grad for p in tower.parameters())
    frames = torch.randint(0, 256, (1, 2, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        feats = tower(frames)
    assert feats.shape == (1, 2, grid[0] * grid[1], width)  # (B, T, P, Dv): patch tokens, no class token
    proj = build_projector(
        {"type": "mlp2x_gelu", "pool": 4, "max_frames": 8, "hidden_mult": 1}, width, 32, grid
    )
    assert proj(feats).shape == (1, 2 * 16, 32)


@pytest.mark.parametrize("name", [n for n, e in EXPECT.items() if e[3]])
def test_activation_matches_the_tag(name):
    import open_clip

    cfg = vision_cfg(name)
    check_activation(cfg)  # the shipped YAML is consistent with its tag
    want_quick = EXPECT[name][3] == "QuickGELU"
    assert bool(open_clip.get_model_config(cfg.arch).get("quick_gelu", False)) == want_quick
    tower = build_vision(replace(cfg, pretrained=None))
    acts = {type(m).__name__ for m in tower.modules()}
    assert ("QuickGELU" in acts) == want_quick


def test_openai_weights_in_a_gelu_tower_are_refused():
    cfg = vision_cfg("vit_l_14", arch="ViT-L-14")  # plain GELU with the OpenAI tag: distorted features
    with pytest.raises(
        ValueError,
        match=r"ViT-L-14 uses GELU but the 'openai' weights were trained with QuickGELU: use vision\.arch=ViT-L-14-quickgelu",
    ):
        build_vision(cfg)


def test_local_weights_load_and_change_the_cache_key(tmp_path):
    cfg = vision_cfg("tiny")
    base = build_vision(cfg)
    assert build_vision(cfg).cache_key == base.cache_key  # seeded: the same tower twice
    assert build_vision(replace(cfg, init_seed=1)).cache_key != base.cache_key
    assert build_vision(replace(cfg, feature_layer=-2)).cache_key != base.cache_key
    clip = build_clip(cfg)
    with torch.no_grad():
        clip.visual.conv1.weight.add_(0.5)
    whole, visual_only = tmp_path / "clip.safetensors", tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, whole)
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, visual_only)
    a, b = (
        build_vision(replace(cfg, weights=str(whole))),
        build_vision(replace(cfg, weights=str(visual_only))),
    )
    got = a.visual.state_dict()
    assert got.keys() == clip.visual.state_dict().keys()
    for k, v in clip.visual.state_dict().items():  # every tensor the file's, none left on the meta device
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert a.cache_key == b.cache_key != base.cache_key
    half = tmp_path / "half.safetensors"  # a 16-bit file gives the tower the dtype a built one has
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in clip.visual.state_dict().items()}, half)
    assert {p.dtype for p in build_vision(replace(cfg, weights=str(half))).parameters()} == {torch.float32}
