"""FID the papers' way: ADM-format reference statistics, ADM ``.npz`` sample batches, each paper's FID-50K protocol.

    python -m bench.fid --help

Two commands with ``key=value`` arguments (like ``diffusion.train``). Both need the Inception weights (a local file
``inception_weights=<file>``, torch-fidelity's cache, or its download: see ``bench.metrics``); results go to stdout,
progress bars to stderr.

* ``ref`` writes the FID reference statistics of a dataset split as an ADM-format ``.npz`` (``mu`` (2048,), ``sigma``
  (2048, 2048), ``num_images``; atomic write). The dataset is streamed batch by batch and composed like a training
  run's (``dataset=<name>``, ``dataset.root=``, ``dataset.crop=``, ...); ``split=train`` (default) or ``test``,
  ``limit=N`` keeps the first N images. CIFAR-10's standard reference, its 50k training images:
  ``python -m bench.fid ref dataset=cifar10 dataset.root=DIR split=train out=cifar10_train.npz``.
* ``score`` prints the FID of an ``.npz`` sample batch (``arr_0`` uint8 NHWC, as ``python -m diffusion.sample``,
  ``diffusion.sampling.save_npz`` and DiT's ``sample_ddp.py`` write it; streamed from disk) against ``ref=``:
  statistics (``mu``/``sigma``: an ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz``, or a file
  ``ref`` wrote) or another image batch (``arr_0``). It writes nothing unless ``cache_dir=`` is given:
  ``python -m bench.fid score samples=samples.npz ref=VIRTUAL_imagenet256_labeled.npz``.
  ``kid=true`` / ``prc=true`` (need reference images: ADM's batches carry 10,000) and ``isc=true`` add lines.

In a sweep the same protocol is a set of ``eval.*`` keys (``bench.sweep``): ``eval.metric=fid``,
``eval.num_samples``, ``eval.sampler``, ``eval.steps``, ``eval.cfg_scale``, ``eval.seed``, ``eval.labels``
(``balanced``: label i = i mod classes, the default; ``uniform``: uniformly random labels from a generator seeded by
``eval.seed``, DiT's ``sample_ddp.py``) and ``eval.reference`` (``test`` or ``train``: that split of the dataset,
streamed; or a statistics ``.npz``). The evaluator here is torch-fidelity's TF-compatible Inception
(``inception-v3-compat``; it agrees with TTUR's TF FID to about 1e-6 relative), not ADM's TensorFlow script.

Each paper's protocol, as far as its paper and official code state it ("unknown": not stated where we could read):

DiT (facebookresearch/DiT ``sample_ddp.py``, README, paper §4; ImageNet 256 and 512, SD-VAE latents)
    50,000 samples; DDPM, 250 steps; CFG 1.5 for the headline (XL/2: FID 2.27 at 256, 3.04 at 512), 1.0 for the
    scaling table (Table 4, 400K steps); labels uniformly random (``torch.randint`` per batch, not balanced: DiT
    issue #16); seed 0; reference ADM's ``VIRTUAL_imagenet256_labeled.npz`` / ``VIRTUAL_imagenet512.npz``; ADM's
    TensorFlow evaluator. Guidance acts on 3 of the 4 latent channels. Here: ``eval.metric=fid
    eval.num_samples=50000 eval.sampler=ddpm eval.steps=250 eval.cfg_scale=1.5 eval.labels=uniform
    eval.reference=<dir>/VIRTUAL_imagenet256_labeled.npz``.
DiCo (shallowdream204/DiCo ``sample_ddp.py`` and README; ImageNet 256, 512 in the paper)
    DiT's script: 50,000 samples, DDPM 250 steps, uniformly random labels, README seed 1234; CFG 1.0 for the 400K
    table (S/B/L/XL), 1.4 for DiCo-XL at 3750K (FID 2.05); CFG of DiCo-H and at 512: unknown. The ``.npz`` goes to
    ADM's TensorFlow suite; the reference file is not named (the suite's ImageNet-256 batch is
    ``VIRTUAL_imagenet256_labeled.npz``). Guidance on 3 channels (DiT's ``forward_with_cfg``).
DiMR (qihao067/DiMR ``eval.py``, ``utils.py``, ``datasets.py``, configs, README; ImageNet 256 released)
    50,000 samples, class-balanced: 50 per class (``evenly_sample=True``: ``eval.labels=balanced``); DPM-Solver
    (``predict_x0``), 250 steps (not one of our samplers); CFG in U-ViT's form with scale 0.4 (= 1.4 in DiT's form),
    or a power-cosine schedule with ``--cfg_scale_pow``: which one gave the published FIDs is unknown. Reported FIDs
    from ADM's TensorFlow suite (README: "for a fair comparison with DiT"); its in-training monitor uses pytorch-fid
    against ``fid_stats_imagenet256_guided_diffusion.npz``.
LiT (arXiv 2501.12976; the official code, techmonsterwang/LiT, could not be read here)
    ImageNet 256 and 512; tables give FID, IS, precision and recall (ADM's metric set) beside DiT's numbers; CFG 1.5
    for LiT-XL/2-G (2.32 at 256), 1.25 also reported (3.60), none for LiT-XL/2 (10.24). Sample count, sampler and
    steps, labels, reference file and evaluator: unknown (LiT is converted from DiT, so DiT's protocol is likely,
    not verified).
Diffusion-RWKV (feizc/Diffusion-RWKV; arXiv 2404.04478; CIFAR-10 32 and CelebA 64 unconditional, ImageNet 256/512)
    The repository's ``sample.py`` draws DDPM 250 steps with CFG 1.5 and uniformly random labels; it ships U-ViT's
    pytorch-fid port (``tools/fid_score.py``, ``mu``/``sigma`` ``.npz`` statistics) wired to no script. Sample
    count, reference statistics and evaluator of the paper's CIFAR-10, CelebA and ImageNet FIDs: unknown (the paper
    text could not be read here). A later paper (sCM, Table 2) quotes DRWKV-H/2 at ImageNet 512: FID 2.95 with
    250 x 2 network evaluations.
CIFAR-10 (the field's standard: DDPM, EDM, U-ViT)
    50,000 unconditional samples against the statistics of the 50,000 training images (EDM: ``cifar10-32x32.npz``,
    minimum over three seeds; U-ViT: ``fid_stats_cifar10_train_pytorch.npz``, pytorch-fid). Here:
    ``ref dataset=cifar10 split=train`` once, or ``eval.reference=train``.
CelebA 64 (U-ViT, whose data pipeline DiMR and Diffusion-RWKV's lineage reuse)
    50,000 samples against ``fid_stats_celeba64_train_50000_ddim.npz``: 50,000 training images with the DDIM-style
    crop (pytorch-fid). Here: ``ref dataset=celeba64 dataset.crop=ddim split=train limit=50000``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

LABEL_DISTRIBUTIONS = ("balanced", "uniform")
USAGE = """\
usage: python -m bench.fid ref dataset=<name> [dataset.root=DIR] [dataset.<key>=...] [split=train] [limit=N]
                           out=<stats.npz> [inception_weights=FILE] [device=auto] [batch_size=64]
       python -m bench.fid score samples=<samples.npz> ref=<stats or images .npz> [inception_weights=FILE]
                           [device=auto] [batch_size=64] [kid=false] [isc=false] [prc=false] [cache_dir=DIR]

