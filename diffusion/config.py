"""The one typed configuration of a run, composed by ``diffusion.train``, ``diffusion.sample`` and ``bench.sweep``.

Structured configs (dataclasses registered in Hydra's ConfigStore) define every key, its type and its default
once; the YAML files under ``conf/`` only choose values. Composition therefore rejects an unknown key
(``+train.unknown_key=1``), a wrong type (``train.lr=abc``) or a value outside an enumeration
(``train.precision=fp64``); :func:`validate` then checks ranges (batch size, steps, patch size, CFG scale, ...) and
the backbone's keys against its constructor. Every error names the key and the allowed values.

The backbone group holds the keyword arguments of the registered backbone's constructor (``name`` plus e.g.
``size``, ``patch_size``, ``depth``); its schema is derived from that constructor's signature, so there is no second
hand-written copy of it. A sweep point is an ordinary set of overrides of this same configuration.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Constructor arguments the trainer derives from the data and diffusion settings, never set in backbone.*
DATA_SHAPE_ARGS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "num_timesteps")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names key and fix."""


class NoiseSchedule(str, Enum):
    linear = "linear"                 # DDPM / ADM / DiT: betas 1e-4 .. 0.02
    cosine = "cosine"                 # improved DDPM
    scaled_linear = "scaled_linear"   # Stable Diffusion / U-ViT / official DiMR: sqrt(beta) 0.00085 .. 0.012 linear


class Precision(str, Enum):
    auto = "auto"   # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"   # bf16 autocast on CUDA and on CPU


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"


class Metric(str, Enum):
    classifier = "classifier"
    fid = "fid"


class EvalLabels(str, Enum):
    balanced = "balanced"   # label i = i mod num_classes: every class equally often (the sweep's default)
    uniform = "uniform"     # independent uniform draws from a generator seeded by eval.seed (DiT's sample_ddp.py)


@dataclass
class DatasetConfig:
    name: str = MISSING             # a registered dataset: digits | fashion_mnist | cifar10 | celeba64 | imagenet | ...
    image_size: Optional[int] = None  # None keeps the native size
    root: Optional[str] = None      # folder with the files in their standard layout; None = the default location
    crop: Optional[str] = None      # crop protocol where a dataset has several (celeba64); None = its default
    download: bool = False          # fetch missing data with torchvision's downloader (cifar10; needs a network)
    random_flip: bool = False       # random horizontal flips (ADM / DiT), drawn per step from the run seed
    unconditional: bool = False     # ignore the labels: one class (unconditional CIFAR-10, as Diffusion-RWKV/DDPM)
    workers: int = 0                # DataLoader worker processes (0 = load in the training process)


@dataclass
class DiffusionConfig:
    noise_schedule: NoiseSchedule = NoiseSchedule.linear
    learn_sigma: bool = True        # learned-range variance, loss = mse + vb (DiT); false: fixed variance, mse only
    diffusion_steps: int = 1000


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 128           # global batch
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None  # max gradient norm; None = no clipping (DiT)
    class_dropout_prob: float = 0.1
    ema_decay: float = 0.999
    ema_warmup: bool = True         # decay min(ema_decay, (1+n)/(10+n)): needed for runs of a few hundred steps
    precision: Precision = Precision.auto
    log_every: int = 10
    ckpt_every: int = 100
    # Speed switches (README "Throughput"). Those that change the numerics enter the run key when on (so runs with
    # and without them never share a key or a row); grad_checkpoint and heap_cache are exact and only recorded in the
    # history.
    compile: bool = False           # torch.compile the backbone (inductor; CPU needs a C++ compiler)
    channels_last: bool = False     # NHWC memory format for the backbone's convolutions and its input
    fused_adamw: bool = False       # AdamW(fused=True): one kernel per step instead of a loop of elementwise ops
    tf32: bool = False              # TF32 matmuls and convolutions (CUDA only; false = true fp32 there too)
    flash_attn: bool = False        # softmax attention through flash-attn (CUDA, bf16; the optional `cuda` extra)
    grad_checkpoint: bool = False   # recompute each block's activations in the backward: memory for time, exact
    heap_cache: bool = False        # glibc keeps freed memory (no mmap/unmap per activation): exact, process-wide


