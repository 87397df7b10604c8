"""Sample-quality metrics: Inception FID/KID/IS/precision-recall through torch-fidelity, and a classifier metric.

Two metrics with two names, never mixed up:

* ``fid`` (plus ``kid_mean``, ``isc_mean``, ``precision``, ... on request): the standard Inception metrics, computed
  with torch-fidelity's Inception extractor and metric functions on uint8 images (torch-fidelity's
  conditional-generator path is broken with numpy >= 1.24, so samples are generated first). The reference is a set
  of images, a dataset split streamed batch by batch (CIFAR-10's 50k training images are never one float tensor), or
  precomputed statistics in ADM's reference-batch layout (``mu``, ``sigma``: ``VIRTUAL_imagenet256_labeled.npz``);
  samples are images or an ADM-layout ``.npz`` (``arr_0`` uint8 NHWC) streamed from disk. ``python -m bench.fid``
  is the command line (reference statistics of a dataset, FID of an ``.npz``) and documents each paper's protocol.
  Runs on the CPU unless a CUDA device is requested (torch-fidelity itself defaults to CUDA). The Inception weights
  come from a local file (``inception_weights=``, sweep config ``eval.inception_weights=``), torch-fidelity's /
  pytorch-fid's cache under ``$TORCH_HOME/hub/checkpoints``, or, when neither exists, torch-fidelity's own download
  into that cache (``BENCH_OFFLINE=1`` disables the attempt; the test suite sets it); without a file and offline,
  the error names both ways to provide one. Nothing here is ever unpickled: the weights are read with
  ``torch.load(weights_only=True)`` and handed to torch-fidelity's extractor in memory (never as a path, which it
  would load with ``weights_only=False``); ``.npz`` files are read with ``allow_pickle=False`` (sample batches by
  parsing the ``.npy`` header and copying raw uint8 bytes); features are extracted here and scored with
  torch-fidelity's metric functions, and the reference features/statistics are cached here as ``.npz`` (atomic
  write, read with ``allow_pickle=False``) under a name made of the reference's key (content hash of images, the
  identity of a dataset split, the hash of an ``.npz``) and of the weights file's hash. torch-fidelity's own pickle
  cache (``cache_root``) is never used.
* ``fd_<dataset>_classifier``: the Frechet distance in the penultimate features of a small CNN that the project
  trains once per dataset on its training split (deterministic, cached; its test accuracy is recorded), plus that
  classifier's accuracy on class-conditional samples (predicted class == conditioning label). This is the CPU-scale
  metric for digits / Fashion-MNIST, where Inception is unavailable offline and slow (3-6 img/s on 2 cores). Its
  values are not comparable with Inception FID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from diffusion.sampling import to_uint8
from runio.files import atomic_torch_save, atomic_write, load_file

# --------------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of (N, D) features in float64."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the formula of Heusel et al. (TTUR) as
    pytorch-fid implements it: scipy's sqrtm, retried with ``eps`` added to both diagonals when the product is
    singular, and a numerically imaginary part (< 1e-3 on the diagonal) dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (constant features, N <= D) is expected, not news
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g}); the covariances are not PSD")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------------------
# Helpers: image conversion, content hashes, atomic writes
# --------------------------------------------------------------------------------------------------------------


def content_hash(*arrays: np.ndarray | torch.Tensor | str | bytes) -> str:
    """sha256 over dtype, shape and bytes of every array (strings/bytes hashed as given)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str):
            a = a.encode()
        if isinstance(a, bytes):
            h.update(b"b" + len(a).to_bytes(8, "little") + a)
            continue
        a = a.detach().cpu().contiguous().numpy() if torch.is_tensor(a) else np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _as_tensor(images: Any, what: str) -> torch.Tensor:
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no images")
    return x


def to_unit_range(images: Any, what: str = "images") -> torch.Tensor:
    """(N, C, H, W) uint8 in [0, 255] or float in [-1, 1] -> float32 in [-1, 1] on 8-bit levels.

    Floats are rounded to the 256 levels a saved PNG would have by ``diffusion.sampling.to_uint8`` (DiT's rounding,
    the function the sweep applies to samples), so that samples and real data are scored alike.
    Floats slightly outside [-1, 1] (sampler overshoot) are clipped; a clearly different range is an error.
    """
    x = _as_tensor(images, what)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected uint8 or floating images, got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1.5 or hi > 1.5:
        raise ValueError(f"{what}: float images must lie in [-1, 1] (found [{lo:.3g}, {hi:.3g}]); "
                         f"map [0, 1] data with 2*x-1 or pass uint8")
    return to_uint8(x).float() / 127.5 - 1


# --------------------------------------------------------------------------------------------------------------
# Inception metrics through torch-fidelity
# --------------------------------------------------------------------------------------------------------------

INCEPTION_EXTRACTOR = "inception-v3-compat"
WEIGHTS_CONFIG_KEY = "eval.inception_weights"  # the sweep's Hydra key (conf/bench.yaml)
# pytorch-fid's file; torch-fidelity's weights-inception-... holds exactly the same 566 tensors (evaluation.md §1.2).
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
_TF_KEYS = {
    "frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std", "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std", "precision": "precision", "recall": "recall", "f_score": "f_score",
}


