"""Sample-quality metrics: Inception FID/KID/IS/precision-recall through torch-fidelity, and a classifier metric.

Two metrics with two names, never mixed up:

* ``fid`` (plus ``kid_mean``, ``isc_mean``, ``precision``, ... on request): the standard Inception metrics, computed
  by ``torch_fidelity.calculate_metrics`` on uint8 image tensors wrapped in a Dataset (torch-fidelity's
  conditional-generator path is broken with numpy >= 1.24, so samples are generated first). Runs on the CPU unless a
  CUDA device is requested (torch-fidelity itself defaults to CUDA). The Inception weights come from a local file
  (``inception_weights=``, sweep config ``eval.inception_weights=``) or torch-fidelity's / pytorch-fid's download cache
  under ``$TORCH_HOME/hub/checkpoints``; nothing is downloaded implicitly. Reference features and statistics are
  cached by torch-fidelity (temp file + rename) under a name made of the content hash of the reference images and
  of the weights file.
* ``fd_<dataset>_classifier``: the Frechet distance in the penultimate features of a small CNN that the project
  trains once per dataset on its training split (deterministic, cached; its test accuracy is recorded), plus that
  classifier's accuracy on class-conditional samples (predicted class == conditioning label). This is the CPU-scale
  metric for digits / Fashion-MNIST, where Inception is unavailable offline and slow (3-6 img/s on 2 cores). Its
  values are not comparable with Inception FID.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from runio.files import atomic_torch_save

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

    Floats are rounded to the 256 levels a saved PNG would have, so that samples and real data are scored alike.
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


def to_uint8(images: Any, what: str = "images") -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] (clipped) or uint8 -> uint8."""
    x = _as_tensor(images, what)
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


def resolve_inception_weights(inception_weights: str | os.PathLike | None = None) -> Path:
    """The local Inception weights file: the configured path, else torch-fidelity's or pytorch-fid's hub cache.

    Raises FileNotFoundError naming the file and where to put it when there is none (no download is attempted).
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_CONFIG_KEY}={path}: no such file. It must be the FID Inception "
                                    f"state dict {INCEPTION_WEIGHTS_FILE} (download: {INCEPTION_WEIGHTS_URLS[0]})")
    else:
        cached = [hub / TORCH_FIDELITY_WEIGHTS_FILE, hub / INCEPTION_WEIGHTS_FILE]
        path = next((p for p in cached if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Inception FID weights not found. Download {INCEPTION_WEIGHTS_FILE} on a machine with internet "
                f"({INCEPTION_WEIGHTS_URLS[0]}; torch-fidelity's {TORCH_FIDELITY_WEIGHTS_FILE} from "
                f"{INCEPTION_WEIGHTS_URLS[1]} is the same tensors), then either pass "
                f"{WEIGHTS_CONFIG_KEY}=/path/to/{INCEPTION_WEIGHTS_FILE} or copy it to "
                f"{hub / TORCH_FIDELITY_WEIGHTS_FILE} (torch-fidelity's cache; $TORCH_HOME/hub/checkpoints). "
                f"Without Inception weights use eval.metric=classifier (fd_<dataset>_classifier).")
    # torch-fidelity loads the file with weights_only=False; refuse anything that is not a plain state dict first.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable tensor-only state dict ({type(e).__name__}: {e}); "
                         f"expected the FID Inception weights {INCEPTION_WEIGHTS_FILE}") from e
    fc = sd.get("fc.weight") if isinstance(sd, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise ValueError(f"{path} is not the FID Inception state dict {INCEPTION_WEIGHTS_FILE} "
                         f"(expected key fc.weight of shape (1008, 2048))")
    return path


class _UInt8Images(torch.utils.data.Dataset):
    """The input torch-fidelity accepts: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8_rgb(images: Any, what: str = "images") -> torch.Tensor:
    """(N, 1|3, H, W) uint8 or float in [-1, 1] -> uint8 (N, 3, H, W); grayscale is repeated to 3 channels."""
    x = to_uint8(to_unit_range(images, what), what)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"{what}: Inception metrics need 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


