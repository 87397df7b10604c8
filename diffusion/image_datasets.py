"""Real image datasets read from their standard on-disk layouts; registered when ``diffusion.data`` is imported.

- ``cifar10``: the python pickle batches of ``cifar-10-python.tar.gz`` (``root/cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``; or root = that folder), read with a restricted unpickler that only rebuilds a
  numpy array (anything else is refused before it runs). Held in memory as uint8 (50,000 x 32 x 32 x 3 = 150 MB).
  Other image sizes are resized once at load (area average downwards, bilinear upwards, rounded to uint8).
  ``dataset.download=true`` fetches the archive with torchvision's downloader (MD5-checked) when files are missing.
- ``celeba64``: the aligned CelebA JPEGs (``img_align_celeba/000001.jpg``, 178x218) with
  ``list_eval_partition.txt`` (0 train, 1 valid, 2 test), in ``root`` or ``root/celeba`` (torchvision's layout).
  Unconditional (one class, "face"). Decoded per batch. Two crop protocols (``dataset.crop``), part of the run key:

  * ``ddim`` (default): the 128x128 box (left, upper, right, lower) = (25, 57, 153, 185), i.e. centred at
    (x=89, y=121), then a PIL bilinear (antialiased) resize to image_size. ermongroup/ddim ``datasets/__init__.py``
    (``cx, cy = 89, 121``; ``Crop(cy-64, cy+64, cx-64, cx+64)``: ``F.crop(img, top=57, left=25, 128, 128)``;
    ``transforms.Resize(image_size)``) and baofff/U-ViT ``datasets.py`` (class ``CelebA``, same crop and Resize; its
    FID reference is ``fid_stats_celeba64_train_50000_ddim.npz``). The FID numbers of DDIM and U-ViT, which
    Diffusion-RWKV's CelebA table compares against, use this protocol. (The 140x140 central crop is score_sde's /
    NCSN's protocol, yang-song/score_sde_pytorch ``datasets.py``, not this one.)
  * ``resize``: what Diffusion-RWKV's own code does (feizc/Diffusion-RWKV ``train.py``, used by
    ``script/train_celeba_middle.sh``, ``--dataset-type celeba``): ``transforms.Resize(image_size)`` (shorter side to
    image_size with PIL bilinear, longer side ``int(size * long / short)``: 178x218 -> 64x78) then ADM's
    ``center_crop_arr`` (here a pure centre crop: rows 7..70), then random flips. Its ``--resize-only`` flag is parsed
    but never read. Its images come from a HuggingFace ``datasets`` copy of CelebA (``tools/dataset.py``, split
    'train'); this loader reads the official files instead.

- ``imagenet``: ILSVRC2012 in ImageFolder layout: root = the train folder (``root/n01440764/*.JPEG``, ...) or a folder
  holding ``train/`` (and ``val/``, also sorted into synset folders, for split "test"/"val"). Class ids = sorted
  synset folder names (DiT's ImageFolder order: 0 = n01440764). Decoded per batch with ADM's ``center_crop_arr``
  (openai/guided-diffusion ``guided_diffusion/image_datasets.py``, copied into DiT's ``train.py``): while the
  shorter side is >= 2 * size halve both sides (integer division) with BOX; scale by size / shorter side with
  BICUBIC, each side ``round(side * scale)`` (Python round); crop size x size at ((h - size) // 2, (w - size) // 2).

Examples: ``dataset=cifar10 dataset.root=/data/cifar10``, ``dataset=celeba64 dataset.root=/data dataset.crop=resize``,
``dataset=imagenet dataset.root=/data/ILSVRC2012 dataset.workers=8``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.data import ArrayDataset, DatasetError, FileDataset, register_dataset, resize

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_LAYOUT = (f"dataset.root=<folder> holding {CIFAR10_FOLDER}/ (data_batch_1 ... data_batch_5, test_batch, "
                 f"batches.meta), or that folder itself")
_HOW_TO_GET_CIFAR = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
                     f"under dataset.root (it unpacks to {CIFAR10_FOLDER}/), or set dataset.download=true to fetch it "
                     "(needs a network)")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes, restricted to latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        # the real files were written by Python 2's cPickle with numpy 1 (numpy.core); numpy 2 writes numpy._core
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # bytes in a protocol-2 pickle written by Python 3
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, strings, numbers and numpy arrays): every other global
    is refused before anything runs. ``encoding="latin1"`` reads Python 2 byte strings as text (keys, names) and
    numpy's array buffers as bytes."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise DatasetError(f"{self.path}: refused to unpickle the global {module}.{name}; a genuine CIFAR-10 "
                               f"batch only holds a numpy uint8 array, lists and strings. The file is not a CIFAR-10 "
                               f"python batch (or was tampered with): {_HOW_TO_GET_CIFAR}")
        return obj


def read_cifar_pickle(path: Path) -> dict:
    """A CIFAR pickle (batch or batches.meta) as a dict with str keys, through :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"CIFAR-10 file {path} not found; expected {_CIFAR_LAYOUT}; {_HOW_TO_GET_CIFAR}") from e
    except Exception as e:  # anything an unpickler raises on a damaged stream
        raise DatasetError(f"cannot read the CIFAR-10 pickle {path} ({type(e).__name__}: {e}): the file is truncated "
                           f"or corrupt; {_HOW_TO_GET_CIFAR}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch; "
                           f"{_HOW_TO_GET_CIFAR}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) pixels and int64 (N,) labels of one CIFAR-10 batch file."""
    d = read_cifar_pickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' is {desc}, expected uint8 (N, 3072); the file is not a CIFAR-10 batch")
    labels = np.asarray(labels if labels is not None else [])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or (len(labels) and (
            labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: 'labels' must be {len(data)} integers in 0..9 (got {labels.dtype} "
                           f"{labels.shape}); the file is corrupt")
    # each row: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    pixels = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
    return pixels, labels.astype(np.int64)


def _resize_uint8(pixels: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """uint8 (N, H, W, C) resized with ``diffusion.data.resize`` (area down, bilinear up), rounded to uint8."""
    out = np.empty((len(pixels), size, size, pixels.shape[3]), dtype=np.uint8)
    for s in range(0, len(pixels), chunk):
        x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + chunk])).permute(0, 3, 1, 2).float()
        y = resize(x, size).round().clamp(0, 255).to(torch.uint8)
        out[s:s + chunk] = y.permute(0, 2, 3, 1).numpy()
    return out


def _download_cifar10(target: Path) -> None:
    """Fetch and extract cifar-10-python.tar.gz into ``target`` with torchvision's MD5-checked downloader (the
    archive only: torchvision's CIFAR10 class would then unpickle the batches without restriction)."""
    try:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        target.mkdir(parents=True, exist_ok=True)
        log.info("downloading CIFAR-10 (%s) into %s", CIFAR10.url, target)
        download_and_extract_archive(CIFAR10.url, str(target), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as e:
        raise DatasetError(f"dataset.download=true could not fetch CIFAR-10 into {target} ({type(e).__name__}: {e}); "
                           f"without a network, download cifar-10-python.tar.gz from "
                           f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it under {target}") from e


def _cifar_folder(root: Path) -> Path:
    if root.name == CIFAR10_FOLDER or (root / "batches.meta").is_file() or (root / "test_batch").is_file():
        return root
    return root / CIFAR10_FOLDER


@register_dataset("cifar10", CIFAR10_CLASSES)
def load_cifar10(split: str = "train", image_size: int = 32, root: str | os.PathLike | None = None,
                 download: bool = False) -> ArrayDataset:
    """CIFAR-10 from its python batches (50,000 train / 10,000 test images, 10 classes)."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"cifar10 has the splits {', '.join(CIFAR10_FILES)}, not {split!r}")
    if root is None:
        raise DatasetError(f"cifar10 needs {_CIFAR_LAYOUT}; {_HOW_TO_GET_CIFAR}")
    root = Path(root).expanduser()
    folder = _cifar_folder(root)
    missing = [n for n in CIFAR10_FILES[split] if not (folder / n).is_file()]
    if missing and download:
        _download_cifar10(folder.parent)
        missing = [n for n in CIFAR10_FILES[split] if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 {split} files missing in {folder}: {', '.join(missing)}; expected {_CIFAR_LAYOUT}"
                           f"; {_HOW_TO_GET_CIFAR}")
    batches = [read_cifar_batch(folder / n) for n in CIFAR10_FILES[split]]
    pixels = np.concatenate([p for p, _ in batches]) if len(batches) > 1 else np.ascontiguousarray(batches[0][0])
    labels = np.concatenate([lab for _, lab in batches])
    names = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = read_cifar_pickle(folder / "batches.meta").get("label_names")
        if not isinstance(meta, list) or len(meta) != 10:
            raise DatasetError(f"{folder / 'batches.meta'}: 'label_names' is not a list of 10 names; the file is "
                               f"corrupt; {_HOW_TO_GET_CIFAR}")
        names = [_text(n) for n in meta]
    if int(image_size) != 32:
        pixels = _resize_uint8(pixels, int(image_size))
    return ArrayDataset("cifar10", pixels, labels, names)


# ------------------------------------------------------------------------------------------------------------------
# Crops and resizes (PIL), shared by CelebA and ImageNet
# ------------------------------------------------------------------------------------------------------------------

class WrongImage(ValueError):
    """An image decodes but does not fit the protocol (e.g. not the aligned 178x218 CelebA size)."""


def adm_center_crop(img, size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: BOX halvings while the shorter side is >= 2 * size, a BICUBIC resize of the
    shorter side to size (each side ``round(side * scale)``), then the centred size x size crop (uint8 HWC)."""
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def shorter_side_resize(img, size: int):
    """torchvision's ``Resize(size)`` on a PIL image: the shorter side to size, the longer to
    ``int(size * long / short)``, PIL bilinear (antialiased when shrinking); unchanged when already that size."""
    from PIL import Image

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return img if new == (w, h) else img.resize(new, resample=Image.BILINEAR)


CELEBA_ALIGNED_SIZE = (178, 218)        # (width, height) of img_align_celeba
DDIM_CELEBA_BOX = (25, 57, 153, 185)    # (left, upper, right, lower): 128x128 centred at (x=89, y=121)


def celeba_ddim_crop(img, size: int) -> np.ndarray:
    """DDIM / U-ViT: the 128x128 box centred at (89, 121) of the aligned image, then a bilinear resize to size."""
    from PIL import Image

    if img.size != CELEBA_ALIGNED_SIZE:
        raise WrongImage(f"the image is {img.size[0]}x{img.size[1]}, but crop=ddim needs the aligned "
                         f"{CELEBA_ALIGNED_SIZE[0]}x{CELEBA_ALIGNED_SIZE[1]} CelebA images (img_align_celeba); use "
                         f"dataset.crop=resize for other images")
    img = img.crop(DDIM_CELEBA_BOX)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BILINEAR)
    return np.asarray(img)


def celeba_resize_crop(img, size: int) -> np.ndarray:
    """Diffusion-RWKV: torchvision ``Resize(size)`` then ADM's ``center_crop_arr(size)``."""
    return adm_center_crop(shorter_side_resize(img, size), size)


CELEBA_CROPS = {"ddim": celeba_ddim_crop, "resize": celeba_resize_crop}


class ImageFiles(FileDataset):
    """A :class:`FileDataset` whose protocol errors (:class:`WrongImage`) name the file."""

    def read_image(self, i: int) -> np.ndarray:
        try:
            return super().read_image(i)
        except WrongImage as e:
            raise DatasetError(f"{self.files[i]}: {e}") from None


# ------------------------------------------------------------------------------------------------------------------
# CelebA 64
# ------------------------------------------------------------------------------------------------------------------

CELEBA_SPLITS = {"train": (0,), "valid": (1,), "val": (1,), "test": (2,), "all": (0, 1, 2)}
_CELEBA_LAYOUT = ("dataset.root=<folder> holding img_align_celeba/ (000001.jpg ... 202599.jpg, 178x218) and "
                  "list_eval_partition.txt (lines '000001.jpg 0': 0 train, 1 valid, 2 test), or holding celeba/ with "
                  "those (torchvision's layout)")
_HOW_TO_GET_CELEBA = ("get 'Align&Cropped Images' (img_align_celeba.zip) and Eval/list_eval_partition.txt from "
                      "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")


def _celeba_base(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"CelebA folder {root} does not exist; expected {_CELEBA_LAYOUT}; {_HOW_TO_GET_CELEBA}")
    for base in (root, root / "celeba"):
        if (base / "img_align_celeba").is_dir():
            return base
    raise DatasetError(f"no img_align_celeba/ folder in {root} (nor in {root / 'celeba'}); expected {_CELEBA_LAYOUT}; "
                       f"{_HOW_TO_GET_CELEBA}")


def read_celeba_partition(path: Path) -> list[tuple[str, int]]:
    """(file name, partition) pairs of list_eval_partition.txt (or Kaggle's .csv with its header line)."""
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        if len(fields) == 2 and lineno == 1 and not fields[1].lstrip("-").isdigit():
            continue  # a CSV header
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path} line {lineno}: {line!r} is not '<file name> <0|1|2>'; the partition file is "
                               f"corrupt; {_HOW_TO_GET_CELEBA}")
        entries.append((fields[0], int(fields[1])))
    return entries