def _weights_only_error(e: Exception) -> str:
    """The informative line of a (long) weights-only unpickling error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "weightsunpickler error" in ln.lower() or "unsupported" in ln.lower()), None)
    return f"{type(e).__name__}: {hit or (lines[0] if lines else '')}"


def _load_inception_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file) from one read of ``path``, loaded weights-only and validated."""
    data = path.read_bytes()
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a foreign or torn file: never unpickled
        raise ValueError(f"{path} is not a tensor-only state dict, refused without unpickling it "
                         f"({_weights_only_error(e)}); expected the FID Inception weights {INCEPTION_WEIGHTS_FILE}"
                         ) from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is not a state dict of tensors; expected the FID Inception weights "
                         f"{INCEPTION_WEIGHTS_FILE} (expected key fc.weight of shape (1008, 2048))")
    fc = sd.get("fc.weight")
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise ValueError(f"{path} is not the FID Inception state dict {INCEPTION_WEIGHTS_FILE} "
                         f"(expected key fc.weight of shape (1008, 2048))")
    return sd, hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _forced_weights_only_load() -> Iterator[None]:
    """Inside, every ``torch.load`` is weights-only even where the caller passes ``weights_only=False``."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _inception_extractor(state_dict: dict[str, torch.Tensor], features: list[str]) -> nn.Module:
    """torch-fidelity's InceptionV3 with ``state_dict`` and no file path.

    Its constructor takes only a path (loaded with ``weights_only=False``) or None (hub cache / download, also
    unpickled), so it gets an in-memory re-serialisation of the tensors we loaded weights-only, and its load runs
    with weights-only forced on as a second guard.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    with _forced_weights_only_load():
        return FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, features, feature_extractor_weights_path=buf)


OFFLINE_ENV = "BENCH_OFFLINE"  # set to 1 to never download the Inception weights (the test suite sets it)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _download_url(url: str, dst: Path, progress: bool = True) -> None:
    """The one network access of this module (tests replace it)."""
    torch.hub.download_url_to_file(url, str(dst), progress=progress)


def download_inception_weights(hub: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download torch-fidelity's Inception weights (``INCEPTION_WEIGHTS_URLS[1]``) into ``hub`` (default
    ``$TORCH_HOME/hub/checkpoints``, where torch-fidelity caches them and :func:`resolve_inception_weights` looks).

    The file is validated with a weights-only load before it gets its final name, so a torn or foreign download is
    never left where the loader looks. Raises whatever the download or the validation raised.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints" if hub is None else Path(hub)
    hub.mkdir(parents=True, exist_ok=True)
    dst = hub / TORCH_FIDELITY_WEIGHTS_FILE
    tmp = hub / f".{TORCH_FIDELITY_WEIGHTS_FILE}.{os.getpid()}.download"
    try:
        _download_url(INCEPTION_WEIGHTS_URLS[1], tmp, progress)
        _load_inception_state_dict(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _resolve_inception_weights(inception_weights: str | os.PathLike | None) -> tuple[Path, str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_CONFIG_KEY}={path}: no such file. It must be the FID Inception "
                                    f"state dict {INCEPTION_WEIGHTS_FILE} (download: {INCEPTION_WEIGHTS_URLS[0]})")
    else:
        cached = [hub / TORCH_FIDELITY_WEIGHTS_FILE, hub / INCEPTION_WEIGHTS_FILE]
        path = next((p for p in cached if p.is_file()), None)
        failure = ""
        if path is None and _offline():
            failure = f"the automatic download is disabled by {OFFLINE_ENV}={os.environ.get(OFFLINE_ENV)}"
        elif path is None:
            try:
                path = download_inception_weights(hub)
            except Exception as e:  # offline, a proxy page, a full disk: the error below says what to do
                failure = f"the automatic download of {INCEPTION_WEIGHTS_URLS[1]} failed: {type(e).__name__}: {e}"
        if path is None:
            raise FileNotFoundError(
                f"Inception FID weights not found ({failure}). Download {INCEPTION_WEIGHTS_FILE} on a machine with "
                f"internet ({INCEPTION_WEIGHTS_URLS[0]}; torch-fidelity's {TORCH_FIDELITY_WEIGHTS_FILE} from "
                f"{INCEPTION_WEIGHTS_URLS[1]} is the same tensors), then either pass "
                f"{WEIGHTS_CONFIG_KEY}=/path/to/{INCEPTION_WEIGHTS_FILE} or copy it to "
                f"{hub / TORCH_FIDELITY_WEIGHTS_FILE} (torch-fidelity's cache; $TORCH_HOME/hub/checkpoints). "
                f"Without Inception weights use eval.metric=classifier (fd_<dataset>_classifier).")
    _, sha = _load_inception_state_dict(path)
    return path, sha