class InceptionMetric:
    """FID (and KID / IS / precision-recall on request) of samples against fixed reference images.

    ``score`` returns ``metric_name="fid"`` and ``metric_value``, plus ``kid_mean``, ``kid_std``, ``isc_mean``,
    ``isc_std``, ``precision``, ``recall``, ``f_score`` when requested. Precision/recall use the Inception pool
    features (ADM's convention), not torch-fidelity's VGG16 default. Reference features/statistics are cached in
    ``cache_dir`` under the content hash of the reference images and of the weights file.
    ``feature_extractor`` other than Inception (registered with ``torch_fidelity.register_feature_extractor``)
    exists for tests and renames the metric to ``fd_<extractor>``.
    """

    def __init__(self, reference_images: Any, cache_dir: str | os.PathLike, inception_weights: str | None = None,
                 device: str | torch.device = "cpu", kid: bool = False, isc: bool = False, prc: bool = False,
                 batch_size: int = 64, kid_subset_size: int = 1000, seed: int = 2020, verbose: bool = False,
                 feature_extractor: str = INCEPTION_EXTRACTOR):
        self.reference = to_uint8_rgb(reference_images, "reference_images")
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"InceptionMetric: device must be cpu or cuda, got {device}")
        self.kid, self.isc, self.prc = kid, isc, prc
        self.batch_size, self.kid_subset_size, self.seed, self.verbose = batch_size, kid_subset_size, seed, verbose
        self.feature_extractor = feature_extractor
        if feature_extractor == INCEPTION_EXTRACTOR:
            self.weights_path: Path | None = resolve_inception_weights(inception_weights)
            h = hashlib.sha256()
            with open(self.weights_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            weights_tag = h.hexdigest()[:12]
            self.metric_name = "fid"
        else:
            self.weights_path = Path(inception_weights) if inception_weights else None
            weights_tag = "none"
            self.metric_name = f"fd_{feature_extractor}"
        # torch-fidelity keys its cache files by this name plus the extractor name and feature layer.
        self.reference_key = f"ref-{content_hash(self.reference)[:16]}-w{weights_tag}"

    def _key(self, tf_key: str) -> str:
        name = _TF_KEYS[tf_key]
        if self.feature_extractor == INCEPTION_EXTRACTOR:
            return name
        return self.metric_name if name == "fid" else f"{self.feature_extractor}_{name}"

    def score(self, samples: Any, labels: Any = None) -> dict[str, Any]:
        """Metrics of ``samples`` (N, C, H, W) uint8 or float in [-1, 1]; ``labels`` are unused (no classifier)."""
        import torch_fidelity

        x = to_uint8_rgb(samples, "samples")
        if x.shape[1:] != self.reference.shape[1:]:
            raise ValueError(f"samples {tuple(x.shape[1:])} and reference images {tuple(self.reference.shape[1:])} "
                             f"differ in shape")
        kwargs: dict[str, Any] = dict(
            input1=_UInt8Images(x), input2=_UInt8Images(self.reference), input2_cache_name=self.reference_key,
            cache_root=str(self.cache_dir), cache=True, cuda=self.device.type == "cuda", fid=True, kid=self.kid,
            isc=self.isc, prc=self.prc, feature_extractor=self.feature_extractor, batch_size=self.batch_size,
            feature_extractor_weights_path=None if self.weights_path is None else str(self.weights_path),
            kid_subset_size=min(self.kid_subset_size, len(x), len(self.reference)), rng_seed=self.seed,
            save_cpu_ram=True, datasets_download=False, verbose=self.verbose)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cuda" and self.device.index is not None:
            with torch.cuda.device(self.device.index):
                raw = torch_fidelity.calculate_metrics(**kwargs)
        else:
            raw = torch_fidelity.calculate_metrics(**kwargs)
        out: dict[str, Any] = {self._key(k): float(v) for k, v in raw.items() if k in _TF_KEYS}
        out.update(metric_name=self.metric_name, metric_value=out[self.metric_name],
                   classifier_accuracy=float("nan"), num_samples=len(x))
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


def _train_classifier(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, recipe: dict[str, Any]) -> None:
    """Fixed step budget, AdamW with linear decay to 0, seeded shuffling: the same weights on every run."""
    gen = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps, batch, n = recipe["steps"], min(recipe["batch"], len(images)), len(images)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.inference_mode()
def _batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


class ClassifierMetric:
    """``fd_<dataset>_classifier``: Frechet distance in a small classifier's penultimate features, and its accuracy
    on class-conditional samples.

    The classifier is trained once per (dataset name, image shape, training-data content hash, recipe) and cached
    in ``cache_dir`` (atomic write; loaded with ``weights_only=True``); its accuracy on the test split is recorded.
    The real-data statistics come from the test split (the first ``num_reference`` images when given) and are
    cached too. Images: (N, C, H, W) float in [-1, 1] or uint8; labels: (N,) ints in [0, num_classes).
    """

    def __init__(self, dataset_name: str, train_images: Any, train_labels: Any, test_images: Any, test_labels: Any,
                 cache_dir: str | os.PathLike, num_classes: int | None = None, num_reference: int | None = None,
                 recipe: dict[str, Any] | None = None, verbose: bool = False):
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
        self.from_cache = self.classifier_path.is_file()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.recipe["seed"])
            self.model = SmallCNN(c, self.num_classes, self.recipe["widths"])
            if not self.from_cache:
                _train_classifier(self.model, train_x, train_y, self.recipe)
        self.model.eval().requires_grad_(False)
        if self.from_cache:
            ckpt = torch.load(self.classifier_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(ckpt["state_dict"])
            self.test_accuracy = float(ckpt["test_accuracy"])
        else:
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
        if ref_path.is_file():
            st = torch.load(ref_path, map_location="cpu", weights_only=True)
            self.ref_mu, self.ref_sigma = st["mu"].numpy(), st["sigma"].numpy()
        else:
            self.ref_mu, self.ref_sigma = feature_statistics(self.features(ref_x))
            atomic_torch_save(dict(mu=torch.from_numpy(self.ref_mu), sigma=torch.from_numpy(self.ref_sigma),
                                    num=len(ref_x)), ref_path)
        self.num_reference = len(ref_x)

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
        return _batched(self.model.features, x)

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((_batched(self.model, x).argmax(1) == y).float().mean())

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
        feats = self.features(x)
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
