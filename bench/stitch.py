"""T-Stitch across backbones: a cheap model on the first (high-noise) steps of the trajectory, a large one after.

Usage: python -m bench.stitch small=<run dir or .pt> large=<run dir or .pt> fractions=0:1:0.1 [eval.*=...]
(e.g. small=runs/digits/<a DiCo run> large=runs/digits/<a DiT run> eval.cfg_scale=1.5)

Trajectory Stitching (Pan et al. 2024, "T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models with
Trajectory Stitching"): for a fraction r, the first r of the sampling steps (t from T down) are denoised by the
``small`` checkpoint and the rest by the ``large`` one. Any two checkpoints written by ``diffusion.train`` (or by a
sweep) stitch, whatever their backbones (e.g. DiCo early, DiT late), provided they share the data and the diffusion:
dataset (name, size, crop/VAE identity, unconditional), data shape (input size, channels, classes) and diffusion
(noise schedule, diffusion steps, learn_sigma). These are read from each checkpoint's recorded identity and config;
any difference is refused, naming it.

**Rounding.** With N sampling steps the small model takes the first ``k = floor(r * N)`` steps (the k largest
timesteps of the respaced trajectory; r is read as a decimal, so 0.3 x 10 = 3 exactly) and the large model the
other N - k. With DDIM's strided timesteps this is the official rule ``t / T >= 1 - r`` of NVlabs/T-Stitch.

**GMACs.** ``sampling_gmacs`` per image = (k x small GMACs + (N - k) x large GMACs) x (2 with CFG, scale > 1, else
1), where a model's GMACs are ``bench.flops.forward_gmacs`` (one forward, batch 1, backbone only, no VAE): CFG
runs each model on the doubled (conditional + null-class) batch, so two evaluations per image and step.

**Protocol.** The evaluation is the sweep's (``bench.sweep``): ``conf/bench.yaml`` composed with
``dataset=<the checkpoints' dataset>`` and your ``eval.*`` overrides (sampler, steps, cfg_scale, seed,
num_samples, batch_size, clip_denoised resolved for the data, labels, metric; the scorer is
``bench.sweep.make_scorer``: the dataset classifier's Frechet distance, or Inception FID with ``eval.metric=fid``).
Sampling is ``diffusion.sampling.sample_images`` on a model that dispatches on the timestep, so the initial noise
and the per-step noise stream do not depend on which model is active: r = 0 reproduces the large model's own
samples exactly and r = 1 the small model's. The endpoints 0 and 1 are always evaluated.

Other keys: ``sweep=<grid>`` (a grid's ``eval.*`` defaults; default ``cpu``, as ``bench.sweep``), ``use_ema``
(default true, as the sweep), ``device``, ``threads``, ``progress``, ``results_dir``, ``cache_dir``,
``dataset.root`` / ``dataset.workers`` / ``dataset.download`` (where the data lives).

**Output.** One row per fraction in ``<results_dir>/<dataset>/stitch/<small>-<large>.csv`` (``<small>`` and
``<large>`` are backbone-size-patch labels), upserted atomically under a lock. A row's key is the stitch key (both
run keys and checkpoint steps, EMA or not, the evaluation protocol) plus the fraction, so another protocol or
another pair of checkpoints adds rows and never overwrites; a row already there under the same key is reused
(announced). Plot: metric against sampling GMACs, the pure-small and pure-large endpoints marked,
``<small>-<large>-<stitch key hash>.png`` and ``.svg`` beside the CSV. One process (no torchrun).
"""

from __future__ import annotations

import sys
import time
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig

from bench.results_csv import ResultsCSVError, read_rows, upsert_row
from diffusion.config import ConfigError

USAGE = __doc__.split("\n\n", 2)[1].splitlines()[0] + "\n(python -m bench.stitch --help for everything)\n"
CONVENTION = ("sampling GMACs per image = (small steps x small forward GMACs + large steps x large forward GMACs) "
              "x 2 with CFG; forward GMACs at batch 1, backbone only")