def resolve_inception_weights(inception_weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: the configured path, else torch-fidelity's or pytorch-fid's hub cache, else
    torch-fidelity's file downloaded into that cache (unless ``BENCH_OFFLINE=1``).

    Raises FileNotFoundError naming the file, both ways to provide it and why the download did not happen when
    there is none, and ValueError when the file is not a tensor-only FID Inception state dict (checked with a
    weights-only load).
    """
    return _resolve_inception_weights(inception_weights)[0]


def _read_npz(path: Path | None, ndims: dict[str, int]) -> dict[str, np.ndarray] | None:
    """Float arrays ``ndims`` (name -> ndim) of a cached .npz, read with ``allow_pickle=False``; None when the file
    is absent (or there is no cache) or rejected (with a warning: it is then recomputed and replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            out = {k: z[k] for k in ndims}
        for k, nd in ndims.items():
            if out[k].dtype.kind != "f" or out[k].ndim != nd or not np.isfinite(out[k]).all():
                raise ValueError(f"{k}: unexpected {out[k].dtype} array of shape {out[k].shape}")
    except Exception as e:
        warnings.warn(f"ignoring cache file {path} ({type(e).__name__}: {e}); recomputing and replacing it",
                      stacklevel=3)
        return None
    return out


def to_uint8_rgb(images: Any, what: str = "images") -> torch.Tensor:
    """(N, 1|3, H, W) uint8 or float in [-1, 1] -> uint8 (N, 3, H, W); grayscale is repeated to 3 channels."""
    x = torch.as_tensor(images)
    x = x.detach().cpu() if x.dtype == torch.uint8 else to_uint8(to_unit_range(x, what), what)
    if x.ndim != 4 or x.shape[0] == 0:
        x = _as_tensor(x, what)  # the shape errors
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"{what}: Inception metrics need 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


# --------------------------------------------------------------------------------------------------------------
# Image sources (streamed as uint8 RGB batches) and reference statistics files
# --------------------------------------------------------------------------------------------------------------

ADM_LAYOUT = ("uint8 images (N, H, W, 3) under arr_0: ADM's evaluator layout, which diffusion.sampling.save_npz "
              "(python -m diffusion.sample) and DiT's sample_ddp.py write")
STATISTICS_LAYOUT = ("an FID statistics .npz holding mu (D,) and sigma (D, D) of the Inception pool features "
                     "(ADM's reference batches such as VIRTUAL_imagenet256_labeled.npz, or python -m bench.fid ref)")


class ImageSource:
    """Images fed to the feature extractor as uint8 RGB (B, 3, H, W) batches, so that no set is ever held as one
    float tensor. ``image_shape`` is (3, H, W); ``cache_key`` names the content in cache file names."""

    what = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    @property
    def cache_key(self) -> str:
        raise NotImplementedError


class TensorImages(ImageSource):
    """Images in memory: (N, C, H, W) uint8 or float in [-1, 1], converted to uint8 RGB once; keyed by content."""

    def __init__(self, images: Any, what: str = "images"):
        self.images, self.what = to_uint8_rgb(images, what), what

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.images), batch_size):
            yield self.images[i:i + batch_size]

    @functools.cached_property
    def cache_key(self) -> str:
        return f"ref-{content_hash(self.images)[:16]}"


def _plain_name(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


class DatasetImages(ImageSource):
    """A ``diffusion.data.Dataset`` streamed through its ``uint8_batches`` (CIFAR-10's 50k training images are
    never one float tensor; only their features are kept).

    ``limit`` keeps the first ``limit`` images (U-ViT's CelebA-64 statistics use 50,000 training images). The cache
    key is the dataset's identity, not a hash of every image: name, ``split``, image size, channels, ``identity()``
    (crop protocol, ...), length, plus a content hash of its first and last ``PROBE`` images, so statistics are never
    reused under another dataset recipe or another copy of the data. VAE-latent datasets are refused (their
    references are the source images or a statistics file).
    """

    PROBE = 32

    def __init__(self, dataset: Any, split: str | None = None, what: str = "reference", limit: int | None = None):
        if not getattr(dataset, "pixel_space", True):
            raise ValueError(f"dataset {dataset.name} holds VAE latents, not images: an FID reference comes from the "
                             f"source images (a pixel dataset) or from {STATISTICS_LAYOUT} (eval.reference=<file>)")
        if dataset.channels not in (1, 3):
            raise ValueError(f"dataset {dataset.name}: Inception metrics need 1 or 3 channels, not {dataset.channels}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name} ({split or 'no split'}) holds no images")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit}: keep at least one image")
        self.dataset, self.what = dataset, what
        self.n = len(dataset) if limit is None else min(int(limit), len(dataset))
        self.split = split if split is not None else getattr(dataset, "split", None)

    def __len__(self) -> int:
        return self.n

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.dataset.image_size, self.dataset.image_size)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self.dataset.uint8_batches(batch_size, limit=self.n):
            yield to_uint8_rgb(batch, f"{self.dataset.name} images")

    def identity(self) -> dict[str, Any]:
        ds, n = self.dataset, self.n
        k = min(self.PROBE, n)
        first, last = (to_uint8(ds.fetch(torch.arange(a, b))[0]) for a, b in ((0, k), (n - k, n)))
        return {"name": ds.name, "split": self.split, "image_size": ds.image_size, "channels": ds.channels,
                "identity": ds.identity(), "len": n, "probe": content_hash(first, last)}

    @functools.cached_property
    def cache_key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return f"ref-{_plain_name(self.dataset.name)}-{_plain_name(self.split or 'all')}-{content_hash(text)[:16]}"


