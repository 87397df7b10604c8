"""Evaluate an official released checkpoint through the harness: parameters, GMACs, samples, FID, one CSV row.

    python -m bench.official --backbone dit --size XL --patch-size 2 --checkpoint DiT-XL-2-256x256.pt \\
        --image-size 256 --vae stabilityai/sd-vae-ft-ema --reference VIRTUAL_imagenet256_labeled.npz \\
        --num-samples 50000 --sampler ddpm --steps 250 --cfg-scale 1.5

The model is built from the registry at the given preset and data shape (latent: image size / 8, 4 channels, when
``--vae`` is given; pixels otherwise), the weights are loaded strictly with ``weights_only=True`` through the
backbone module's official key mapping (``from_official_state_dict`` where the names differ; DiT's need none), and
the shared sampler draws ``--num-samples`` images with uniformly random labels (DiT's ``sample_ddp.py``), decoded
through the VAE. The samples are written as the ADM evaluator's ``.npz`` (uint8 NHWC ``arr_0``), FID is computed
against the reference statistics (an ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz``, or a
``python -m bench.fid ref`` file), and a row keyed by the checkpoint's content hash and the protocol goes to
``<results-dir>/<dataset>/runs.csv`` with the same columns as a sweep point (train_* columns empty: not trained
here). ``--set key=value`` passes extra constructor arguments (e.g. ``--set wkv_variant=official`` for
Diffusion-RWKV's released weights). Errors end with one line naming the problem (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import backbones
from diffusion.config import ConfigError, check_cfg_scale
from diffusion.sampling import SAMPLERS, sample_images, save_grid, save_npz, to_uint8


def file_digest(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:length]


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def latent_shape(vae: Any, image_size: int) -> tuple[int, int]:
    """(latent size, channels) of ``image_size`` images through ``vae`` (SD VAEs: 256 -> 32, 4 channels)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ConfigError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    return image_size // factor, int(vae.config.latent_channels)


def build_official(args: argparse.Namespace, vae: Any = None) -> torch.nn.Module:
    """The registered backbone at the checkpoint's shape, with the official weights loaded strictly."""
    import importlib

    from backbones.dit import load_official_checkpoint

    size, channels = latent_shape(vae, args.image_size) if vae is not None else (args.image_size, 3)
    kwargs = dict(size=args.size, input_size=size, in_channels=channels, num_classes=args.num_classes,
                  learn_sigma=not args.fixed_sigma, **parse_sets(args.set))
    if args.patch_size is not None:
        kwargs["patch_size"] = args.patch_size
    model = backbones.build(args.backbone, **kwargs)
    module = importlib.import_module(type(model).__module__)
    load_official_checkpoint(model, args.checkpoint, convert=getattr(module, "from_official_state_dict", None))
    return model.eval()


def make_fid_scorer(reference: str, inception_weights: str | None, device: torch.device, progress: bool) -> Any:
    from bench.metrics import InceptionMetric

    return InceptionMetric.from_statistics(reference, inception_weights=inception_weights, device=device,
                                           progress=progress)


