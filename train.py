"""Training entry point: compose the Hydra config, then hand it to `vlm.training.train`.

python train.py gpu=l4 data=synth train=stage1_projector
python train.py --cfg job gpu=l4          # show the composed config and exit
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from vlm.training import train  # imported here so `--cfg job` needs no torch start-up

    train(cfg)


if __name__ == "__main__":
    main()