@dataclass
class DistillConfig:
    teacher: Optional[str] = None   # checkpoint written by diffusion.train (any backbone)
    lambda_eps: float = 0.5
    lambda_var: float = 0.05


@dataclass
class SampleConfig:
    per_class: int = 4              # grid rows drawn at the end of training; 0 = none
    sampler: Sampler = Sampler.ddpm
    steps: int = 100
    cfg_scale: float = 2.0
    seed: int = 0
    clip_denoised: Optional[bool] = None  # clip predicted x0 to [-1, 1]; None = on for pixels, off for latents
    use_ema: bool = True


@dataclass
class RunConfig:
    """``python -m diffusion.train``: one training run."""
    backbone: Any = MISSING         # validated against the registered constructor by validate()
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    device: str = "auto"            # auto = cuda when available, else cpu
    threads: Optional[int] = None   # torch CPU threads (None = torch default)
    progress: bool = True
    run_dir: Optional[str] = None   # None = a new unique runs/<dataset>/<backbone>-<time>-<key> directory
    resume: Optional[str] = None    # a run directory (or its checkpoints/last.pt) to continue
    allow_changes: List[str] = field(default_factory=list)  # settings deliberately changed on resume
    init_from: Optional[str] = None  # weight inheritance from a checkpoint (e.g. DiT -> LiT)


@dataclass
class EvalConfig:
    num_samples: int = 500
    sampler: Sampler = Sampler.ddim
    steps: int = 25
    cfg_scale: float = 2.0
    seed: int = 0
    clip_denoised: Optional[bool] = None  # None = on for pixel data, off for VAE latents (DiT)
    batch_size: int = 250
    metric: Metric = Metric.classifier  # classifier (CPU-scale Frechet distance + accuracy) | fid (Inception)
    inception_weights: Optional[str] = None
    labels: EvalLabels = EvalLabels.balanced  # class labels of the evaluation samples (bench.fid: each paper's)
    reference: str = "test"         # FID reference: test | train (that split of the dataset) | a statistics .npz
    # zero-shot diffusion-classifier accuracy of the trained model (bench.diffusion_classifier) on a fixed
    # class-balanced subset of the test split: images x classes x trials network evaluations
    diffusion_classifier: bool = False
    diffusion_classifier_images: int = 200
    diffusion_classifier_trials: int = 50


@dataclass
class SweepConfig:
    """A grid (conf/sweep/<name>.yaml): per backbone, explicit points and/or axes whose product is swept."""
    name: str = MISSING
    points: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # backbone -> list of backbone.* overrides
    # backbone -> {backbone.* key: values}: every combination is a point (product in the listed order, first key
    # slowest); a combination the constructor refuses (heads not dividing the width, ...) is skipped with its reason
    axes: Dict[str, Dict[str, List[Any]]] = field(default_factory=dict)
    seeds: Optional[List[int]] = field(default_factory=list)  # each point once per run seed; [] / null = `seed`
    dry_run: bool = False           # list the expanded points (and the skipped combinations), train nothing


@dataclass
class BenchConfig(RunConfig):
    """``python -m bench.sweep``: the run configuration of every point plus the sweep and its evaluation."""
    backbone: Any = None            # None = every backbone the grid lists; backbone=<name> = that one
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    results_dir: str = "results"    # rows -> <results_dir>/<dataset>/runs.csv (untracked; results/published is not)
    runs_root: str = "runs/sweep"   # per-point run directories (checkpoints, logs)
    cache_dir: str = ".cache/bench"  # metric classifier and reference statistics


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    bench = OmegaConf.structured(BenchConfig)
    # Hydra closes every dict before the command-line overrides; the axes stay open so that
    # `sweep.axes.<backbone>.<key>=[...]` adds or replaces an axis without a `+` (validate_sweep checks the names)
    OmegaConf.set_struct(bench.sweep.axes, False)
    cs.store(name="bench_schema", node=bench)