def evaluate(args: argparse.Namespace, scorer: Any | None = None) -> dict:
    """Build, sample, score and record; ``scorer`` (tests) replaces the Inception FID of ``--reference``."""
    from bench.fid import evaluation_labels
    from bench.flops import CONVENTION, forward_gmacs
    from bench.results_csv import upsert_row
    from bench.schema import RUN_COLUMNS
    from diffusion.latents import decode_latents, load_vae, vae_decoder_gmacs
    from runio.env import device_name, git_commit, resolve_device

    device = resolve_device(args.device)
    t0 = time.time()
    vae = load_vae(args.vae, device) if args.vae else None
    model = build_official(args, vae).to(device)
    gmacs = forward_gmacs(model, model.input_size, model.in_channels)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.backbone} {model.arch}: {params / 1e6:.2f}M params, {gmacs:.2f} GMACs ({CONVENTION})")
    vae_gmacs = vae_decoder_gmacs(vae, (model.in_channels, model.input_size, model.input_size)) if vae else None
    if vae is not None:
        print(f"VAE decoder {args.vae}: {vae_gmacs:.1f} GMACs per image (reported apart from the backbone)")
    if scorer is None:
        scorer = make_fid_scorer(args.reference, args.inception_weights, device, not args.no_progress)
    if model.num_classes == 0 and args.cfg_scale > 1:
        raise ConfigError(f"--cfg-scale {args.cfg_scale}: the checkpoint is unconditional (no classes); use 1")
    labels = evaluation_labels(args.num_samples, max(model.num_classes, 1), "uniform", args.seed)  # DiT's protocol
    ts = time.time()
    samples = sample_images(model, labels, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                            seed=args.seed, batch_size=args.batch_size, device=device,
                            progress=not args.no_progress, clip_denoised=vae is None)
    if vae is not None:
        samples = decode_latents(vae, samples, float(getattr(vae.config, "scaling_factor", 0.18215)))
    sample_rate = len(labels) / (time.time() - ts)
    images = to_uint8(samples)
    ckpt_hash = file_digest(Path(args.checkpoint))
    protocol = dict(num_samples=args.num_samples, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                    seed=args.seed, labels="uniform", vae=args.vae, reference=Path(args.reference).name
                    if args.reference else "custom")
    point_key = (f"official-{args.backbone}-{args.size}-{args.dataset}{args.image_size}-{ckpt_hash}-"
                 f"{hashlib.sha256(repr(sorted(protocol.items())).encode()).hexdigest()[:10]}")
    out_dir = Path(args.results_dir) / args.dataset / "official"
    npz = save_npz(images, labels, Path(args.npz) if args.npz else out_dir / f"{point_key}.npz")
    save_grid(images[:40], out_dir / f"{point_key}.png", ncol=10)
    scores = scorer.score(images, labels)
    arch = model.arch
    row = {c: "" for c in RUN_COLUMNS}
    row.update({
        "point_key": point_key, "run_key": f"official-{ckpt_hash}", "recipe_key": "official",
        "dataset": args.dataset, "image_size": model.input_size, "channels": model.in_channels,
        "backbone": args.backbone, "size": arch.get("size", ""), "patch": arch.get("patch") or "",
        "depth": arch.get("depth", ""), "width": arch.get("width", ""), "params": params, "gmacs": gmacs,
        "vae_gmacs": vae_gmacs if vae_gmacs is not None else "",
        "metric_name": scores["metric_name"], "metric_value": scores["metric_value"],
        "classifier_accuracy": scores.get("classifier_accuracy", ""), "num_samples": args.num_samples,
        "sampler": args.sampler, "sample_steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
        "sample_img_per_s": sample_rate, "device": device_name(device), "torch_version": torch.__version__,
        "git_commit": git_commit(), "wall_time_s": time.time() - t0, "status": "ok", "error": "",
        "run_dir": str(Path(args.checkpoint).resolve()),
    })
    csv_path = Path(args.results_dir) / args.dataset / "runs.csv"
    upsert_row(csv_path, row)
    print(f"{scores['metric_name']} = {scores['metric_value']:.4f} over {args.num_samples} samples; samples {npz}; "
          f"row {point_key} -> {csv_path}")
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, choices=backbones.available())
    p.add_argument("--size", required=True, help="preset of the checkpoint (XL, L, ...; DiMR: XL/2R)")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--checkpoint", required=True, help="the official weights file (loaded weights-only)")
    p.add_argument("--image-size", type=int, default=256, help="pixel resolution of the samples")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--fixed-sigma", action="store_true", help="the model predicts epsilon only (official DiMR)")
    p.add_argument("--vae", default=None, help="VAE (hub name or directory) for latent models; omit for pixels")
    p.add_argument("--reference", default=None, help="reference statistics .npz (mu, sigma): ADM batch or bench.fid")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--dataset", default="imagenet", help="dataset name of the CSV row")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra constructor argument")
    p.add_argument("--npz", default=None, help="where to write the ADM .npz (default: under results)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_cfg_scale(args.cfg_scale, "--cfg-scale")
        for flag, value in (("--steps", args.steps), ("--num-samples", args.num_samples)):
            if value < 1:
                raise ConfigError(f"{flag}={value} is out of range: an integer >= 1")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        if args.reference is None:
            raise ConfigError("--reference is required: the FID reference statistics (.npz with mu and sigma), e.g. "
                              "ADM's VIRTUAL_imagenet256_labeled.npz")
        evaluate(args)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
