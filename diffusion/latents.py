"""Latent diffusion: encode a dataset once through a VAE, train on the stored posteriors, decode samples.

    python -m diffusion.extract_latents dataset=imagenet dataset.root=/data/imagenet/train \\
        vae=stabilityai/sd-vae-ft-ema out=latents/imagenet256
    python -m diffusion.train dataset=imagenet_latents dataset.root=latents/imagenet256 backbone=dit backbone.size=XL

The VAE is diffusers' ``AutoencoderKL`` (``vae=`` a Hugging Face hub name, used from the local hub cache or
downloaded when a network is available, or a local directory written by ``save_pretrained``), loaded from
safetensors only (no pickle). Latents are ``scaling_factor * z`` with the VAE config's ``scaling_factor`` (0.18215
for the Stable Diffusion VAEs DiT uses).

A latent store is one directory::

    posterior.npy   float32 (or float16) (N, F, 2, C, h, w): posterior mean and standard deviation of every image,
                    F = 2 when ``flips=true`` (index 1 = the horizontally flipped image), memory-mapped
    labels.npy      int64 (N,)
    done.npy        uint8 (number of chunks,): 1 once a chunk's rows are written and flushed
    meta.json       the recipe (source dataset and its identity, VAE, scale, flips, dtype, chunk size, shapes);
                    ``complete: true`` once every chunk is done

Extraction is sharded and resumable: each process (``torchrun`` ranks, or any launcher setting RANK/WORLD_SIZE)
encodes the unfinished chunks c with c % world_size == rank and marks each one done after flushing it; a rerun
with the same recipe continues where any previous run stopped, with any world size. A store made with a different
recipe is never reused or overwritten: the command refuses and names the differing setting.

Training (``dataset=imagenet_latents``, or ``dataset=latents`` for a store of any dataset) draws one sample
``scale * (mean + std * eps)`` of each posterior per step (eps from the step's seed, as the rest of the step's
randomness) and, with ``dataset.random_flip``, picks the stored flipped image's posterior (flipping a latent is not
the latent of the flipped image). Sampling decodes through the same VAE before any grid or metric; the backbone's
GMACs stay the backbone's alone (the VAE decoder's are reported separately, :func:`vae_decoder_gmacs`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from diffusion.data import Dataset, DatasetError, register_dataset
from runio.files import atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HOW_TO_EXTRACT = ("create it with `python -m diffusion.extract_latents dataset=<dataset> dataset.root=<images> "
                   "vae=<hub name or directory> out=<this directory>`")


class VAEError(RuntimeError):
    """The VAE cannot be loaded (not found offline, not an AutoencoderKL, no safetensors weights)."""


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------
_VAE_CACHE: dict[tuple[str, str], Any] = {}


def load_vae(name_or_dir: str, device: torch.device | str = "cpu") -> Any:
    """diffusers' ``AutoencoderKL`` from a local directory or a hub name (safetensors only), eval mode, cached."""
    key = (str(name_or_dir), str(device))
    if key in _VAE_CACHE:
        return _VAE_CACHE[key]
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError("latent diffusion needs diffusers: `pip install diffusers` (in constraints.txt)") from e
    local = Path(name_or_dir).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise VAEError(f"vae={name_or_dir}: {local} has no config.json; pass a directory written by "
                       f"AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors) or a hub "
                       f"name such as stabilityai/sd-vae-ft-ema")
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else name_or_dir, use_safetensors=True)
    except Exception as e:  # OSError / EnvironmentError from the hub client, ValueError on a wrong config
        where = ("the directory" if local.exists() else
                 "the hub cache (no network here, or the name is wrong); download it once where a network is "
                 "available (`huggingface-cli download stabilityai/sd-vae-ft-ema`) or pass a local directory")
        raise VAEError(f"cannot load the VAE {name_or_dir!r} from {where}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
    vae = vae.to(device).eval().requires_grad_(False)
    _VAE_CACHE[key] = vae
    return vae


def vae_scale(vae: Any) -> float:
    """The latent scale: the VAE config's ``scaling_factor`` (0.18215 for the SD VAEs, DiT's constant)."""
    return float(getattr(vae.config, "scaling_factor", None) or 0.18215)


@torch.no_grad()
def encode_posterior(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation (unscaled) of images in [-1, 1]."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scale: float, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from scaled latents, as DiT's sampler: ``vae.decode(z / scale)``."""
    device = next(vae.parameters()).device
    out = [vae.decode(latents[i:i + batch_size].to(device).float() / scale).sample.float().cpu()
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def vae_decoder_gmacs(vae: Any, latent_shape: tuple[int, int, int]) -> float:
    """GMACs of one decoder pass for one image: the VAE's sampling cost, reported apart from the backbone's
    (fvcore's counts of convolutions, matmuls, attention and norms; elementwise ops free, as for the backbones)."""
    import logging as _logging

    from fvcore.nn import FlopCountAnalysis

    from bench.flops import _handle, sdpa_macs

    class _Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(z).sample

    device = next(vae.parameters()).device
    fca = FlopCountAnalysis(_Decode().eval(), (torch.zeros(1, *latent_shape, device=device),))
    fca.set_op_handle("aten::scaled_dot_product_attention", _handle(sdpa_macs))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    _logging.getLogger("fvcore").setLevel(_logging.ERROR)
    return fca.total() / 1e9


# ----------------------------------------------------------------------------------------------------------------
# The latent store
# ----------------------------------------------------------------------------------------------------------------
def _read_meta(root: Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        raise DatasetError(f"{root} holds no latent store (no meta.json); {_HOW_TO_EXTRACT}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is unreadable ({e}); delete the directory and {_HOW_TO_EXTRACT}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DatasetError(f"{path}: latent store format {meta.get('format')}, expected {FORMAT_VERSION}; "
                           f"re-extract it")
    return meta


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_store(root: Path, recipe: dict, num_images: int, latent_shape: tuple[int, ...], labels: np.ndarray
               ) -> tuple[np.memmap, np.memmap]:
    """Create the store (first process) or open an existing one with the same recipe; returns (posterior, done)."""
    flips = 2 if recipe["flips"] else 1
    chunks = math.ceil(num_images / recipe["chunk_size"])
    shape = (num_images, flips, 2, *latent_shape)
    with _store_lock(root):
        meta_path = root / "meta.json"
        if meta_path.is_file():
            meta = _read_meta(root)
            differ = {k: (meta["recipe"].get(k), v) for k, v in recipe.items() if meta["recipe"].get(k) != v}
            if differ or tuple(meta["shape"]) != shape:
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items()) or \
                    f"shape {tuple(meta['shape'])} -> {shape}"
                raise DatasetError(f"{root} holds latents of another recipe ({listed}); choose another out= "
                                   f"(a store is never overwritten)")
        else:
            meta = {"format": FORMAT_VERSION, "recipe": recipe, "shape": list(shape), "num_images": num_images,
                    "chunks": chunks, "complete": False}
            np.lib.format.open_memmap(root / "posterior.npy", mode="w+", dtype=recipe["dtype"], shape=shape).flush()
            np.lib.format.open_memmap(root / "done.npy", mode="w+", dtype=np.uint8, shape=(chunks,)).flush()
            np.save(root / "labels.npy", labels.astype(np.int64))
            atomic_write_text(meta_path, json.dumps(meta, indent=1))  # last: its presence means the files exist
    posterior = np.lib.format.open_memmap(root / "posterior.npy", mode="r+")
    done = np.lib.format.open_memmap(root / "done.npy", mode="r+")
    return posterior, done


def finish_store(root: Path) -> bool:
    """Mark the store complete when every chunk is done (any process may call it); returns completeness."""
    with _store_lock(root):
        meta = _read_meta(root)
        done = np.load(root / "done.npy", mmap_mode="r")
        if meta["complete"] or not bool(done.all()):
            return bool(meta["complete"])
        meta["complete"] = True
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))
        return True


class LatentDataset(Dataset):
    """A complete latent store as a training dataset: items are posterior (mean, std) pairs of every stored flip;
    :meth:`model_input` turns them into one scaled posterior sample per image."""

    stochastic = True
    pixel_space = False

    def __init__(self, root: str | os.PathLike, expect_source: str | None = None, name: str = "latents"):
        self.root = Path(root)
        meta = _read_meta(self.root)
        if not meta["complete"]:
            raise DatasetError(f"the latent store {self.root} is incomplete (an extraction was interrupted); rerun "
                               f"the same `python -m diffusion.extract_latents ... out={self.root}` to finish it")
        recipe = meta["recipe"]
        if expect_source is not None and recipe["dataset"]["name"] != expect_source:
            raise DatasetError(f"{self.root} holds latents of {recipe['dataset']['name']}, not {expect_source}; use "
                               f"dataset=latents for a store of any dataset")
        self.meta, self.recipe, self.name = meta, recipe, name
        self.posterior = np.load(self.root / "posterior.npy", mmap_mode="r")
        self.labels = torch.from_numpy(np.load(self.root / "labels.npy", allow_pickle=False))
        self.class_names = list(recipe["class_names"])
        self.num_classes = len(self.class_names)
        self.channels, self.image_size = int(self.posterior.shape[3]), int(self.posterior.shape[-1])
        self.scale = float(recipe["scale"])
        self._vae = None

    def __len__(self) -> int:
        return len(self.labels)

    def identity(self) -> dict:
        r = self.recipe
        return {"latents": {"source": r["dataset"], "vae": r["vae"], "scale": r["scale"], "flips": r["flips"],
                            "dtype": r["dtype"]}}

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.argsort(idx.numpy())  # sorted reads from the memmap, then back to the batch order
        rows = self.posterior[idx.numpy()[order]]
        raw = torch.empty(rows.shape, dtype=torch.float32)
        raw[torch.from_numpy(order)] = torch.from_numpy(np.ascontiguousarray(rows)).float()
        return raw, self.labels[idx]

    def model_input(self, raw: torch.Tensor, flip: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        if flip is not None and raw.shape[1] < 2:
            raise DatasetError(f"dataset.random_flip needs the flipped images' latents, and {self.root} was "
                               f"extracted without them: re-extract with flips=true or set dataset.random_flip=false")
        which = flip.long() if flip is not None else torch.zeros(len(raw), dtype=torch.long)
        pair = raw[torch.arange(len(raw)), which]        # (B, 2, C, h, w)
        mean, std = pair[:, 0], pair[:, 1]
        if noise is None:
            raise ValueError("LatentDataset.model_input needs the posterior noise (the trainer draws it)")
        return (mean + std * noise) * self.scale

    def vae(self, device: torch.device | str = "cpu") -> Any:
        return load_vae(self.recipe["vae"], device)

    def decode(self, latents: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return decode_latents(self.vae(device), latents, self.scale)

    def uint8_batches(self, batch_size: int = 256, limit: int | None = None) -> Iterator[torch.Tensor]:
        raise DatasetError(f"{self.name} holds latents, not images: FID references come from the source images or "
                           f"a statistics file (eval.reference)")


def load_latents(split: str = "train", image_size: int | None = None, root: str | None = None) -> LatentDataset:
    """``dataset=latents``: a complete store under ``dataset.root`` (one split: the one that was extracted)."""
    return _load(split, image_size, root, None, "latents")


def load_imagenet_latents(split: str = "train", image_size: int | None = None, root: str | None = None
                          ) -> LatentDataset:
    """``dataset=imagenet_latents``: a store extracted from ``dataset=imagenet``."""
    return _load(split, image_size, root, "imagenet", "imagenet_latents")


def _load(split: str, image_size: int | None, root: str | None, source: str | None, name: str) -> LatentDataset:
    if root is None:
        raise DatasetError(f"dataset={name} needs dataset.root=<latent store directory>; {_HOW_TO_EXTRACT}")
    ds = LatentDataset(root, expect_source=source, name=name)
    if split != ds.recipe["split"]:
        raise DatasetError(f"{root} holds the {ds.recipe['split']!r} split, not {split!r}")
    if image_size is not None and int(image_size) != ds.image_size:
        raise DatasetError(f"dataset.image_size={image_size} but {root} holds {ds.image_size}x{ds.image_size} "
                           f"latents (image_size of a latent dataset is the latent resolution; leave it null)")
    return ds


register_dataset("latents")(load_latents)
register_dataset("imagenet_latents")(load_imagenet_latents)
LATENT_DATASETS = ("latents", "imagenet_latents")


def latent_store(dataset_cfg: dict) -> LatentDataset | None:
    """The latent store a run trained on (from its config's ``dataset`` section), None for pixel datasets; cheap
    (the store is memory-mapped), so samplers call it to decode without loading pixel datasets."""
    if dataset_cfg.get("name") not in LATENT_DATASETS:
        return None
    return _load("train", None, dataset_cfg.get("root"), None, dataset_cfg["name"])
