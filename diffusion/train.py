"""Train a backbone: ``python -m diffusion.train backbone=dit dataset=fashion_mnist train.steps=500``."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from diffusion.trainer import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = train(cfg)
    logging.getLogger(__name__).info("done: %s", summary)
    print(f"run directory: {summary['run_dir']}  final loss {summary['final_loss']:.4f}  "
          f"{summary['train_img_per_s']:.1f} img/s" + (f"  samples: {summary['samples']}" if "samples" in summary
                                                       else ""))


if __name__ == "__main__":
    main()