def _read_exact(f: Any, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        got = f.readinto(view[pos:])
        if not got:
            raise ValueError(f"{what} is truncated ({pos} of {n} bytes of a batch)")
        pos += got
    return buf


class NpzImages(ImageSource):
    """The uint8 (N, H, W, C) images (C = 3, or 1 for grayscale) stored under ``key`` (``arr_0``) of an .npz,
    streamed batch by batch straight from the archive (50k samples at 256 px are 9.8 GB).

    Nothing is unpickled: the .npy header is parsed (a literal, not a pickle), an object or non-uint8 array is
    refused before any data is read, and the data are copied as raw bytes.
    """

    def __init__(self, path: str | os.PathLike, key: str = "arr_0", what: str = "samples"):
        self.path, self.key, self.what = Path(path).expanduser(), key, what
        with self._member() as (_, shape):
            self.shape = shape

    @contextlib.contextmanager
    def _member(self) -> Iterator[tuple[Any, tuple[int, int, int, int]]]:
        """The open array member positioned at its data, and its (N, H, W, C) shape (validated)."""
        path = self.path
        if not path.is_file():
            raise FileNotFoundError(f"{self.what} {path}: no such file; expected an .npz of {ADM_LAYOUT}")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{self.what} {path} is not an .npz archive; expected {ADM_LAYOUT}")
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if self.key not in names:
                raise ValueError(f"{self.what} {path} has no {self.key} array (it holds {', '.join(names) or 'none'}); "
                                 f"expected {ADM_LAYOUT}")
            with zf.open(f"{self.key}.npy") as f:
                try:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                except ValueError as e:
                    raise ValueError(f"{self.what} {path}: {self.key} is not a readable .npy array ({e}); expected "
                                     f"{ADM_LAYOUT}") from None
                if (dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] not in (1, 3) or shape[0] < 1
                        or 0 in shape):
                    got = f"{dtype} array of shape {tuple(shape)}{' (Fortran order)' if fortran else ''}"
                    raise ValueError(f"{self.what} {path}: {self.key} is a {got}; expected {ADM_LAYOUT}")
                yield f, tuple(int(s) for s in shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.shape[1], self.shape[2])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        with self._member() as (f, (n, h, w, c)):
            for start in range(0, n, batch_size):
                k = min(batch_size, n - start)
                buf = _read_exact(f, k * h * w * c, f"{self.what} {self.path}")
                arr = torch.frombuffer(buf, dtype=torch.uint8).reshape(k, h, w, c)
                yield to_uint8_rgb(arr.permute(0, 3, 1, 2), f"{self.what} {self.path}")

    @functools.cached_property
    def cache_key(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return f"npz-{_plain_name(self.key)}-{h.hexdigest()[:16]}"


@dataclasses.dataclass(eq=False)
class ReferenceStatistics:
    """FID reference statistics: ``mu`` (D,) and ``sigma`` (D, D) of the Inception pool features, as ADM's
    reference batches hold them (``read_statistics``); ``images`` are the file's ``arr_0`` (ADM ships 10,000 for
    precision/recall), used for KID and precision/recall only."""

    mu: np.ndarray
    sigma: np.ndarray
    path: Path | None = None
    images: NpzImages | None = None

    def __post_init__(self) -> None:
        where = str(self.path) if self.path is not None else "reference statistics"
        mu, sigma = np.asarray(self.mu), np.asarray(self.sigma)
        for name, a, nd in (("mu", mu, 1), ("sigma", sigma, 2)):
            if a.dtype.kind != "f" or a.ndim != nd:
                raise ValueError(f"{where}: {name} is a {a.dtype} array of shape {a.shape}, expected a float "
                                 f"{'(D,)' if nd == 1 else '(D, D)'} array; expected {STATISTICS_LAYOUT}")
        if mu.size == 0 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not fit together (mu (D,), sigma "
                             f"(D, D)); expected {STATISTICS_LAYOUT}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{where}: mu or sigma contains NaN or inf")
        self.mu, self.sigma = mu, sigma


def read_statistics(path: str | os.PathLike) -> ReferenceStatistics:
    """FID reference statistics from an .npz (ADM reference batch layout: ``mu``, ``sigma``, optionally ``arr_0``
    images; ``mu_s``/``sigma_s``, the spatial sFID statistics, are ignored), read with ``allow_pickle=False`` and
    validated (keys, shapes, finite values); errors name the file and the expected keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics {path}: no such file; expected {STATISTICS_LAYOUT}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a numpy file, a torn archive, ...
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); expected {STATISTICS_LAYOUT}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive; expected {STATISTICS_LAYOUT}")
    with z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} (it holds {', '.join(z.files) or 'nothing'}); "
                             f"expected {STATISTICS_LAYOUT}")
        try:
            mu, sigma = z["mu"], z["sigma"]
        except ValueError as e:  # object arrays: refused without unpickling
            raise ValueError(f"{path}: {e}; expected {STATISTICS_LAYOUT}") from None
        has_images = "arr_0" in z.files
    images = NpzImages(path, "arr_0", what="reference images") if has_images else None
    return ReferenceStatistics(mu, sigma, path, images)


def write_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: Any) -> Path:
    """Write FID statistics as an ADM-format .npz (``mu``, ``sigma`` plus ``extra`` arrays), atomically."""
    stats = ReferenceStatistics(mu, sigma, Path(path))  # validated
    arrays = {k: np.asarray(v) for k, v in extra.items()}
    if any(a.dtype.hasobject for a in arrays.values()):
        raise TypeError("write_statistics: extra arrays must not hold Python objects (they would need pickle)")
    return atomic_write(path, lambda fh: np.savez(fh, mu=stats.mu, sigma=stats.sigma, **arrays))


def _is_dataset(obj: Any) -> bool:
    from diffusion.data import Dataset

    return isinstance(obj, Dataset)


class InceptionMetric:
    """FID (and KID / IS / precision-recall on request) of samples against a fixed reference.

    ``reference`` is one of:

    * images: (N, C, H, W) uint8 or float in [-1, 1], cached under their content hash;
    * a ``diffusion.data.Dataset`` split (``split`` names it), streamed batch by batch (``DatasetImages``: CIFAR-10's
      50k training images, CelebA-64, ...), cached under the dataset's identity;
    * ``ReferenceStatistics`` (``read_statistics``, or :meth:`from_statistics`): precomputed ``mu``/``sigma`` such as
      ADM's ``VIRTUAL_imagenet256_labeled.npz``; FID compares against them as they are; KID and precision/recall
      need the file's ``arr_0`` images (an error says so otherwise);
    * any ``ImageSource`` (``NpzImages``: another ADM-layout sample batch).

    ``score`` takes images or an ``ImageSource`` (``NpzImages(path)``) and returns ``metric_name="fid"`` and
    ``metric_value``, plus ``kid_mean``, ``kid_std``, ``isc_mean``, ``isc_std``, ``precision``, ``recall``,
    ``f_score`` when requested. Precision/recall use the Inception pool features (ADM's convention), not
    torch-fidelity's VGG16 default. Features are extracted here batch by batch (tqdm progress bar unless
    ``progress=False``; 8 KB of features per image are kept, never the images) and scored with torch-fidelity's
    metric functions. Reference features/statistics are cached in ``cache_dir`` as .npz under the reference's key
    and the weights file's hash (``cache_dir=None``: no cache). ``feature_extractor`` other than Inception (a project
    extractor registered with ``torch_fidelity.register_feature_extractor``; torch-fidelity's other built-ins unpickle
    or download their weights and are refused) exists for tests and renames the metric to ``fd_<extractor>``.
    """

    def __init__(self, reference: Any, cache_dir: str | os.PathLike | None, inception_weights: str | None = None,
                 device: str | torch.device = "cpu", kid: bool = False, isc: bool = False, prc: bool = False,
                 batch_size: int = 64, kid_subset_size: int = 1000, seed: int = 2020, verbose: bool = False,
                 feature_extractor: str = INCEPTION_EXTRACTOR, progress: bool = True, split: str | None = None):
        self.statistics: ReferenceStatistics | None = None
        self.reference: ImageSource | None
        if split is not None and not _is_dataset(reference):
            raise ValueError(f"split={split!r} applies to a Dataset reference only")
        if isinstance(reference, ReferenceStatistics):
            self.statistics, self.reference = reference, reference.images
            if (kid or prc) and reference.images is None:
                raise ValueError(f"KID and precision/recall need per-sample reference features, and "
                                 f"{reference.path or 'the reference statistics'} holds only mu and sigma (no arr_0 "
                                 f"images; ADM's reference batches carry 10,000): compute FID only, or use a "
                                 f"reference with images")
        elif isinstance(reference, ImageSource):
            self.reference = reference
        elif _is_dataset(reference):
            self.reference = DatasetImages(reference, split)
        else:
            self.reference = TensorImages(reference, "reference_images")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"InceptionMetric: device must be cpu or cuda, got {device}")
        self.kid, self.isc, self.prc = kid, isc, prc
        self.batch_size, self.kid_subset_size, self.seed, self.verbose = batch_size, kid_subset_size, seed, verbose
        self.progress = progress
        self.feature_extractor = feature_extractor
        if feature_extractor == INCEPTION_EXTRACTOR:
            self.weights_path: Path | None
            self.weights_path, self._weights_sha = _resolve_inception_weights(inception_weights)
            self._weights_tag = self._weights_sha[:12]
            self.metric_name = "fid"
        else:
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

            cls = FEATURE_EXTRACTORS_REGISTRY.get(feature_extractor)
            if cls is None:
                raise ValueError(f"feature extractor {feature_extractor!r} is not registered")
            if cls.__module__.startswith("torch_fidelity"):
                raise ValueError(f"torch-fidelity's built-in extractor {feature_extractor!r} loads its weights with "
                                 f"full unpickling (or downloads them); use {INCEPTION_EXTRACTOR} or a project "
                                 f"extractor")
            if inception_weights is not None:
                raise ValueError(f"inception_weights applies to {INCEPTION_EXTRACTOR} only, not {feature_extractor}")
            self.weights_path, self._weights_sha = None, ""
            self._weights_tag = "none"
            self.metric_name = f"fd_{feature_extractor}"
        self._extractor: nn.Module | None = None
        self._layers: dict[str, str] = {}
        self._ref: tuple[dict[str, torch.Tensor], dict[str, np.ndarray]] | None = None

    @classmethod
    def from_statistics(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                        **kwargs: Any) -> InceptionMetric:
        """Against the statistics of an .npz (an ADM reference batch or ``python -m bench.fid ref``)."""
        return cls(read_statistics(path), cache_dir, **kwargs)

    @functools.cached_property
    def reference_key(self) -> str:
        """Cache files are named by this key (the reference's content or identity and the weights' hash) plus the
        extractor name and feature layer."""
        if self.reference is None:
            source = f"stats-{content_hash(self.statistics.mu, self.statistics.sigma)[:16]}"
        else:
            source = self.reference.cache_key
        return f"{source}-w{self._weights_tag}"

    def _key(self, tf_key: str) -> str:
        name = _TF_KEYS[tf_key]
        if self.feature_extractor == INCEPTION_EXTRACTOR:
            return name
        return self.metric_name if name == "fid" else f"{self.feature_extractor}_{name}"

    def _get_extractor(self) -> tuple[nn.Module, dict[str, str]]:
        """The feature extractor (built once) and the feature layer of each requested metric."""
        if self._extractor is None:
            metrics = ["fid"] + [m for m, on in (("kid", self.kid), ("isc", self.isc), ("prc", self.prc)) if on]
            if self.feature_extractor == INCEPTION_EXTRACTOR:
                from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as cls

                sd, sha = _load_inception_state_dict(self.weights_path)
                if sha != self._weights_sha:
                    raise RuntimeError(f"{self.weights_path} changed since this InceptionMetric was created")
            else:
                from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

                cls = FEATURE_EXTRACTORS_REGISTRY[self.feature_extractor]
            layers = {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}
            features = sorted(set(layers.values()))
            if self.feature_extractor == INCEPTION_EXTRACTOR:
                ext = _inception_extractor(sd, features)
            else:
                ext = cls(self.feature_extractor, features)
            self._extractor, self._layers = ext.requires_grad_(False).eval().to(self.device), layers
        return self._extractor, self._layers

    @torch.no_grad()
    def _extract(self, source: ImageSource, what: str, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
        """{layer: (N, D) CPU features} of a source, batch by batch, for the layers in ``keep`` (default all)."""
        from tqdm.auto import tqdm

        ext, _ = self._get_extractor()
        n, pos = len(source), 0
        out: dict[str, torch.Tensor] = {}
        with tqdm(total=n, desc=f"{self.metric_name}: {what} features", unit="img", leave=False,
                  dynamic_ncols=True, disable=not self.progress) as bar:
            for batch in source.batches(self.batch_size):
                b = len(batch)
                if pos + b > n:
                    raise RuntimeError(f"{what} images: the source gave more than its {n} images")
                for k, v in ext.convert_features_tuple_to_dict(ext(batch.to(self.device))).items():
                    if keep is None or k in keep:
                        if k not in out:
                            out[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
                        out[k][pos:pos + b] = v.detach().cpu()
                pos += b
                bar.update(b)
        if pos != n:
            raise RuntimeError(f"{what} images: the source gave {pos} images, not its {n}")
        return out

    def _cache_file(self, what: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.reference_key}-{self.feature_extractor}-{what}.npz"

    def _write_cache(self, what: str, **arrays: np.ndarray) -> None:
        path = self._cache_file(what)
        if path is not None:
            atomic_write(path, lambda fh: np.savez(fh, **arrays))

    def _reference(self) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """Reference features (layers KID / precision-recall use) and FID statistics: given statistics, memory,
        .npz cache, or extracted now and cached (atomic writes)."""
        from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

        if self._ref is not None:
            return self._ref
        _, layers = self._get_extractor()
        if self.statistics is not None:
            stats: dict[str, np.ndarray] | None = {"mu": self.statistics.mu, "sigma": self.statistics.sigma}
        else:
            stat_file = self._cache_file(f"stat-fid-{layers['fid']}")
            stats = _read_npz(stat_file, {"mu": 1, "sigma": 2})
            if stats is not None and stats["sigma"].shape != (stats["mu"].size,) * 2:
                warnings.warn(f"ignoring cache file {stat_file} (inconsistent shapes); recomputing and replacing it")
                stats = None
        n = len(self.reference) if self.reference is not None else 0
        feats: dict[str, np.ndarray | None] = {}
        for layer in sorted({layers[m] for m in ("kid", "prc") if m in layers}):
            f = _read_npz(self._cache_file(f"features-{layer}"), {"features": 2})
            feats[layer] = f["features"] if f is not None and len(f["features"]) == n else None
        missing = {layer for layer, f in feats.items() if f is None}
        if stats is None or missing:
            keep = missing | ({layers["fid"]} if stats is None else set())
            extracted = self._extract(self.reference, "reference", keep)
            if stats is None:
                stats = fid_featuresdict_to_statistics(extracted, layers["fid"])
                self._write_cache(f"stat-fid-{layers['fid']}", mu=stats["mu"], sigma=stats["sigma"])
            for layer in missing:
                feats[layer] = extracted[layer].numpy()
                self._write_cache(f"features-{layer}", features=feats[layer])
        self._ref = ({k: torch.from_numpy(v) for k, v in feats.items()}, stats)
        return self._ref

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the reference in the FID feature layer (given, cached, or extracted now)."""
        stats = self._reference()[1]
        return stats["mu"], stats["sigma"]

    def score(self, samples: Any, labels: Any = None) -> dict[str, Any]:
        """Metrics of ``samples``: (N, C, H, W) uint8 or float in [-1, 1], or an ``ImageSource`` such as
        ``NpzImages(path)``; ``labels`` are unused (no classifier)."""
        from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_featuresdict_to_metric
        from torch_fidelity.metric_kid import kid_featuresdict_to_metric
        from torch_fidelity.metric_prc import prc_featuresdict_to_metric

        src = samples if isinstance(samples, ImageSource) else TensorImages(samples, "samples")
        if self.statistics is None and src.image_shape != self.reference.image_shape:
            raise ValueError(f"samples {src.image_shape} and reference images {self.reference.image_shape} differ in "
                             f"shape")
        _, layers = self._get_extractor()
        ref_feats, ref_stats = self._reference()
        feats = self._extract(src, "sample")
        n_ref = len(self.reference) if self.reference is not None else len(src)
        # torch-fidelity's conventions: input1 = samples, input2 = reference; its defaults for everything else.
        kwargs: dict[str, Any] = dict(cuda=self.device.type == "cuda", rng_seed=self.seed, save_cpu_ram=True,
                                      kid_subset_size=min(self.kid_subset_size, len(src), n_ref),
                                      verbose=self.verbose)
        stats = fid_featuresdict_to_statistics(feats, layers["fid"])
        ref_stats = {k: np.asarray(v, dtype=stats[k].dtype) for k, v in ref_stats.items()}
        if stats["mu"].shape != ref_stats["mu"].shape:
            where = (self.statistics.path if self.statistics is not None
                     else self._cache_file(f"stat-fid-{layers['fid']}") or "the reference")
            raise ValueError(f"{where}: reference statistics of dimension {ref_stats['mu'].shape[0]}, the "
                             f"{self.feature_extractor} features have {stats['mu'].shape[0]}")
        raw = fid_statistics_to_metric(stats, ref_stats, self.verbose)
        if self.kid:
            raw.update(kid_featuresdict_to_metric(feats, ref_feats, layers["kid"], **kwargs))
        if self.isc:
            raw.update(isc_featuresdict_to_metric(feats, layers["isc"], **kwargs))
        if self.prc:
            raw.update(prc_featuresdict_to_metric(feats, ref_feats, layers["prc"], **kwargs))
        out: dict[str, Any] = {self._key(k): float(v) for k, v in raw.items() if k in _TF_KEYS}
        out.update(metric_name=self.metric_name, metric_value=out[self.metric_name],
                   classifier_accuracy=float("nan"), num_samples=len(src))
        return out


