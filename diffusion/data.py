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
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor   # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64
    num_classes: int
    class_names: list[str]
    _perm_key: tuple[int, int] | None = field(default=None, repr=False)
    _perm: torch.Tensor | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.labels)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of the batch at ``step``: epoch permutations seeded by seed + epoch, last partial batch dropped."""
        n = len(self)
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} images of {self.name}; lower train.batch_size")
        per_epoch = n // batch_size
        epoch, i = divmod(step, per_epoch)
        if self._perm_key != (seed, epoch):  # one permutation per epoch, not per step
            self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            self._perm_key = (seed, epoch)
        return self._perm[i * batch_size:(i + 1) * batch_size]

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batch_indices(step, batch_size, seed)
        return self.images[idx], self.labels[idx]

    # torch.utils.data.Dataset protocol (a DataLoader fetches whole batches through __getitems__)
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


class StepBatchSampler(torch.utils.data.Sampler):
    """The indices of this rank's share of each global batch, from ``start_step`` on.

    The global batch of a step is a pure function of (seed, step) (:meth:`ImageDataset.batch_indices`); rank r of
    a world of W takes its r-th contiguous slice. So the data a run sees does not depend on the world size or on
    where it was resumed, and no sampler state needs saving (the role DistributedSampler plays elsewhere)."""

    def __init__(self, dataset: ImageDataset, global_batch: int, seed: int, start_step: int, steps: int,
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


def batch_loader(dataset: ImageDataset, global_batch: int, seed: int, start_step: int, steps: int, rank: int = 0,
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


DATASETS = {"digits": load_digits, "fashion_mnist": load_fashion_mnist}
CLASS_NAMES = {"digits": [str(i) for i in range(10)], "fashion_mnist": list(FASHION_MNIST_CLASSES)}


def class_names(name: str) -> list[str] | None:
    """Human names of a dataset's classes (grid column headers), None when unknown."""
    return CLASS_NAMES.get(name)


def load_dataset(name: str, split: str = "train", image_size: int | None = None, root: str | None = None
                 ) -> ImageDataset:
    """Load a dataset by name; ``image_size`` None keeps its native size (8 for digits, 32 for Fashion-MNIST)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    kwargs: dict = {"split": split}
    if image_size is not None:
        kwargs["image_size"] = int(image_size)
    if name == "fashion_mnist":
        kwargs["root"] = root
    return DATASETS[name](**kwargs)
