"""Draw class-conditional samples from a trained run to a PNG grid (class names on the columns) and an .npz
(ADM evaluator layout: uint8 NHWC ``arr_0`` plus ``labels``).

    python -m diffusion.sample runs/fashion_mnist/latest --sampler ddim --steps 50 --cfg-scale 2

``runs/<dataset>/latest`` links to the newest run directory of that dataset; any run directory works.

The diffusion settings (schedule, number of steps) come from the run's own typed config; bad options end with
one line naming the problem (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffusion.config import ConfigError, check_cfg_scale
from diffusion.sampling import SAMPLERS, class_grid_labels, sample_images, save_grid, save_npz
from diffusion.trainer import build_from_checkpoint, load_checkpoint
from runio.env import resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run directory or .pt checkpoint written by diffusion.train")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (respaced)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guided-channels", type=int, default=None,
                   help="guide only the first N channels (3 = DiT's published variant; default all)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (grid rows)")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="class labels (default: first 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to [-1, 1] (default: on for pixel data, off for VAE latents, as DiT)")
    p.add_argument("--no-ema", action="store_true", help="sample the raw model instead of the EMA weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output stem (default: <run dir>/samples-<sampler><steps>)")
    args = p.parse_args(argv)

    try:
        check_cfg_scale(args.cfg_scale, "--cfg-scale")
        for flag, value in (("--steps", args.steps), ("--per-class", args.per_class)):
            if value < 1:
                raise ConfigError(f"{flag}={value} is out of range: an integer >= 1")
        ckpt = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, RuntimeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model = build_from_checkpoint(ckpt, use_ema=not args.no_ema).to(device)
    train_cfg = ckpt["config"]["train"]
    if args.classes:
        bad = [c for c in args.classes if not 0 <= c < model.num_classes]
        if bad:
            print(f"error: classes {bad} outside [0, {model.num_classes})", file=sys.stderr)
            return 2
        labels = torch.tensor(args.classes).repeat(args.per_class)
        columns = list(args.classes)
    else:
        labels = class_grid_labels(model.num_classes, args.per_class)
        columns = list(range(min(model.num_classes, 10)))
    from diffusion.data import class_names

    names = class_names(train_cfg["dataset"]["name"])
    from diffusion.data import DatasetError
    from diffusion.latents import VAEError, latent_store

    try:
        store = latent_store(train_cfg["dataset"])  # a latent run decodes its samples through the store's VAE
    except (DatasetError, VAEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = args.clip if args.clip is not None else store is None
    ncol = len(columns)
    images = sample_images(model, labels, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                           seed=args.seed, noise_schedule=train_cfg["diffusion"]["noise_schedule"],
                           diffusion_steps=train_cfg["diffusion"]["diffusion_steps"], device=device, progress=True,
                           guided_channels=args.guided_channels, clip_denoised=clip)
    if store is not None:
        images = store.decode(images, device)
    ckpt_path = Path(args.checkpoint)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
    stem = Path(args.out) if args.out else run_dir / f"samples-{args.sampler}{args.steps}-cfg{args.cfg_scale:g}"
    png = save_grid(images, stem.with_suffix(".png"), ncol=ncol,
                    class_names=[names[c] for c in columns] if names else None)
    npz = save_npz(images, labels, stem.with_suffix(".npz"))
    print(f"wrote {png} and {npz} ({len(labels)} samples, step {ckpt['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
