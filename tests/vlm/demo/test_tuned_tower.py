"""A stage with `vision.freeze=false` (an option the demo may use): the tower trains at `train.lr_vision`,
the checkpoint keeps its tuned weights and the export carries them, so captions use the tuned tower."""

from __future__ import annotations

import torch


def test_unfrozen_tower_trains_and_the_export_carries_it(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    from vlm.config import to_typed
    from vlm.export.load import load_exported
    from vlm.export.write import export
    from vlm.model.vision import build_vision
    from vlm.train.run import train

    overrides = (
        "vision.freeze=false",
        "data.cache_features=false",
        "train.max_steps=2",
        "train.lr_vision=1e-2",
    )
    cfg = tiny_cfg(*overrides)
    result = train(cfg)
    initial = build_vision(to_typed(cfg).vision).visual.state_dict()  # the seeded tower it started from
    tuned = result["module"].vlm.vision.visual.state_dict()
    changed = [k for k, v in initial.items() if not torch.equal(v, tuned[k])]
    assert "conv1.weight" in changed  # stage 1 has lr_lora=0: the tower needs its own rate (lr_vision)

    out = export(result["last_checkpoint"], tmp_path / "export")
    saved = load_file(out / "vision.safetensors")
    assert set(saved) == set(tuned)
    for k, v in tuned.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    loaded = load_exported(out).vlm.vision.visual.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], tuned["conv1.weight"], rtol=0, atol=0)
