"""Tiny stand-ins of the real datasets, written in their real on-disk formats (no network, no real data):

- :func:`fake_cifar10`: ``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``, pickles (protocol 2) of
  dicts with bytes keys, ``b"data"`` uint8 (n, 3072) and ``b"labels"``, as the Python 2 files of the real archive;
- :func:`fake_celeba`: ``img_align_celeba/000001.jpg ...`` (178x218 JPEGs) and ``list_eval_partition.txt``;
- :func:`fake_imagenet`: a two-class ImageFolder (synset folders) of JPEGs of assorted sizes;
- :func:`tiny_vae` / :func:`fake_latent_store`: a tiny randomly initialised 3-channel ``AutoencoderKL`` saved with
  ``save_pretrained`` and a latent store of the fake ImageNet extracted through it by ``diffusion.extract_latents``;
- :func:`fake_official_dit`: a DiT state_dict saved bare with ``torch.save``, the layout of the released
  ``DiT-XL-2-256x256.pt``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
SYNSETS = ("n01440764", "n01443537")  # ILSVRC2012's first two synsets (tench, goldfish)


def fake_cifar10(root: str | Path, per_batch: int = 4, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with ``per_batch`` random images in each of the six batches; returns root."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        batch = {
            b"batch_label": (f"training batch {b + 1} of 5" if b < 5 else "testing batch 1 of 1").encode(),
            b"labels": [int((b * per_batch + i) % 10) for i in range(per_batch)],
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": list(CIFAR10_NAMES), b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def _jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A smooth random RGB image (a gradient plus noise), saved as JPEG."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     np.full((height, width), rng.integers(0, 256))], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def fake_celeba(root: str | Path, n: int = 8, seed: int = 0) -> Path:
    """``root/img_align_celeba/000001.jpg ... {n:06d}.jpg`` (178x218, the aligned CelebA size) and
    ``root/list_eval_partition.txt``: the last two images valid (1) and test (2), the others train (0); returns root."""
    root = Path(root)
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        _jpeg(img_dir / name, 178, 218, rng)
        lines.append(f"{name} {0 if i <= n - 2 else (1 if i == n - 1 else 2)}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def fake_imagenet(root: str | Path, per_class: int = 6, seed: int = 0) -> Path:
    """A two-class ImageFolder ``root/<synset>/<synset>_<i>.JPEG`` of JPEGs of assorted sizes and aspect ratios;
    returns root (the "train folder" of ``dataset=imagenet``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (33, 47), (64, 64), (50, 36), (28, 28), (71, 40)]
    for synset in SYNSETS:
        (root / synset).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            _jpeg(root / synset / f"{synset}_{i}.JPEG", w, h, rng)
    return root


def tiny_vae(path: str | Path, seed: int = 0) -> Path:
    """A tiny randomly initialised 3-channel diffusers ``AutoencoderKL`` (downsampling 2, 4 latent channels) written
    with ``save_pretrained`` (config.json + safetensors); returns the directory."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8)
    path = Path(path)
    vae.save_pretrained(path)
    return path


def fake_latent_store(root: str | Path, vae_dir: str | Path, images: str | Path | None = None,
                      image_size: int = 16) -> Path:
    """A complete latent store (with flips) of a fake ImageNet (``images``, made under ``root.parent`` when None) at
    ``image_size`` pixels, extracted by ``diffusion.extract_latents.extract`` through the VAE in ``vae_dir``; with the
    tiny VAE the latents are 4 x image_size/2 x image_size/2. Returns the store directory ``root``."""
    from hydra import compose, initialize_config_dir

    from diffusion.config import CONF_DIR
    from diffusion.extract_latents import extract

    root = Path(root)
    if images is None:
        images = fake_imagenet(root.parent / f"{root.name}-images")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="extract_latents",
                      overrides=["dataset=imagenet", f"dataset.root={images}", f"dataset.image_size={image_size}",
                                 "dataset.random_flip=false", f"vae={vae_dir}", f"out={root}", "flips=true",
                                 "chunk_size=8", "batch_size=8", "device=cpu", "progress=false"])
    return extract(cfg, rank=0, world_size=1)


def fake_official_dit(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """A DiT (``kwargs``: its constructor keywords; default the "cpu" preset, patch 2, 8x8x4 latents, 2 classes,
    learned sigma) with every tensor perturbed away from its initialisation (a fresh DiT outputs zeros), saved as a
    bare state_dict like the released DiT checkpoints; returns the file."""
    import backbones

    kw = dict(size="cpu", patch_size=2, input_size=8, in_channels=4, num_classes=2, learn_sigma=True,
              class_dropout_prob=0.1)
    kw.update(kwargs)
    torch.manual_seed(seed)
    model = backbones.build("dit", **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception (inception-v3-compat) with random weights, saved as a state_dict: the real FID
    code path offline (values are plumbing only, not comparable with published FIDs)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None):
        torch.manual_seed(seed)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = Path(path)
    torch.save(net.state_dict(), path)
    return path