ROW_KEY = "row_key"
STITCH_COLUMNS: list[str] = [
    "row_key",            # stitch_key + fraction
    "stitch_key",         # both checkpoints (run key + step), EMA or not, the evaluation protocol
    "dataset", "image_size", "channels",
    "small", "large",     # labels: backbone-size-patch
    "small_run_key", "large_run_key", "small_step", "large_step",
    "fraction",           # r: the small model takes the first floor(r * sample_steps) steps
    "small_steps", "large_steps",
    "small_gmacs", "large_gmacs",   # forward GMACs, batch 1, one evaluation, no CFG doubling
    "sampling_gmacs",     # (small_steps x small_gmacs + large_steps x large_gmacs) x (2 if cfg_scale > 1)
    "metric_name", "metric_value", "classifier_accuracy",
    "num_samples", "sampler", "sample_steps", "cfg_scale", "seed", "clip_denoised", "batch_size", "labels",
    "use_ema",
    "sample_time_s",      # wall time of sampling the num_samples images (synchronised on CUDA)
    "sample_img_per_s",
    "wall_time_s",        # sampling + scoring of this fraction
    "device", "torch_version", "git_commit",
    "small_ckpt", "large_ckpt",
]
OWN_KEYS = ("small", "large", "fractions", "use_ema")
# Config keys a user may override: the evaluation (eval.*, or a grid's defaults with sweep=<grid>) and where things
# run and go. The data, diffusion and models come from the checkpoints.
ALLOWED_OVERRIDES = ("eval", "sweep", "device", "threads", "progress", "results_dir", "cache_dir", "dataset.root",
                     "dataset.workers", "dataset.download")
DATASET_FROM_USER = ("root", "workers", "download")
# Dataset keys that do not change what a model sees (where the data lives, loading, training augmentation)
DATASET_UNCOMPARED = ("root", "workers", "download", "random_flip")


class StitchError(ValueError):
    """Two checkpoints that cannot be stitched, or a bad fraction; the message names the difference."""


# ----------------------------------------------------------------------------------------------------------------
# Fractions, rounding, GMACs
# ----------------------------------------------------------------------------------------------------------------
def _decimal(text: str, what: str) -> Decimal:
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise StitchError(f"fractions: {text!r} in {what!r} is not a number") from None
    if not d.is_finite():
        raise StitchError(f"fractions: {text!r} is not finite")
    return d


def parse_fractions(text: str, add_endpoints: bool = True) -> list[float]:
    """``"0:1:0.1"`` (start:stop:step, stop included), ``"0,0.25,1"`` / ``"[0,0.25,1]"`` or ``"0.4"`` -> sorted
    fractions in [0, 1] without repeats; with ``add_endpoints`` 0 and 1 are always in it."""
    spec = str(text).strip().strip("[]")
    if not spec:
        raise StitchError("fractions is empty: give start:stop:step (0:1:0.1) or a list (0,0.5,1)")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise StitchError(f"fractions={text!r}: a range is start:stop:step, e.g. 0:1:0.1")
        start, stop, step = (_decimal(p, text) for p in parts)
        if step <= 0:
            raise StitchError(f"fractions={text!r}: the step must be > 0")
        values, i = [], 0
        while start + i * step <= stop:
            values.append(start + i * step)
            i += 1
    else:
        values = [_decimal(p, text) for p in spec.split(",")]
    bad = [str(v) for v in values if not 0 <= v <= 1]
    if bad:
        raise StitchError(f"fractions={text!r}: {', '.join(bad)} outside [0, 1] (the small model's share of the "
                          f"steps)")
    out = sorted({float(v) for v in values})
    if add_endpoints:
        out = sorted(set(out) | {0.0, 1.0})
    return out


def small_step_count(fraction: float, steps: int) -> int:
    """Steps taken by the small model: floor(r * N), r read as the decimal it prints as (0.3 x 10 = 3, not
    3.0000000000000004 -> 3 by luck or 2.9999... -> 2)."""
    if not 0 <= fraction <= 1:
        raise StitchError(f"fraction {fraction} outside [0, 1]")
    return int((Decimal(repr(float(fraction))) * int(steps)).to_integral_value(rounding=ROUND_FLOOR))


def sampling_timesteps(sampler: str, steps: int, diffusion_steps: int) -> list[int]:
    """The original timesteps of the sampling trajectory in the order they are visited (T - 1 side first), for the
    respacing ``sample_images`` uses (``ddim<N>`` for DDIM, ``<N>`` for DDPM)."""
    from diffusion.respace import space_timesteps

    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return sorted(space_timesteps(int(diffusion_steps), respacing), reverse=True)


