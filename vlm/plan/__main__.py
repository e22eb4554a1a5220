"""`python -m vlm.plan gpu=l4 [model=...] [train=stage2_lora] [format=json] [output=FILE]`."""

from __future__ import annotations

import sys
from pathlib import Path

from vlm.util.cli import hydra_cli


def run(cfg) -> int:
    from vlm.config import to_typed
    from vlm.plan.planner import plan_memory, render
    from vlm.util.files import atomic_write

    cfg = to_typed(cfg)
    text = render(cfg, plan_memory(cfg))
    if cfg.output:
        atomic_write(Path(cfg.output), text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    hydra_cli("plan", run)