register_configs()


# ----------------------------------------------------------------------------------------------------------------
# Backbone schema from the constructor signature
# ----------------------------------------------------------------------------------------------------------------
def _omegaconf_type(annotation: Any) -> Any:
    """The OmegaConf-supported type of a constructor annotation (Any when it has none)."""
    if isinstance(annotation, str):
        return Any
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float, bool, str):
        return annotation
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float, bool, str):
            return Optional[inner[0]]
    return Any


def backbone_schema(name: str) -> dict[str, tuple[Any, Any]]:
    """{argument: (type, default)} of backbone ``name``'s constructor, the data-shape arguments excluded."""
    import backbones

    builder = backbones.get(name)
    init = builder
    if inspect.isclass(builder):  # a subclass that forwards **kwargs takes its parent's arguments
        init = next((c.__init__ for c in builder.__mro__ if any(
            p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"
            for n, p in inspect.signature(c.__init__).parameters.items())), builder.__init__)
    hints = typing.get_type_hints(init)
    schema = {}
    for arg, p in inspect.signature(init).parameters.items():
        if arg == "self":
            continue
        if arg in DATA_SHAPE_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        schema[arg] = (_omegaconf_type(hints.get(arg, Any)), default)
    return schema


POSITIVE_BACKBONE_INTS = ("patch_size", "depth", "hidden_size", "num_heads", "kernel_size", "hidden_rate")


def validate_backbone(bb: Any) -> DictConfig:
    """The backbone group merged into its constructor schema: unknown keys and wrong types are errors."""
    import backbones

    if bb is None or (isinstance(bb, str)):
        raise ConfigError(f"backbone must be chosen with backbone=<name>; available: "
                          f"{', '.join(backbones.available())}")
    bb = OmegaConf.create(OmegaConf.to_container(bb, resolve=True) if isinstance(bb, DictConfig) else dict(bb))
    name = bb.get("name")
    if name not in backbones.available():
        raise ConfigError(f"backbone.name={name!r} is not a registered backbone; choose one of "
                          f"{', '.join(backbones.available())}")
    schema = backbone_schema(name)
    unknown = sorted(set(bb) - set(schema) - {"name"})
    if unknown:
        shape = [k for k in unknown if k in DATA_SHAPE_ARGS]
        hint = (" (the data shape comes from dataset.*; class dropout is train.class_dropout_prob; learn_sigma is "
                "diffusion.learn_sigma)") if shape else ""
        raise ConfigError(f"unknown key(s) {', '.join('backbone.' + k for k in unknown)} for backbone {name!r}{hint}; "
                          f"allowed: {', '.join(sorted(schema))}")
    typed = {}
    for key, value in bb.items():
        if key == "name":
            continue
        kind = schema[key][0]
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        if value is None or base is Any:
            typed[key] = value
            continue
        try:
            typed[key] = _coerce(value, base)
        except (TypeError, ValueError):
            raise ConfigError(f"backbone.{key}={value!r} must be of type {base.__name__}") from None
        if key in POSITIVE_BACKBONE_INTS and typed[key] < 1:
            raise ConfigError(f"backbone.{key}={value} must be a positive integer")
    if "size" in schema:
        presets = getattr(backbones.get(name), "presets", None)
        size = bb.get("size", schema["size"][1])
        if presets and size not in presets:
            raise ConfigError(f"backbone.size={size!r} is not a preset of {name}; choose one of {', '.join(presets)}")
    return OmegaConf.create({"name": name, **typed})


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    return kind(value)


