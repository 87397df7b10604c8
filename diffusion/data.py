"""Datasets, all held in memory as float32 (N, C, H, W) in [-1, 1] with int64 labels.

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes). Always offline; used by unit tests.
- ``fashion_mnist``: the real Fashion-MNIST idx files (from ``root`` or Debian's ``dataset-fashion-mnist``
  package), padded 28 -> 32 (as DiT-style 32x32 inputs), optionally area-downsampled to 16x16.

Batches are a pure function of (seed, step): an epoch permutation drawn from ``seed + epoch``. Resuming at
step k therefore replays exactly the batches an uninterrupted run would see, with no sampler state to save.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_FMNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET_FMNIST = ("install Debian's package (`apt-get install dataset-fashion-mnist`, which `make demo` does "
                      "when it can) or download the four idx files (train-images-idx3-ubyte.gz, ...) into a "
                      "folder and pass dataset.root=<folder>")


class DatasetError(RuntimeError):
    """A dataset is missing or corrupt; the message names the path and how to get the data."""


class Dataset:
    """What the trainer, the sampler grid and the metrics need from a dataset (subclasses hold the data).

    A subclass sets ``name``, ``num_classes``, ``class_names``, ``channels``, ``image_size`` and implements
    :meth:`fetch` (a batch of indices -> float32 (B, C, H, W) in [-1, 1] and int64 labels). The batch order
    (:meth:`batch_indices`) is shared: epoch permutations seeded by (seed, epoch), so resuming at step k replays the
    batches an uninterrupted run would see. Datasets whose items are not model inputs yet (VAE latent posteriors)
    override :meth:`model_input`.
    """

    name: str
    num_classes: int
    class_names: list[str]
    channels: int
    image_size: int
    # True when model_input() draws Gaussian noise (latent posteriors): the trainer then draws it from the step seed
    stochastic: bool = False
    # False for VAE latents: samples are decoded (``decode``) before grids and metrics, and x0 is not clipped
    pixel_space: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def identity(self) -> dict:
        """Settings beyond (name, image_size, random_flip) that change what the model sees (a crop protocol, the
        VAE of latents); part of a run's key. Empty for datasets that have none."""
        return {}

    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def model_input(self, raw: torch.Tensor, flip: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        """The network input from a fetched batch: horizontal flips where ``flip`` (random_flip); ``noise`` is
        None unless ``stochastic``."""
        return raw if flip is None else torch.where(flip[:, None, None, None], raw.flip(-1), raw)

    def decode(self, x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images in [-1, 1] from model-space samples (identity for pixel data; VAE decoding for latents)."""
        return x

    def clip_denoised(self, setting: bool | None) -> bool:
        """``sample.clip_denoised`` / ``eval.clip_denoised`` resolved: None = on for pixels, off for latents."""
        return self.pixel_space if setting is None else bool(setting)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of the batch at ``step``: epoch permutations seeded by seed + epoch, last partial batch dropped."""
        n = len(self)
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} images of {self.name}; lower train.batch_size")
        per_epoch = n // batch_size
        epoch, i = divmod(step, per_epoch)
        if getattr(self, "_perm_key", None) != (seed, epoch):  # one permutation per epoch, not per step
            self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            self._perm_key = (seed, epoch)
        return self._perm[i * batch_size:(i + 1) * batch_size]

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fetch(self.batch_indices(step, batch_size, seed))

    def uint8_batches(self, batch_size: int = 256, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The images in order as uint8 (B, C, H, W) batches (reference statistics of FID), ``limit`` first ones."""
        from diffusion.sampling import to_uint8

        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            x, _ = self.fetch(torch.arange(start, min(start + batch_size, n)))
            yield to_uint8(x)

    # torch.utils.data.Dataset protocol (a DataLoader fetches whole batches through __getitems__)
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.fetch(torch.as_tensor([index], dtype=torch.long))
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fetch(torch.as_tensor(indices, dtype=torch.long))


@dataclass(eq=False)
class ImageDataset(Dataset):
    """Images held in memory as float32 (N, C, H, W) in [-1, 1] (digits, Fashion-MNIST)."""

    name: str
    images: torch.Tensor   # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64
    num_classes: int
    class_names: list[str]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


class ArrayDataset(Dataset):
    """uint8 (N, H, W, C) pixels (a numpy array or memmap: CIFAR-10 holds 150 MB) converted per batch."""

    def __init__(self, name: str, pixels: np.ndarray, labels: np.ndarray, class_names: list[str],
                 extra_identity: dict | None = None):
        if pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise ValueError(f"{name}: expected uint8 pixels (N, H, W, C), got {pixels.dtype} {pixels.shape}")
        self.name, self.pixels, self.class_names = name, pixels, list(class_names)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.num_classes, self.channels, self.image_size = len(class_names), pixels.shape[3], pixels.shape[1]
        self._identity = dict(extra_identity or {})

    def __len__(self) -> int:
        return len(self.labels)

    def identity(self) -> dict:
        return dict(self._identity)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        px = torch.from_numpy(np.ascontiguousarray(self.pixels[idx.numpy()])).permute(0, 3, 1, 2)
        return px.float() / 127.5 - 1.0, self.labels[idx]


class FileDataset(Dataset):
    """Images decoded from files per batch (CelebA JPEGs, ImageNet folders): ``transform`` maps a decoded RGB
    ``PIL.Image`` to uint8 (H, W, C) at ``image_size``. Use ``dataset.workers`` to decode in parallel."""

    def __init__(self, name: str, files: list[Path], labels: list[int] | np.ndarray, class_names: list[str],
                 image_size: int, transform: Callable[[Any], np.ndarray], extra_identity: dict | None = None,
                 layout_hint: str = ""):
        if len(files) != len(labels):
            raise ValueError(f"{name}: {len(files)} files but {len(labels)} labels")
        self.name, self.files, self.class_names = name, list(files), list(class_names)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes, self.channels, self.image_size = len(class_names), 3, int(image_size)
        self.transform, self._identity, self.layout_hint = transform, dict(extra_identity or {}), layout_hint

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict:
        return dict(self._identity)

    def read_image(self, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as img:
                arr = self.transform(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}; the file is damaged or not an image"
                               f"{'; ' + self.layout_hint if self.layout_hint else ''}") from e
        if arr.shape != (self.image_size, self.image_size, 3) or arr.dtype != np.uint8:
            raise DatasetError(f"{path}: the transform gave {arr.dtype} {arr.shape}, expected uint8 "
                               f"({self.image_size}, {self.image_size}, 3)")
        return arr

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        px = torch.from_numpy(np.stack([self.read_image(int(i)) for i in idx])).permute(0, 3, 1, 2)
        return px.float() / 127.5 - 1.0, self.labels[idx]


class StepBatchSampler(torch.utils.data.Sampler):
    """The indices of this rank's share of each global batch, from ``start_step`` on.

    The global batch of a step is a pure function of (seed, step) (:meth:`Dataset.batch_indices`); rank r of
    a world of W takes its r-th contiguous slice. So the data a run sees does not depend on the world size or on
    where it was resumed, and no sampler state needs saving (the role DistributedSampler plays elsewhere)."""

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} (the global batch) is not divisible by the "
                             f"{world_size} processes; choose a multiple of {world_size}")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.start_step, self.steps, self.rank, self.local = start_step, steps, rank, global_batch // world_size

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            idx = self.dataset.batch_indices(step, self.global_batch, self.seed)
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()


def batch_loader(dataset: Dataset, global_batch: int, seed: int, start_step: int, steps: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding (images, labels) of this rank's slice of every global batch, step by step."""
    sampler = StepBatchSampler(dataset, global_batch, seed, start_step, steps, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_batch, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=workers > 0)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (exact box average for integer factors) or bilinearly upsample square images."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(split: str = "train", image_size: int = 8, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's digits, scaled from [0, 16] to [-1, 1]; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(labels) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    return ImageDataset("digits", resize(images[idx], image_size), labels[idx], 10, [str(i) for i in range(10)])


def _find_idx_file(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found under {root}; {_HOW_TO_GET_FMNIST}")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed): uint8 images (N, rows, cols) or labels (N,)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}; the file is corrupt, {_HOW_TO_GET_FMNIST}") from e
    if len(raw) < 8:
        raise DatasetError(f"{path} is truncated ({len(raw)} bytes); {_HOW_TO_GET_FMNIST}")
    magic = int.from_bytes(raw[0:4], "big")
    n = int.from_bytes(raw[4:8], "big")
    if magic == 2051:
        rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        shape, offset, declared = (n, rows, cols), 16, f"{n} images of {rows}x{cols} pixels"
    elif magic == 2049:
        shape, offset, declared = (n,), 8, f"{n} labels"
    else:
        raise DatasetError(f"{path} is not an idx image/label file (magic {magic}); {_HOW_TO_GET_FMNIST}")
    if len(raw) < offset:
        raise DatasetError(f"{path} is truncated inside its {offset}-byte header ({len(raw)} bytes); "
                           f"{_HOW_TO_GET_FMNIST}")
    if 0 in shape:  # a valid header over no data: fail here, naming the file, not with a traceback later
        raise DatasetError(f"{path} holds no {'images' if magic == 2051 else 'labels'} (its header declares "
                           f"{declared}): the file is truncated or corrupt; {_HOW_TO_GET_FMNIST}")
    expected = offset + int(np.prod(shape))
    if len(raw) != expected:
        raise DatasetError(f"{path} has {len(raw)} bytes, expected {expected}: truncated or corrupt; "
                           f"{_HOW_TO_GET_FMNIST}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str = "train", image_size: int = 32, root: str | os.PathLike | None = None
                       ) -> ImageDataset:
    """Fashion-MNIST padded to 32x32 (2 pixels of background on each side), then resized to ``image_size``."""
    root = Path(root) if root else DEBIAN_FASHION_MNIST
    if not root.exists():
        raise DatasetError(f"Fashion-MNIST folder {root} does not exist; {_HOW_TO_GET_FMNIST}")
    images = read_idx(_find_idx_file(root, _FMNIST_FILES[(split, "images")]))
    labels = read_idx(_find_idx_file(root, _FMNIST_FILES[(split, "labels")]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split} images {images.shape} and labels {labels.shape} under {root} "
                           f"do not match; {_HOW_TO_GET_FMNIST}")
    if labels.max() >= 10:
        raise DatasetError(f"Fashion-MNIST labels under {root} exceed 9; the label file is corrupt")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return ImageDataset("fashion_mnist", resize(x, image_size), torch.from_numpy(labels.astype(np.int64)), 10,
                        list(FASHION_MNIST_CLASSES))


DATASETS: dict[str, Callable[..., Dataset]] = {}
CLASS_NAMES: dict[str, list[str]] = {}


def register_dataset(name: str, class_names: list[str] | None = None) -> Callable:
    """Register ``loader(split, image_size=..., root=..., **options) -> Dataset`` under ``name`` (``dataset.name``).
    Options are the keys of ``dataset.*`` beyond name/image_size/root/random_flip/workers that the loader accepts
    as keyword arguments (e.g. ``crop``, ``download``); setting one the loader does not take is an error."""
    def wrap(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS[name] = loader
        if class_names is not None:
            CLASS_NAMES[name] = list(class_names)
        return loader
    return wrap


register_dataset("digits", [str(i) for i in range(10)])(load_digits)
register_dataset("fashion_mnist", FASHION_MNIST_CLASSES)(load_fashion_mnist)

# dataset.* keys that are not loader options
_COMMON_KEYS = ("name", "image_size", "root", "random_flip", "workers", "unconditional")


def class_names(name: str) -> list[str] | None:
    """Human names of a dataset's classes (grid column headers), None when unknown."""
    return CLASS_NAMES.get(name)


def load_dataset(name: str, split: str = "train", image_size: int | None = None, root: str | None = None,
                 **options: Any) -> Dataset:
    """Load a dataset by name; ``image_size`` None keeps its native size (8 for digits, 32 for Fashion-MNIST).
    ``options`` left at None (or False) are not passed, so a loader only sees the options set for it."""
    import inspect

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    loader = DATASETS[name]
    accepted = inspect.signature(loader).parameters
    kwargs: dict = {"split": split}
    if image_size is not None:
        kwargs["image_size"] = int(image_size)
    if "root" in accepted:
        kwargs["root"] = root
    elif root is not None:
        raise ValueError(f"dataset.root does not apply to {name} (it is built in); remove dataset.root")
    for key, value in options.items():
        if value is None or value is False:
            continue
        if key not in accepted:
            raise ValueError(f"dataset.{key}={value!r} does not apply to dataset {name}; remove it")
        kwargs[key] = value
    return loader(**kwargs)


def load_from_config(dataset_cfg: Any, split: str = "train") -> Dataset:
    """The dataset of a config's ``dataset`` group (a DictConfig or a dict) for ``split``."""
    d = dict(dataset_cfg.items()) if hasattr(dataset_cfg, "items") else dict(dataset_cfg)
    options = {k: (v.value if hasattr(v, "value") else v) for k, v in d.items() if k not in _COMMON_KEYS}
    dataset = load_dataset(d["name"], split, d.get("image_size"), d.get("root"), **options)
    return make_unconditional(dataset) if d.get("unconditional") else dataset


def make_unconditional(dataset: Dataset) -> Dataset:
    """The dataset with every label 0 of a single class (``dataset.unconditional=true``): the model still has a
    two-row label table (the class and the CFG null class), so CFG scale 1 samples unconditionally. Part of the key."""
    base_identity = dataset.identity()
    dataset.labels = torch.zeros_like(dataset.labels)
    dataset.num_classes, dataset.class_names = 1, ["(unconditional)"]
    dataset.identity = lambda: {**base_identity, "unconditional": True}  # type: ignore[method-assign]
    return dataset


# Datasets defined in other modules register themselves on import (they subclass Dataset, defined above).
import diffusion.image_datasets  # noqa: E402,F401  (cifar10, celeba64, imagenet)
from diffusion import latents  # noqa: E402,F401  (latents, imagenet_latents)