ref    write the FID reference statistics (mu, sigma: ADM's layout) of a dataset split, e.g.
       python -m bench.fid ref dataset=cifar10 dataset.root=/data/cifar10 split=train out=cifar10_train.npz
score  print the FID of an .npz sample batch (arr_0 uint8 NHWC) against statistics (mu, sigma: an ADM reference
       batch or a file written by ref) or another image batch (arr_0), e.g.
       python -m bench.fid score samples=samples.npz ref=VIRTUAL_imagenet256_labeled.npz

Both need the Inception weights: inception_weights=<pt_inception-2015-12-05-6726825d.pth>, torch-fidelity's cache
$TORCH_HOME/hub/checkpoints, or its download (unless BENCH_OFFLINE=1). Each paper's protocol: pydoc bench.fid.
"""


class UsageError(ValueError):
    """A bad command line; the message names the argument."""


# ----------------------------------------------------------------------------------------------------------------
# Evaluation labels
# ----------------------------------------------------------------------------------------------------------------
def evaluation_labels(num_samples: int, num_classes: int, distribution: str = "balanced", seed: int = 0
                      ) -> torch.Tensor:
    """Class labels (int64) of an evaluation set of ``num_samples``.

    ``balanced``: label i = i mod ``num_classes`` (every class equally often, up to one sample; DiMR's 50 per class).
    ``uniform``: independent uniformly random labels (DiT's and DiCo's ``sample_ddp.py``: ``torch.randint`` per
    batch), drawn from a generator seeded by ``seed`` alone (through a hash, so not the stream of the sampling noise);
    the same on every rank and on every run; the global RNG is untouched.
    """
    if num_classes < 1:
        raise ValueError(f"evaluation labels need num_classes >= 1, got {num_classes}")
    if distribution == "balanced":
        return torch.arange(num_samples) % num_classes
    if distribution == "uniform":
        label_seed = int.from_bytes(hashlib.sha256(f"eval-labels:{int(seed)}".encode()).digest()[:8], "little") >> 1
        return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(label_seed))
    raise ValueError(f"unknown label distribution {distribution!r}; choose one of {', '.join(LABEL_DISTRIBUTIONS)}")


# ----------------------------------------------------------------------------------------------------------------
# References and scores
# ----------------------------------------------------------------------------------------------------------------
def load_reference(path: str | os.PathLike) -> Any:
    """An .npz as an FID reference: ``ReferenceStatistics`` when it holds ``mu``/``sigma`` (with its ``arr_0``
    images, if any, for KID / precision-recall), else ``NpzImages`` of its ``arr_0``. Read without pickle."""
    import numpy as np

    from bench.metrics import STATISTICS_LAYOUT, NpzImages, read_statistics

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"reference {path} is not an .npz archive; expected {STATISTICS_LAYOUT}, or images "
                         f"under arr_0")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except Exception as e:  # a torn archive, a zip that is not numpy's
        raise ValueError(f"reference {path} cannot be read ({type(e).__name__}: {e})") from None
    if {"mu", "sigma"} <= keys:
        return read_statistics(path)
    if "arr_0" in keys:
        return NpzImages(path, "arr_0", what="reference images")
    held = ", ".join(sorted(keys)) or "no arrays"
    raise ValueError(f"reference {path} holds neither FID statistics nor images ({held}); expected "
                     f"{STATISTICS_LAYOUT}, or images under arr_0")


def score_npz(samples: str | os.PathLike, ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              **metric_kwargs: Any) -> dict[str, Any]:
    """Scores of an ADM-layout sample batch (``arr_0`` uint8 NHWC, streamed) against ``ref`` (:func:`load_reference`);
    ``metric_kwargs`` go to ``InceptionMetric`` (``inception_weights``, ``device``, ``kid``, ...)."""
    from bench.metrics import InceptionMetric, NpzImages

    images = NpzImages(samples, "arr_0", what="samples")
    return InceptionMetric(load_reference(ref), cache_dir, **metric_kwargs).score(images)


def write_reference_statistics(dataset: Any, out: str | os.PathLike, split: str | None = None,
                               limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                               **metric_kwargs: Any) -> tuple[Path, int]:
    """FID statistics of a ``diffusion.data.Dataset`` split (its first ``limit`` images), streamed batch by batch,
    written to ``out`` in ADM's layout (``mu``, ``sigma``, ``num_images``). Returns (path, number of images)."""
    import numpy as np

    from bench.metrics import DatasetImages, InceptionMetric, write_statistics

    source = DatasetImages(dataset, split, limit=limit)
    mu, sigma = InceptionMetric(source, cache_dir, **metric_kwargs).reference_statistics()
    return write_statistics(out, mu, sigma, num_images=np.int64(len(source))), len(source)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise UsageError(f"{key}={value!r} must be true or false")


def _int(key: str, value: str, low: int = 1) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} must be an integer >= {low}") from None
    if n < low:
        raise UsageError(f"{key}={value!r} must be an integer >= {low}")
    return n


def _parse(args: list[str], own: dict[str, str | None], passthrough: bool) -> tuple[dict[str, str | None], list[str]]:
    """``own`` keys (with defaults) and, when ``passthrough``, the other ``key=value`` as config overrides."""
    opts, overrides = dict(own), []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key or key.startswith("-"):
            raise UsageError(f"{arg!r}: arguments are key=value (python -m bench.fid --help)")
        key = key.removeprefix("eval.") if key == "eval.inception_weights" else key
        if key in own:
            opts[key] = value
        elif passthrough:
            overrides.append(arg)
        else:
            raise UsageError(f"unknown key {key!r}; allowed: {', '.join(own)}")
    return opts, overrides


def _metric_kwargs(opts: dict[str, str | None], device: str, progress: bool) -> dict[str, Any]:
    from bench.metrics import INCEPTION_EXTRACTOR
    from runio.env import resolve_device

    kwargs: dict[str, Any] = dict(device=resolve_device(device), progress=progress,
                                  batch_size=_int("batch_size", opts["batch_size"]),
                                  feature_extractor=opts["feature_extractor"] or INCEPTION_EXTRACTOR)
    if opts["inception_weights"]:
        kwargs["inception_weights"] = opts["inception_weights"]
    return kwargs


def _ref(args: list[str]) -> int:
    from diffusion.config import compose
    from diffusion.data import load_from_config

    opts, overrides = _parse(args, {"split": "train", "out": None, "limit": None, "inception_weights": None,
                                    "batch_size": "64", "cache_dir": None, "feature_extractor": None}, True)
    if not opts["out"]:
        raise UsageError("ref needs out=<file.npz> (python -m bench.fid --help)")
    if not any(o.split("=", 1)[0].lstrip("+~") in ("dataset", "dataset.name") for o in overrides):
        raise UsageError("ref needs dataset=<name> (a group of conf/dataset/, composed like diffusion.train's)")
    cfg = compose("train", overrides)  # the dataset group exactly as a training run composes it
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    limit = _int("limit", opts["limit"]) if opts["limit"] else None
    dataset = load_from_config(cfg.dataset, opts["split"])
    path, n = write_reference_statistics(dataset, opts["out"], opts["split"], limit, opts["cache_dir"],
                                         **_metric_kwargs(opts, cfg.device, bool(cfg.progress)))
    print(f"wrote {path}: FID reference statistics (mu, sigma) of {n} {dataset.name} {opts['split']} images "
          f"({dataset.image_size}x{dataset.image_size})")
    return 0


def _score(args: list[str]) -> int:
    opts, _ = _parse(args, {"samples": None, "ref": None, "inception_weights": None, "device": "auto",
                            "batch_size": "64", "kid": "false", "isc": "false", "prc": "false", "progress": "true",
                            "cache_dir": None, "feature_extractor": None}, False)
    for key in ("samples", "ref"):
        if not opts[key]:
            raise UsageError(f"score needs {key}=<file.npz> (python -m bench.fid --help)")
    kwargs = _metric_kwargs(opts, opts["device"], _bool("progress", opts["progress"]))
    kwargs.update({k: _bool(k, opts[k]) for k in ("kid", "isc", "prc")})
    out = score_npz(opts["samples"], opts["ref"], opts["cache_dir"], **kwargs)
    name = out["metric_name"]
    print(f"{'FID' if name == 'fid' else name}: {out[name]!r}")
    for key, value in out.items():
        if key not in (name, "metric_name", "metric_value", "classifier_accuracy", "num_samples"):
            print(f"{key}: {value!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    from diffusion.config import ConfigError

    try:
        if command == "ref":
            return _ref(rest)
        if command == "score":
            return _score(rest)
        raise UsageError(f"unknown command {command!r}: choose ref or score (python -m bench.fid --help)")
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