# ----------------------------------------------------------------------------------------------------------------
# Range checks
# ----------------------------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate(cfg: DictConfig) -> DictConfig:
    """Range checks of a composed config (types and key names were checked by the schema); returns ``cfg`` with
    the backbone group typed. Raises :class:`ConfigError` naming the key and the allowed values."""
    from diffusion.data import DATASETS

    schema = BenchConfig if "eval" in cfg else RunConfig
    try:  # every key must exist in the schema, whatever the YAML or a `+key=` override added
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(to_plain(cfg)))
    except OmegaConfBaseException as e:
        raise ConfigError(plain_error(e)) from None
    if cfg.get("backbone") is not None:
        cfg.backbone = validate_backbone(cfg.backbone)
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"dataset.name={cfg.dataset.name!r} is unknown; choose one of {', '.join(DATASETS)}")
    _check(cfg.dataset.workers >= 0, "dataset.workers", cfg.dataset.workers, "an integer >= 0")
    if cfg.dataset.image_size is not None:
        _check(cfg.dataset.image_size >= 2, "dataset.image_size", cfg.dataset.image_size, "an integer >= 2")
    _check(cfg.diffusion.diffusion_steps >= 2, "diffusion.diffusion_steps", cfg.diffusion.diffusion_steps, ">= 2")
    t = cfg.train
    _check(t.steps >= 0, "train.steps", t.steps, "an integer >= 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a finite number > 0")
    _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(t.grad_clip is None or (math.isfinite(t.grad_clip) and t.grad_clip > 0), "train.grad_clip", t.grad_clip,
           "null or a number > 0")
    _check(0 <= t.class_dropout_prob < 1, "train.class_dropout_prob", t.class_dropout_prob, "in [0, 1)")
    _check(0 <= t.ema_decay <= 1, "train.ema_decay", t.ema_decay, "in [0, 1]")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, "an integer >= 1")
    check_switches(t, cfg.device)
    s = cfg.sample
    _check(s.per_class >= 0, "sample.per_class", s.per_class, "an integer >= 0 (0 = no samples)")
    _check(s.steps >= 1, "sample.steps", s.steps, "an integer >= 1")
    check_cfg_scale(s.cfg_scale, "sample.cfg_scale")
    if cfg.distill.teacher is not None:
        for key in ("lambda_eps", "lambda_var"):
            _check(math.isfinite(cfg.distill[key]) and cfg.distill[key] >= 0, f"distill.{key}", cfg.distill[key],
                   "a finite number >= 0")
    if cfg.threads is not None:
        _check(cfg.threads >= 1, "threads", cfg.threads, "null or an integer >= 1")
    if not (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r}: choose auto, cpu, cuda or cuda:<index>")
    if "eval" in cfg:
        e = cfg.eval
        _check(e.num_samples >= 2, "eval.num_samples", e.num_samples, "an integer >= 2")
        _check(e.steps >= 1, "eval.steps", e.steps, "an integer >= 1")
        _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
        check_cfg_scale(e.cfg_scale, "eval.cfg_scale")
        _check(e.diffusion_classifier_images >= 1, "eval.diffusion_classifier_images", e.diffusion_classifier_images,
               "an integer >= 1")
        _check(e.diffusion_classifier_trials >= 1, "eval.diffusion_classifier_trials", e.diffusion_classifier_trials,
               "an integer >= 1")
        if e.reference not in ("test", "train") and not e.reference.endswith(".npz"):
            raise ConfigError(f"eval.reference={e.reference!r}: choose test or train (that split of the dataset) or an "
                              f"FID statistics .npz (mu, sigma: an ADM reference batch or python -m bench.fid ref)")
        if e.metric == Metric.classifier and e.reference != "test":
            raise ConfigError(f"eval.reference={e.reference} applies to eval.metric=fid; the classifier metric "
                              f"always compares with the test split")
    if "sweep" in cfg:
        validate_sweep(cfg.sweep)
    return cfg


