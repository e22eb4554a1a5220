"""The pinned stack imports together: the registry torch build with a working torchvision."""

from __future__ import annotations

import importlib


def test_core_libraries_import():
    for name in [
        "torchvision",
        "open_clip",
        "decord",
        "bitsandbytes",
        "triton",
        "peft",
        "lightning",
        "hydra",
    ]:
        importlib.import_module(name)


def test_torchvision_ops_registered():
    # The CPU-only torch wheel in pip's user find-links breaks exactly this (torchvision::nms).
    import torch
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_pinned_versions():
    import torch
    import transformers

    assert torch.__version__.startswith("2.13.0")
    assert transformers.__version__.startswith("5.23.")
