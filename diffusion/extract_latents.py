"""Encode a dataset once through a VAE into a latent store (see ``diffusion.latents`` for the format).

    python -m diffusion.extract_latents dataset=imagenet dataset.root=/data/imagenet/train vae=stabilityai/sd-vae-ft-ema
    torchrun --nproc_per_node=8 -m diffusion.extract_latents dataset=imagenet dataset.root=... out=latents/in256

Each process encodes the unfinished chunks ``c % world_size == rank`` (``RANK``/``WORLD_SIZE`` from torchrun or
Slurm; no collective communication, so ranks may also run as independent jobs) and marks each chunk done after
flushing it. Rerunning the same command resumes; a different recipe for the same ``out=`` is refused. Errors end
with one line naming the problem (exit 2).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from diffusion.config import ConfigError, DatasetConfig, plain_error, to_plain

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: str = "train"
    vae: str = "stabilityai/sd-vae-ft-ema"  # hub name (from the local hub cache, or downloaded when online) or a dir
    out: Optional[str] = None       # None = latents/<dataset><size>-<vae name>
    flips: bool = True              # also store the horizontally flipped images' posteriors (dataset.random_flip)
    dtype: str = "float32"          # float32 | float16 (halves the store; ImageNet-256 with flips: 84 GB vs 42 GB)
    chunk_size: int = 1024          # images per resumable unit
    batch_size: int = 32            # images per VAE forward
    limit: Optional[int] = None     # encode only the first N images (trials)
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = True


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)


def _world() -> tuple[int, int]:
    from runio.dist import _from_slurm

    _from_slurm()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def validate_extract(cfg: DictConfig) -> DictConfig:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExtractConfig), OmegaConf.create(to_plain(cfg)))
    except Exception as e:
        raise ConfigError(plain_error(e)) from None
    if cfg.dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r} is out of range: float32 or float16")
    for key in ("chunk_size", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is out of range: an integer >= 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit={cfg.limit} is out of range: null or an integer >= 1")
    cfg.dataset.random_flip = False  # a training option (the dataset yamls set it): flips=true stores both views
    return cfg


def extract(cfg: DictConfig, rank: int | None = None, world_size: int | None = None,
            stop_after_chunks: int | None = None) -> Path:
    """Encode this process's share of the unfinished chunks; returns the store directory. ``stop_after_chunks``
    (tests) simulates an interruption after that many chunks."""
    from tqdm.auto import tqdm

    from diffusion.data import load_from_config
    from diffusion.latents import encode_posterior, finish_store, load_vae, open_store, vae_scale
    from runio.env import resolve_device

    cfg = validate_extract(cfg)
    if rank is None or world_size is None:
        rank, world_size = _world()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dataset = load_from_config(cfg.dataset, cfg.split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dataset.stochastic:
        raise ConfigError(f"dataset={cfg.dataset.name} already holds latents; extract from an image dataset")
    vae = load_vae(cfg.vae, device)
    n = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    size = dataset.image_size
    with torch.no_grad():
        probe = vae.encode(torch.zeros(1, dataset.channels, size, size, device=device)).latent_dist.mean
    latent_shape = tuple(probe.shape[1:])
    recipe = {"dataset": {"name": dataset.name, "image_size": size, **dataset.identity()}, "split": cfg.split,
              "vae": str(cfg.vae), "vae_config": _vae_fingerprint(vae), "scale": vae_scale(vae),
              "flips": bool(cfg.flips), "dtype": cfg.dtype, "chunk_size": int(cfg.chunk_size),
              "class_names": list(dataset.class_names), "limit": cfg.limit}
    out = Path(cfg.out) if cfg.out else Path("latents") / f"{cfg.dataset.name}{size}-{Path(cfg.vae).name}"
    labels = dataset.labels[:n].numpy() if hasattr(dataset, "labels") else np.zeros(n, np.int64)
    posterior, done = open_store(out, recipe, n, latent_shape, labels)
    mine = [c for c in range(len(done)) if c % world_size == rank and not done[c]]
    log.info("extracting %d images of %s (%s) through %s into %s: %d of %d chunks for rank %d/%d", n, dataset.name,
             cfg.split, cfg.vae, out, len(mine), len(done), rank, world_size)
    bar = tqdm(total=len(mine) * cfg.chunk_size, desc=f"encode rank {rank}", unit="img", dynamic_ncols=True,
               disable=not cfg.progress)
    dtype = np.dtype(cfg.dtype)
    for count, c in enumerate(mine):
        if stop_after_chunks is not None and count >= stop_after_chunks:
            break
        lo, hi = c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, n)
        for start in range(lo, hi, cfg.batch_size):
            idx = torch.arange(start, min(start + cfg.batch_size, hi))
            images, _ = dataset.fetch(idx)
            views = [images, images.flip(-1)] if cfg.flips else [images]
            for f, view in enumerate(views):
                mean, std = encode_posterior(vae, view.to(device))
                posterior[start:start + len(idx), f, 0] = mean.float().cpu().numpy().astype(dtype)
                posterior[start:start + len(idx), f, 1] = std.float().cpu().numpy().astype(dtype)
            bar.update(len(idx))
        posterior.flush()
        done[c] = 1
        done.flush()
    bar.close()
    complete = finish_store(out)
    left = int((np.load(out / "done.npy", mmap_mode="r") == 0).sum())
    print(f"latent store {out}: {'complete' if complete else f'{left} chunk(s) left (rerun to resume)'}; "
          f"{n} images -> {posterior.shape[1]} x {latent_shape} posteriors, scale {recipe['scale']:g}")
    return out


def _vae_fingerprint(vae: Any) -> str:
    """Short hash of the VAE's weights, so two different VAEs under one name never share a store."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


@hydra.main(config_path="../conf", config_name="extract_latents", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from diffusion.data import DatasetError
    from diffusion.latents import VAEError

    try:
        extract(cfg)
    except (ConfigError, DatasetError, VAEError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; finished chunks are kept: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