@register_dataset("celeba64", ["face"])
def load_celeba64(split: str = "train", image_size: int = 64, root: str | os.PathLike | None = None,
                  crop: str = "ddim") -> FileDataset:
    """Aligned CelebA, unconditional, cropped by ``crop`` (ddim | resize) and resized to ``image_size``."""
    if split not in CELEBA_SPLITS:
        raise ValueError(f"celeba64 has the splits {', '.join(CELEBA_SPLITS)}, not {split!r}")
    if crop not in CELEBA_CROPS:
        raise ValueError(f"dataset.crop={crop!r} is not a CelebA crop protocol; choose one of "
                         f"{', '.join(CELEBA_CROPS)}")
    if root is None:
        raise DatasetError(f"celeba64 needs {_CELEBA_LAYOUT}; {_HOW_TO_GET_CELEBA}")
    base = _celeba_base(Path(root).expanduser())
    img_dir = base / "img_align_celeba"
    if (img_dir / "img_align_celeba").is_dir():  # Kaggle's archive nests the folder
        img_dir = img_dir / "img_align_celeba"
    partition = next((p for p in (base / "list_eval_partition.txt", base / "list_eval_partition.csv") if p.is_file()),
                     None)
    if partition is None:
        raise DatasetError(f"CelebA partition file {base / 'list_eval_partition.txt'} not found; expected "
                           f"{_CELEBA_LAYOUT}; {_HOW_TO_GET_CELEBA}")
    names = [name for name, part in read_celeba_partition(partition) if part in CELEBA_SPLITS[split]]
    if not names:
        raise DatasetError(f"{partition} lists no image of the {split!r} split; expected {_CELEBA_LAYOUT}")
    with os.scandir(img_dir) as it:
        present = {e.name for e in it}
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of the CelebA {split!r} split listed in {partition} are missing "
                           f"from {img_dir}, e.g. {img_dir / missing[0]}; expected {_CELEBA_LAYOUT}; "
                           f"{_HOW_TO_GET_CELEBA}")
    return ImageFiles("celeba64", [str(img_dir / n) for n in names], np.zeros(len(names), dtype=np.int64), ["face"],
                      int(image_size), partial(CELEBA_CROPS[crop], size=int(image_size)),
                      extra_identity={"crop": crop}, layout_hint=f"expected {_CELEBA_LAYOUT}")