# --------------------------------------------------------------------------------------------------------------
# Classifier metric (CPU scale)
# --------------------------------------------------------------------------------------------------------------

# Bump "version" whenever the architecture or training recipe changes: it is part of the cache key.
# 500 steps x 128 (~1 epoch of Fashion-MNIST) reach ~86% test accuracy at 16x16 in ~25 s of CPU time.
CLASSIFIER_RECIPE: dict[str, Any] = dict(version=1, widths=[16, 32, 64], steps=500, batch=128, lr=3e-3,
                                         weight_decay=1e-4, seed=0)


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU stages with 2x max-pooling between them, global average pool, linear head.

    The features are the globally pooled last stage (the input of the head), like Inception's pool3 for FID.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        self.feature_dim = c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, widths[-1]): the input of the linear head."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _train_classifier(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, recipe: dict[str, Any],
                      desc: str = "metric classifier", progress: bool = False) -> None:
    """Fixed step budget, AdamW with linear decay to 0, seeded shuffling: the same weights on every run."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps, batch, n = recipe["steps"], min(recipe["batch"], len(images)), len(images)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    epochs, epoch = -(-steps // (n // batch)), 1  # an epoch is n // batch steps (the remainder is dropped)
    model.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    with tqdm(total=steps, desc=f"{desc}: epoch 1/{epochs}", unit="step", leave=False, dynamic_ncols=True,
              disable=not progress) as bar:
        for _ in range(steps):
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=gen), 0
                epoch += 1
                bar.set_description(f"{desc}: epoch {epoch}/{epochs}", refresh=False)
            idx = perm[pos:pos + batch]
            pos += batch
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    model.eval()


@torch.inference_mode()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 1000,
             desc: str | None = None) -> torch.Tensor:
    """``fn`` over ``x`` in batches; a tqdm progress bar named ``desc`` when given."""
    from tqdm.auto import tqdm

    with tqdm(total=len(x), desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=desc is None) as bar:
        out = []
        for i in range(0, len(x), batch):
            out.append(fn(x[i:i + batch]))
            bar.update(len(out[-1]))
    return torch.cat(out)


def _load_cache(path: Path, what: str) -> Any:
    """A cached .pt file loaded weights-only (``runio.files.load_file``); None when absent or rejected (with a
    warning: it is then recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        return load_file(path, what)
    except RuntimeError as e:
        reason = _weights_only_error(e.__cause__) if e.__cause__ is not None else str(e)
        warnings.warn(f"ignoring {what} {path} ({reason}); recomputing and replacing it", stacklevel=3)
        return None


class ClassifierMetric:
    """``fd_<dataset>_classifier``: Frechet distance in a small classifier's penultimate features, and its accuracy
    on class-conditional samples.

    The classifier is trained once per (dataset name, image shape, training-data content hash, recipe) and cached
    in ``cache_dir`` (atomic write; loaded with ``weights_only=True``); its accuracy on the test split is recorded.
    The real-data statistics come from the test split (the first ``num_reference`` images when given) and are
    cached too. A cache file that fails the weights-only load or validation is ignored with a warning and rebuilt.
    Training and feature extraction show tqdm progress bars (stderr) unless ``progress=False``.
    Images: (N, C, H, W) float in [-1, 1] or uint8; labels: (N,) ints in [0, num_classes).
    """

    def __init__(self, dataset_name: str, train_images: Any, train_labels: Any, test_images: Any, test_labels: Any,
                 cache_dir: str | os.PathLike, num_classes: int | None = None, num_reference: int | None = None,
                 recipe: dict[str, Any] | None = None, verbose: bool = False, progress: bool = True):
        if not dataset_name or any(c in dataset_name for c in "/\\ "):
            raise ValueError(f"dataset_name must be a plain name (no slashes or spaces), got {dataset_name!r}")
        self.dataset_name = dataset_name
        self.metric_name = f"fd_{dataset_name}_classifier"
        self.recipe = dict(CLASSIFIER_RECIPE if recipe is None else recipe)
        self.cache_dir = Path(cache_dir)
        train_x, test_x = to_unit_range(train_images, "train_images"), to_unit_range(test_images, "test_images")
        train_y, test_y = self._labels(train_labels, len(train_x), "train_labels"), \
            self._labels(test_labels, len(test_x), "test_labels")
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ValueError(f"train {tuple(train_x.shape[1:])} and test {tuple(test_x.shape[1:])} images differ")
        self.image_shape = tuple(train_x.shape[1:])
        self.num_classes = int(num_classes if num_classes is not None else max(train_y.max(), test_y.max()) + 1)
        if train_y.max() >= self.num_classes or test_y.max() >= self.num_classes:
            raise ValueError(f"labels exceed num_classes={self.num_classes}")
        c, h, w = self.image_shape
        key = content_hash(train_x, train_y, repr(sorted(self.recipe.items())), str(self.num_classes))[:16]
        self.classifier_path = self.cache_dir / f"classifier_{dataset_name}_{c}x{h}x{w}_{key}.pt"
        self.progress = progress
        self._desc = f"metric classifier {dataset_name}"
        ckpt = _load_cache(self.classifier_path, "metric classifier cache")
        self.model = self._new_model()
        if ckpt is not None:
            try:
                if not isinstance(ckpt, dict):
                    raise TypeError(f"holds a {type(ckpt).__name__}, not a dict")
                self.model.load_state_dict(ckpt["state_dict"])
                self.test_accuracy = float(ckpt["test_accuracy"])
                if not 0 <= self.test_accuracy <= 1:
                    raise ValueError(f"test_accuracy {self.test_accuracy} outside [0, 1]")
            except Exception as e:
                warnings.warn(f"ignoring metric classifier cache {self.classifier_path} ({type(e).__name__}: {e}); "
                              f"retraining and replacing it", stacklevel=2)
                ckpt, self.model = None, self._new_model()
        self.from_cache = ckpt is not None
        if not self.from_cache:
            self.model = self._new_model(train_x, train_y)
            self.test_accuracy = self._accuracy(test_x, test_y)
            atomic_torch_save(dict(state_dict=self.model.state_dict(), test_accuracy=self.test_accuracy,
                                    dataset=dataset_name, image_shape=list(self.image_shape),
                                    num_classes=self.num_classes, recipe=repr(sorted(self.recipe.items())),
                                    train_size=len(train_x)), self.classifier_path)
        if verbose:
            print(f"{self.metric_name}: classifier {'loaded' if self.from_cache else 'trained'} "
                  f"({self.classifier_path.name}), test accuracy {self.test_accuracy:.4f}")
        ref_x = test_x if num_reference is None else test_x[:num_reference]
        ref_path = self.classifier_path.with_name(f"{self.classifier_path.stem}_ref_{content_hash(ref_x)[:16]}.pt")
        st = self._cached_statistics(ref_path)
        if st is not None:
            self.ref_mu, self.ref_sigma = st
        else:
            self.ref_mu, self.ref_sigma = feature_statistics(self._features(ref_x, "reference features"))
            atomic_torch_save(dict(mu=torch.from_numpy(self.ref_mu), sigma=torch.from_numpy(self.ref_sigma),
                                    num=len(ref_x)), ref_path)
        self.num_reference = len(ref_x)

    def _new_model(self, train_x: torch.Tensor | None = None, train_y: torch.Tensor | None = None) -> SmallCNN:
        """The seeded initial classifier, trained on (train_x, train_y) when given; the caller's RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe["seed"])
            model = SmallCNN(self.image_shape[0], self.num_classes, self.recipe["widths"])
            if train_x is not None:
                _train_classifier(model, train_x, train_y, self.recipe, self._desc, self.progress)
        return model.eval().requires_grad_(False)

    def _cached_statistics(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        st = _load_cache(path, "metric classifier reference statistics")
        if st is None:
            return None
        d = self.model.feature_dim
        try:
            mu, sigma = st["mu"], st["sigma"]
            if not (torch.is_tensor(mu) and torch.is_tensor(sigma) and mu.shape == (d,) and sigma.shape == (d, d)
                    and mu.is_floating_point() and sigma.is_floating_point()):
                raise ValueError(f"expected float mu ({d},) and sigma ({d}, {d})")
            return mu.double().numpy(), sigma.double().numpy()
        except Exception as e:
            warnings.warn(f"ignoring metric classifier reference statistics {path} ({type(e).__name__}: {e}); "
                          f"recomputing and replacing them", stacklevel=3)
            return None

    @staticmethod
    def _labels(labels: Any, n: int, what: str) -> torch.Tensor:
        y = torch.as_tensor(labels).detach().cpu()
        if y.ndim != 1 or len(y) != n or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{what}: expected {n} integer class labels, got {tuple(y.shape)} {y.dtype}")
        if len(y) and y.min() < 0:
            raise ValueError(f"{what}: negative class label")
        return y.long()

    def features(self, images: Any) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images in [-1, 1] (or uint8)."""
        x = to_unit_range(images, "images")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images of shape {tuple(x.shape[1:])}, classifier trained on {self.image_shape}")
        return self._features(x, "features")

    def _features(self, x: torch.Tensor, what: str) -> torch.Tensor:
        return _batched(self.model.features, x, desc=f"{self._desc}: {what}" if self.progress else None)

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        logits = _batched(self.model, x, desc=f"{self._desc}: test accuracy" if self.progress else None)
        return float((logits.argmax(1) == y).float().mean())

    def score(self, samples: Any, labels: Any = None) -> dict[str, Any]:
        """FD of ``samples`` against the real test statistics, and accuracy w.r.t. the conditioning ``labels``."""
        x = to_unit_range(samples, "samples")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"samples of shape {tuple(x.shape[1:])}, classifier trained on {self.image_shape}")
        if len(x) < 2:
            raise ValueError("samples: the Frechet distance needs at least 2 samples")
        if len(x) <= self.model.feature_dim:
            warnings.warn(f"{self.metric_name}: {len(x)} samples <= {self.model.feature_dim} feature dims: "
                          f"the covariance is singular and the distance strongly biased", stacklevel=2)
        feats = self._features(x, "sample features")
        mu, sigma = feature_statistics(feats)
        acc = float("nan")
        if labels is not None:
            y = self._labels(labels, len(x), "labels")
            if y.max() >= self.num_classes:
                raise ValueError(f"labels: class {int(y.max())} >= num_classes={self.num_classes} "
                                 f"(the null class of unconditional samples has no accuracy: pass labels=None)")
            with torch.inference_mode():
                acc = float((self.model.head(feats).argmax(1) == y).float().mean())
        return dict(metric_name=self.metric_name, metric_value=frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
                    classifier_accuracy=acc, classifier_test_accuracy=self.test_accuracy, num_samples=len(x))
