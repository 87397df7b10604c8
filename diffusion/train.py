"""Train one backbone with the shared ADM trainer.

    python -m diffusion.train dataset=fashion_mnist                       # CPU-sized defaults, a few minutes
    python -m diffusion.train backbone=rwkv dataset=digits train.steps=300
    python -m diffusion.train resume=runs/fashion_mnist/latest train.steps=1000      # continue (more steps)
    python -m diffusion.train --help

Errors in the config, the data or the run directory end with one line naming the problem and the fix (exit 2);
Ctrl-C stops after the current step, writes a checkpoint and prints how to resume (exit 130).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import diffusion.config  # noqa: F401  (registers the structured schemas)
from diffusion.trainer import Interrupted, resume_config, train

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, KeyError)


def run_cli(cfg: DictConfig) -> int:
    try:
        if cfg.resume:
            cfg = resume_config(cfg.resume, list(HydraConfig.get().overrides.task))
        summary = train(cfg)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before the first step; nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        logging.getLogger(__name__).debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {summary['run_dir']}  (key {summary['key']})  step {summary['steps']}  "
          f"final loss {summary['final_loss']:.4f}  {summary['train_img_per_s']:.1f} img/s"
          + (f"\nsamples: {summary['samples']}" if "samples" in summary else ""))
    return 0


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run_cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