# ------------------------------------------------------------------------------------------------------------------
# ImageNet (ILSVRC2012, ImageFolder layout)
# ------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_SYNSET = re.compile(r"n\d{8}")
_IMAGENET_LAYOUT = ("dataset.root=<the ILSVRC2012 train folder> (root/n01440764/*.JPEG, ... one folder per synset) "
                    "or a folder holding train/ and val/ in that layout (val/ for split 'test')")


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively, like ImageFolder), sorted."""
    out, stack = [], [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir():
                    stack.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    out.append(e.path)
    out.sort()
    return out


def list_image_folder(folder: Path, classes: list[str], require_all: bool) -> tuple[list[str], list[int]]:
    """Files and class ids of an ImageFolder tree whose class ids come from ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    found = _class_folders(folder)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DatasetError(f"{folder} has class folders that the train folder lacks ({', '.join(unknown[:5])}); "
                           f"expected {_IMAGENET_LAYOUT}")
    files: list[str] = []
    labels: list[int] = []
    for c in found:
        these = _image_files(str(folder / c))
        if not these and require_all:
            raise DatasetError(f"class folder {folder / c} holds no image ({', '.join(IMAGE_EXTENSIONS)}); expected "
                               f"{_IMAGENET_LAYOUT}")
        files += these
        labels += [index[c]] * len(these)
    return files, labels