def sampling_gmacs(small_gmacs: float, large_gmacs: float, small_steps: int, large_steps: int,
                   cfg_scale: float) -> float:
    """Per image: each model's forward GMACs times its steps, doubled with CFG (the doubled batch)."""
    return (small_steps * small_gmacs + large_steps * large_gmacs) * (2 if cfg_scale > 1 else 1)


# ----------------------------------------------------------------------------------------------------------------
# The stitched model
# ----------------------------------------------------------------------------------------------------------------
class StitchedModel(nn.Module):
    """A model function for ``sample_images`` that sends the timesteps in ``small_timesteps`` (original, 0..T-1)
    to ``small`` and every other one to ``large``; ``forward_with_cfg`` runs the active model's own CFG."""

    def __init__(self, small: nn.Module, large: nn.Module, small_timesteps: set[int] | list[int]):
        super().__init__()
        for attr in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            a, b = getattr(small, attr), getattr(large, attr)
            if a != b:
                raise StitchError(f"cannot stitch: the small model has {attr}={a}, the large one {attr}={b}")
        self.small, self.large = small, large
        self.small_timesteps = frozenset(int(t) for t in small_timesteps)
        self.in_channels, self.input_size = large.in_channels, large.input_size
        self.num_classes, self.learn_sigma = large.num_classes, large.learn_sigma
        self.calls = {"small": 0, "large": 0}

    def active(self, t: torch.Tensor) -> nn.Module:
        first = t.reshape(-1)[0]
        if not bool((t == first).all()):
            raise ValueError("StitchedModel needs one timestep per call (the samplers' batches share t)")
        which = "small" if int(first) in self.small_timesteps else "large"
        self.calls[which] += 1
        return self.small if which == "small" else self.large

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.active(t)(x, t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        return self.active(t).forward_with_cfg(x, t, y, cfg_scale, guided_channels=guided_channels)


def stitched_sample(small: nn.Module, large: nn.Module, labels: torch.Tensor, fraction: float, *,
                    sampler: str = "ddpm", steps: int = 250, diffusion_steps: int = 1000,
                    **sample_kwargs: Any) -> tuple[torch.Tensor, StitchedModel]:
    """``sample_images`` with the small model on the first floor(fraction * steps) steps and the large one on the
    rest; the other keywords are ``sample_images``'s. Returns (samples, the stitched model with its call counts).
    The models' train/eval modes are left as they were."""
    from diffusion.sampling import sample_images

    trajectory = sampling_timesteps(sampler, steps, diffusion_steps)
    k = small_step_count(fraction, len(trajectory))
    model = StitchedModel(small, large, trajectory[:k])
    modes = [m.training for m in (small, large)]
    try:
        model.eval()
        samples = sample_images(model, labels, sampler=sampler, steps=steps, diffusion_steps=diffusion_steps,
                                **sample_kwargs)
    finally:
        small.train(modes[0])
        large.train(modes[1])
    return samples, model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _recorded(ckpt: dict) -> dict[str, Any]:
    """What a checkpoint says about its data and diffusion, as flat ``dataset.*``, ``shape.*``, ``diffusion.*``."""
    config = ckpt["config"]
    identity = config.get("identity") or {}
    train_cfg = config.get("train") or {}
    out: dict[str, Any] = {}
    dataset = {**(train_cfg.get("dataset") or {}), **(identity.get("dataset") or {})}
    for k, v in dataset.items():
        if k not in DATASET_UNCOMPARED:
            out[f"dataset.{k}"] = v
    kwargs = config.get("backbone_kwargs") or {}
    for k in ("input_size", "in_channels", "num_classes", "learn_sigma"):
        out[f"shape.{k}"] = kwargs.get(k)
    diffusion = {**(train_cfg.get("diffusion") or {}), **(identity.get("diffusion") or {})}
    for k, v in diffusion.items():
        out[f"diffusion.{k}"] = v
    out.setdefault("diffusion.diffusion_steps", 1000)
    return out


def check_compatible(small_ckpt: dict, large_ckpt: dict, small_name: str = "small", large_name: str = "large"
                     ) -> dict[str, Any]:
    """The shared data and diffusion settings of two checkpoints; :class:`StitchError` listing every difference."""
    a, b = _recorded(small_ckpt), _recorded(large_ckpt)
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        listed = "; ".join(f"{k}: {a.get(k)!r} ({small_name}) vs {b.get(k)!r} ({large_name})" for k in diffs)
        raise StitchError(f"cannot stitch {small_name} and {large_name}: they were trained on different data or "
                          f"diffusion settings ({listed}); T-Stitch needs the same data, data shape, noise schedule, "
                          f"diffusion steps and learn_sigma")
    return a


def model_label(name: str, model: nn.Module) -> str:
    """backbone-size-patch of a built model from its ``arch`` (patch left out where it has none), e.g. ``dit-S-2``,
    ``dico-S`` (file-name safe)."""
    arch = getattr(model, "arch", None) or {}
    parts = [name] + [str(arch[k]) for k in ("size", "patch") if arch.get(k) is not None]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# CSV and plot
# ----------------------------------------------------------------------------------------------------------------
def read_stitch_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a stitch CSV over STITCH_COLUMNS ("" for absent columns); [] when missing; a malformed or foreign
    file is a :class:`StitchError` naming the file and line (bench.results_csv's validating reader)."""
    try:
        return read_rows(path, STITCH_COLUMNS, ROW_KEY, "bench.stitch.STITCH_COLUMNS")
    except ResultsCSVError as e:
        raise StitchError(f"{e}; fix or move the file aside (rerunning recomputes missing rows)") from None


def upsert_stitch_row(path: str | Path, row: dict[str, Any]) -> None:
    """Insert or replace (by its row key) one fraction's row, atomically under the file's lock."""
    try:
        upsert_row(path, row, ROW_KEY, STITCH_COLUMNS, "bench.stitch.STITCH_COLUMNS")
    except ResultsCSVError as e:
        raise StitchError(f"{e}; fix or move the file aside (rerunning recomputes missing rows)") from None


def plot_stitch(rows: list[dict[str, Any]], out_stem: str | Path) -> list[Path]:
    """Metric against sampling GMACs of one stitch key (a line through the fractions in order), each point
    labelled r=<fraction>; pure large (r = 0) and pure small (r = 1) marked. PNG and SVG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plots import axis_label, dataset_name
    from runio.files import atomic_write

    pts = sorted(((float(r["fraction"]), float(r["sampling_gmacs"]), float(r["metric_value"])) for r in rows))
    if not pts:
        raise StitchError("no rows to plot")
    first = rows[0]
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "-o", color="tab:blue", ms=4, lw=1.2, zorder=2,
            label=f"T-Stitch: {first['small']} first r of the steps, then {first['large']}")
    for r, x, y in pts:
        if 0 < r < 1:
            ax.annotate(f"r={r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:blue")
    ends = {0.0: (f"pure large: {first['large']} (r=0)", "*", "tab:red"),
            1.0: (f"pure small: {first['small']} (r=1)", "s", "tab:green")}
    for r, x, y in pts:
        if r in ends:
            label, marker, color = ends[r]
            ax.scatter([x], [y], marker=marker, s=140 if marker == "*" else 70, color=color, zorder=3, label=label)
    ax.set_xlabel("sampling GMACs per image (forward GMACs x steps of each model, x2 with CFG)")
    ax.set_ylabel(axis_label(str(first["metric_name"])))
    ax.grid(True, alpha=0.3)
    ax.margins(0.08)
    cfg = f", CFG {float(first['cfg_scale']):g}" if float(first["cfg_scale"]) > 1 else ", no CFG"
    ax.set_title(f"{dataset_name(str(first['dataset']))} {first['image_size']}x{first['image_size']} | "
                 f"{first['sampler']} {first['sample_steps']} steps{cfg}, {first['num_samples']} samples",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_stem.with_name(f"{out_stem.name}.{ext}")
        atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=150, bbox_inches="tight",
                                                          metadata={"Date": None} if ext == "svg" else {}))
        paths.append(path)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------
def evaluation_config(small_ckpt: dict, overrides: list[str] = ()) -> DictConfig:
    """``conf/bench.yaml`` with the checkpoints' dataset and the user's overrides (``eval.*``, device, ...)."""
    from diffusion.config import compose, validate

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if not any(key == a or key.startswith(a + ".") for a in ALLOWED_OVERRIDES):
            raise ConfigError(f"{key}: bench.stitch takes the data, diffusion and models from the checkpoints; "
                              f"allowed overrides: {', '.join(ALLOWED_OVERRIDES)} (and {', '.join(OWN_KEYS)})")
    dataset = dict((small_ckpt["config"].get("train") or {}).get("dataset") or {})
    if "name" not in dataset:
        raise StitchError("the small checkpoint records no dataset (config.train.dataset); was it written by "
                          "diffusion.train?")
    cfg = compose("bench", [f"dataset={dataset['name']}", *overrides])
    given = {o.split("=", 1)[0].lstrip("+~").removeprefix("dataset.") for o in overrides}
    for k, v in dataset.items():
        if not (k in DATASET_FROM_USER and k in given):
            cfg.dataset[k] = v
    return validate(cfg)


def _evaluation_protocol(cfg: DictConfig, clip: bool) -> dict[str, Any]:
    from bench.sweep import EVAL_KEYS, EVAL_KEYS_IF_SET
    from diffusion.config import to_plain

    plain = to_plain(cfg.eval)
    protocol = {k: plain[k] for k in EVAL_KEYS}
    protocol["clip_denoised"] = clip
    protocol.update({k: plain[k] for k, default in EVAL_KEYS_IF_SET.items() if plain[k] != default})
    return protocol


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stitch(cfg: DictConfig, small: str | Path, large: str | Path, fractions: list[float],
               use_ema: bool = True, scorer: Any = None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Sample, count and score every fraction; upsert one CSV row per fraction and draw the plot. Returns the rows
    (of this stitch key, in fraction order)."""
    from bench import sweep
    from bench.fid import evaluation_labels
    from bench.flops import forward_gmacs
    from diffusion.config import to_plain
    from diffusion.data import load_from_config
    from diffusion.run import digest
    from diffusion.sampling import to_uint8
    from diffusion.trainer import build_from_checkpoint, load_checkpoint
    from runio.env import device_name, git_commit, resolve_device
    from runio.files import checkpoint_file

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ckpts = {"small": load_checkpoint(small), "large": load_checkpoint(large)}
    paths = {"small": str(checkpoint_file(small)), "large": str(checkpoint_file(large))}
    settings = check_compatible(ckpts["small"], ckpts["large"], f"small={small}", f"large={large}")
    device = resolve_device(cfg.device)
    models = {w: build_from_checkpoint(c, use_ema=use_ema).to(device).eval() for w, c in ckpts.items()}
    labels_ = {w: model_label(c["config"].get("backbone_name", "model"), models[w]) for w, c in ckpts.items()}
    dataset = load_from_config(cfg.dataset, "train")
    ev = to_plain(cfg.eval)
    clip = dataset.clip_denoised(ev["clip_denoised"])
    protocol = _evaluation_protocol(cfg, clip)
    identity = {w: {"run_key": c["config"].get("key"), "step": int(c["step"])} for w, c in ckpts.items()}
    stitch_key = (f"{labels_['small']}-{labels_['large']}-{dataset.name}{dataset.image_size}-"
                  f"{digest([identity, bool(use_ema), protocol])}")
    out_dir = Path(cfg.results_dir) / dataset.name / "stitch"
    csv_path = out_dir / f"{labels_['small']}-{labels_['large']}.csv"
    noise_schedule, diffusion_steps = settings["diffusion.noise_schedule"], int(settings["diffusion.diffusion_steps"])
    steps = len(sampling_timesteps(ev["sampler"], ev["steps"], diffusion_steps))
    say(f"T-Stitch {labels_['small']} (first r of {steps} {ev['sampler']} steps) -> {labels_['large']} on "
        f"{dataset.name} {dataset.image_size}px, fractions {', '.join(f'{r:g}' for r in fractions)}; {CONVENTION}; "
        f"rows -> {csv_path}")
    gmacs = {w: forward_gmacs(m, m.input_size, m.in_channels) for w, m in models.items()}
    if gmacs["small"] >= gmacs["large"]:
        say(f"note: the small model {labels_['small']} ({gmacs['small']:.4g} GMACs) is not cheaper than the large "
            f"one {labels_['large']} ({gmacs['large']:.4g} GMACs); T-Stitch saves compute only the other way round")
    labels = evaluation_labels(ev["num_samples"], models["large"].num_classes, ev["labels"], ev["seed"])
    existing = {r[ROW_KEY]: r for r in read_stitch_rows(csv_path)}
    rows: list[dict[str, Any]] = []
    for r in fractions:
        row_key = f"{stitch_key}-r{r!r}"
        if row_key in existing:
            say(f"reusing row {row_key} of {csv_path} (same key; commit {existing[row_key]['git_commit']})")
            rows.append(existing[row_key])
            continue
        if scorer is None:
            scorer = sweep.make_scorer(cfg)
        t0 = time.perf_counter()
        k = small_step_count(r, steps)
        _sync(device)
        ts = time.perf_counter()
        samples, _ = stitched_sample(models["small"], models["large"], labels, r, sampler=ev["sampler"],
                                     steps=ev["steps"], diffusion_steps=diffusion_steps, cfg_scale=ev["cfg_scale"],
                                     seed=ev["seed"], noise_schedule=noise_schedule, batch_size=ev["batch_size"],
                                     device=device, progress=bool(cfg.progress), clip_denoised=clip)
        _sync(device)
        sample_time = time.perf_counter() - ts
        if not dataset.pixel_space:  # VAE latents: decode before the metric (not counted in sampling_gmacs)
            samples = dataset.decode(samples, device)
        scores = scorer.score(to_uint8(samples), labels)
        row = {
            "row_key": row_key, "stitch_key": stitch_key, "dataset": dataset.name,
            "image_size": models["large"].input_size, "channels": models["large"].in_channels,
            "small": labels_["small"], "large": labels_["large"],
            "small_run_key": identity["small"]["run_key"], "large_run_key": identity["large"]["run_key"],
            "small_step": identity["small"]["step"], "large_step": identity["large"]["step"],
            "fraction": r, "small_steps": k, "large_steps": steps - k,
            "small_gmacs": gmacs["small"], "large_gmacs": gmacs["large"],
            "sampling_gmacs": sampling_gmacs(gmacs["small"], gmacs["large"], k, steps - k, ev["cfg_scale"]),
            "metric_name": scores["metric_name"], "metric_value": scores["metric_value"],
            "classifier_accuracy": scores.get("classifier_accuracy", ""),
            "num_samples": ev["num_samples"], "sampler": ev["sampler"], "sample_steps": ev["steps"],
            "cfg_scale": ev["cfg_scale"], "seed": ev["seed"], "clip_denoised": clip, "batch_size": ev["batch_size"],
            "labels": ev["labels"], "use_ema": bool(use_ema),
            "sample_time_s": sample_time, "sample_img_per_s": len(labels) / sample_time if sample_time > 0 else "",
            "wall_time_s": time.perf_counter() - t0, "device": device_name(device),
            "torch_version": torch.__version__, "git_commit": git_commit(),
            "small_ckpt": paths["small"], "large_ckpt": paths["large"],
        }
        upsert_stitch_row(csv_path, row)
        say(f"r={r:g}: small {k} / large {steps - k} steps, {row['sampling_gmacs']:.4g} GMACs/image, "
            f"{row['metric_name']} {row['metric_value']:.4g}, sampling {sample_time:.1f} s")
        rows.append(row)
    drawn = [r for r in read_stitch_rows(csv_path) if r["stitch_key"] == stitch_key]  # earlier fractions too
    plot = plot_stitch(drawn, out_dir / f"{labels_['small']}-{labels_['large']}-{stitch_key.rsplit('-', 1)[1]}")
    say(f"wrote {csv_path} and {plot[0]}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {"fractions": "0:1:0.1", "use_ema": "true"}
    overrides = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key or key.startswith("-"):
            raise ConfigError(f"{arg!r}: arguments are key=value (python -m bench.stitch --help)")
        if key in OWN_KEYS:
            opts[key] = value
        else:
            overrides.append(arg)
    missing = [k for k in ("small", "large") if not opts.get(k)]
    if missing:
        raise ConfigError(f"missing {' and '.join(k + '=<run dir or checkpoint>' for k in missing)}")
    if opts["use_ema"].lower() not in ("true", "false"):
        raise ConfigError(f"use_ema={opts['use_ema']!r}: true or false")
    return opts, overrides


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(__doc__, end="")
        return 0
    if not args:
        print(USAGE, end="")
        return 2
    from diffusion.trainer import load_checkpoint

    try:
        opts, overrides = _parse(args)
        fractions = parse_fractions(opts["fractions"])
        cfg = evaluation_config(load_checkpoint(opts["small"]), overrides)
        run_stitch(cfg, opts["small"], opts["large"], fractions, use_ema=opts["use_ema"].lower() == "true")
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished fractions are kept)", file=sys.stderr)
        return 130
    except (ConfigError, StitchError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
