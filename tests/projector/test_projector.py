"""Projectors behind one interface and a registry: a type is one file + one YAML (mlp2x_gelu, linear)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from projector import PROJECTORS, build_projector

CONF = Path(__file__).resolve().parents[2] / "conf" / "projector"
GRID, DV, D = (4, 4), 16, 32


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_yaml_has_a_registered_type(name, compose):
    cfg = compose("train", [f"projector={name}"]).projector
    assert cfg.type == name and name in PROJECTORS
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert set(raw) - {"defaults"} == set(
        PROJECTORS[name][1].__dataclass_fields__
    )  # YAML = schema, key for key


@pytest.mark.parametrize(
    ("cfg", "params"),
    [
        (
            {"type": "mlp2x_gelu", "pool": 2, "max_frames": 8, "hidden_mult": 1},
            DV * D + D + D * D + D + D + 8 * D,
        ),
        ({"type": "linear", "pool": 2, "max_frames": 8}, DV * D + D + D + 8 * D),
    ],
)
def test_tokens_shapes_and_parameters(cfg, params):
    torch.manual_seed(0)
    p = build_projector(cfg, DV, D, GRID, embed_scale=0.5)
    assert sum(x.numel() for x in p.parameters()) == params  # weights + gain + frame positions
    feats = torch.randn(2, 3, 16, DV)  # (B, T, P, Dv)
    out = p(feats)
    assert out.shape == (2, p.num_tokens(3), D) == (2, 12, D)
    prepared = p.prepare(feats)  # parameter-free: what the feature cache stores
    assert prepared.shape == (2, 3, 4, DV)
    torch.testing.assert_close(p(prepared, prepared=True), out)
    # 2x2 pooling keeps where things are: the top-left pooled token is the mean of the top-left 2x2 patches
    grid = feats.reshape(2, 3, 4, 4, DV)
    torch.testing.assert_close(prepared[:, :, 0], grid[:, :, :2, :2].mean((2, 3)))
    assert p.cache_spec() == {"prepare": "avg_pool2d", "grid": [4, 4], "pool": 2}


def test_metadata_rebuilds_the_same_projector():
    torch.manual_seed(0)
    p = build_projector({"type": "linear", "pool": 2, "max_frames": 8}, DV, D, GRID)
    meta = p.metadata()
    q = build_projector(meta["config"], meta["in_dim"], meta["out_dim"], tuple(meta["grid"]))
    q.load_state_dict(p.state_dict(), strict=True)
    x = torch.randn(1, 2, 16, DV)
    torch.testing.assert_close(q(x), p(x))


def test_frame_order_changes_the_tokens():
    torch.manual_seed(0)
    p = build_projector({"type": "linear", "pool": 1, "max_frames": 8}, DV, D, GRID, embed_scale=1.0)
    x = torch.randn(1, 2, 16, DV)
    swapped = p(x.flip(1))
    assert not torch.allclose(swapped, p(x).flip(1))  # the frame position embedding tells frames apart


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"projector.type='conv': not one of \['linear', 'mlp2x_gelu'\]"):
        build_projector({"type": "conv", "pool": 2, "max_frames": 8}, DV, D, GRID)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['hidden_mult'\]"):
        build_projector({"type": "linear", "pool": 2, "max_frames": 8, "hidden_mult": 2}, DV, D, GRID)
    p = build_projector({"type": "linear", "pool": 2, "max_frames": 2}, DV, D, GRID)
    with pytest.raises(ValueError, match=r"3 frames exceed projector\.max_frames=2"):
        p(torch.zeros(1, 3, 16, DV))