@register_dataset("imagenet")
def load_imagenet(split: str = "train", image_size: int = 256, root: str | os.PathLike | None = None) -> FileDataset:
    """ImageNet from folders, ADM/DiT centre crop at ``image_size``; classes = sorted synset folders."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"imagenet has the splits train, test (= val), not {split!r}")
    if root is None:
        raise DatasetError(f"imagenet needs {_IMAGENET_LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"ImageNet folder {root} does not exist; expected {_IMAGENET_LAYOUT}")
    train_dir, val_dir = (root / "train", root / "val") if (root / "train").is_dir() else (root, None)
    classes = _class_folders(train_dir)
    if not classes:
        raise DatasetError(f"{train_dir} has no class folders; expected {_IMAGENET_LAYOUT}")
    if len(classes) != 1000 and all(_SYNSET.fullmatch(c) for c in classes):
        log.warning("%s holds %d synset folders, not ILSVRC2012's 1000: class ids follow the folders found and do "
                    "not match DiT's", train_dir, len(classes))
    if split == "train":
        folder = train_dir
    else:
        if val_dir is None or not val_dir.is_dir():
            raise DatasetError(f"ImageNet split {split!r} reads val/ beside train/, but {root} has "
                               f"{'no train/ and val/' if val_dir is None else 'no val/'}; expected {_IMAGENET_LAYOUT}")
        folder = val_dir
        if not _class_folders(val_dir):
            raise DatasetError(f"{val_dir} has no class folders: ILSVRC2012's val images come flat; sort them into "
                               f"synset folders (as for the train folder) first; expected {_IMAGENET_LAYOUT}")
    files, labels = list_image_folder(folder, classes, require_all=split == "train")
    if not files:
        raise DatasetError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; expected {_IMAGENET_LAYOUT}")
    log.info("imagenet %s: %d images in %d classes under %s", split, len(files), len(classes), folder)
    return FileDataset("imagenet", files, labels, classes, int(image_size),
                       partial(adm_center_crop, size=int(image_size)), layout_hint=f"expected {_IMAGENET_LAYOUT}")
