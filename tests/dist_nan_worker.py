"""Run under torchrun by tests/test_distributed.py: rank 1 alone produces a NaN loss at step 3."""

import os
import sys
from pathlib import Path

import torch
from helpers import DivergingDiT  # noqa: F401  (registers test_diverging; the script's folder is on sys.path)

from diffusion.config import compose
from diffusion.trainer import DivergenceError, train


def main(run_dir: str, report: str) -> None:
    torch.set_num_threads(1)
    cfg = compose("train", ["dataset=digits", "backbone=dit", "backbone.depth=1", "backbone.hidden_size=32",
                            "backbone.num_heads=2", "train.batch_size=8", "train.steps=6", "train.ckpt_every=2",
                            "sample.per_class=0", "progress=false", f"run_dir={run_dir}"])
    cfg.backbone.name = "test_diverging"
    os.environ["NAN_ONLY_ON_RANK"] = "1"
    try:
        train(cfg)
        outcome = "finished"
    except DivergenceError as e:
        outcome = f"diverged: {e}"
    Path(f"{report}.{os.environ['RANK']}").write_text(outcome)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
