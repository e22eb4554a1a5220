"""Training entry point: compose the Hydra config, then hand it to `vlm.train.run.train`.

python train.py gpu=l4 data=custom data.root=/videos data.train=/videos/train.jsonl train=stage1_projector
python train.py gpu=l4 --cfg job          # show the composed config and exit
"""

from __future__ import annotations

from vlm.util.cli import hydra_cli


def run(cfg) -> int:
    from vlm.train.run import train  # imported here so `--cfg job` needs no torch start-up

    train(cfg)
    return 0


if __name__ == "__main__":
    hydra_cli("train", run)