def validate_sweep(sweep: DictConfig) -> None:
    """Grid checks: axes of registered backbones, each axis a constructor key with a non-empty list of values of
    the key's type (a preset name for ``size``); seeds distinct integers >= 0. Combinations are checked later,
    by building each one (bench.sweep skips the ones the constructor refuses)."""
    import backbones

    for name, axes in (sweep.axes or {}).items():
        if name not in backbones.available():
            raise ConfigError(f"sweep.axes.{name}: {name!r} is not a registered backbone; choose one of "
                              f"{', '.join(backbones.available())}")
        schema = backbone_schema(name)
        for key, values in (axes or {}).items():
            if key not in schema:
                raise ConfigError(f"sweep.axes.{name}.{key}: unknown key for backbone {name!r}; allowed: "
                                  f"{', '.join(sorted(schema))}")
            if values is None or len(values) == 0:
                raise ConfigError(f"sweep.axes.{name}.{key} must list at least one value (e.g. [2, 4])")
            for value in values:
                try:
                    validate_backbone({"name": name, key: value})
                except ConfigError as e:
                    raise ConfigError(f"sweep.axes.{name}.{key}: {e}") from None
    seeds = list(sweep.seeds or [])
    for s in seeds:
        _check(s >= 0, "sweep.seeds", seeds, "a list of distinct integers >= 0 ([] = the config's seed)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep.seeds={seeds} lists a seed twice; each seed is one run of every point")


HEAP_CACHE_UNAVAILABLE = "train.heap_cache=true needs glibc's mallopt (Linux with glibc); remove it here"


class SwitchUnavailable(ConfigError):
    """A speed switch this device or installation cannot run (TF32 or flash-attn without CUDA, ...)."""


def check_switches(train: Any, device: str) -> None:
    """The CUDA-only speed switches on a machine or device without CUDA are errors, never silently ignored: they
    are part of the run key, so a run keyed TF32 must really have used TF32."""
    import importlib.util

    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if train.tf32 and not on_cuda:
        raise SwitchUnavailable(f"train.tf32=true applies to CUDA only (device={device}); remove it on this machine")
    if train.flash_attn:
        if not on_cuda:
            raise SwitchUnavailable(f"train.flash_attn=true needs CUDA (device={device}); remove it: attention then "
                                    f"runs through torch's scaled_dot_product_attention")
        if str(getattr(train.precision, "value", train.precision)) == "fp32":
            raise ConfigError("train.flash_attn=true needs half precision (flash-attn has no fp32 kernel); set "
                              "train.precision=bf16 or auto")
        if importlib.util.find_spec("flash_attn") is None:
            raise SwitchUnavailable("train.flash_attn=true: flash-attn is not installed (pip install -e '.[cuda]')")
    if train.get("heap_cache"):
        from runio.env import heap_cache_available

        if not heap_cache_available():
            raise SwitchUnavailable(HEAP_CACHE_UNAVAILABLE)


def check_cfg_scale(value: float, key: str = "cfg_scale") -> None:
    """CFG scale 1 = no guidance; below 1, NaN or inf are refused (NaN would silently disable guidance)."""
    _check(math.isfinite(value) and value >= 1, key, value, "a finite number >= 1 (1 = no guidance)")


# ----------------------------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------------------------
def compose(config_name: str = "train", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides (outside ``@hydra.main``), then validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(plain_error(e)) from None
    except Exception as e:  # hydra's ConfigCompositionException, OverrideParseException, MissingConfigException
        if type(e).__module__.startswith("hydra"):
            raise ConfigError(plain_error(e)) from None
        raise
    return validate(cfg)


def plain_error(err: BaseException) -> str:
    """One readable line from an OmegaConf/Hydra error (key, value and allowed values kept)."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    text = str(cause).strip().split("\nConfig search path")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("object_type",
                                                                                             "reference_type"))]
    return "; ".join(lines) if lines else type(err).__name__


def to_plain(cfg: DictConfig | ListConfig | Any) -> Any:
    """Resolved plain containers (enums as their string values)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg
