"""Resumable sweeps: every grid point is trained, counted, sampled, scored and written as one CSV row.

    python -m bench.sweep backbone=rwkv                  # rwkv's points of the default grid (conf/sweep/cpu.yaml)
    python -m bench.sweep                                # every backbone the grid lists
    python -m bench.sweep -m backbone=dit,lit hydra/launcher=joblib hydra.launcher.n_jobs=2

A point is the sweep's run configuration with the grid's ``backbone.*`` overrides applied, validated by the same
schema as ``diffusion.train``. A grid (conf/sweep/<name>.yaml) gives per backbone explicit ``points`` (lists of
overrides) and/or ``axes`` ({key: [values]}: every combination, in the listed order, first key slowest, after the
explicit points; a combination appears once). An axis combination whose backbone cannot be built (heads not dividing
the width, an even RWKV depth, a DiMR width its branches cannot split, ...) is skipped with the constructor's message
(it is built on the meta device: no memory, no time); an explicit point that fails is recorded as a ``failed`` row.
``sweep.seeds=[0,1]`` runs every point once per run seed (seed-major: all points at the first seed, then the next),
each its own run and row; ``[]`` (the default) is the config's ``seed``. An axis is overridden (or added) like any
key, ``sweep.axes.dit.patch_size=[2,4,8]``; ``sweep.dry_run=true`` lists the points with their parameters and
GMACs, and the skipped combinations with their reasons, without training:

    python -m bench.sweep sweep=cpu_scaling sweep.dry_run=true
    python -m bench.sweep sweep=cpu_scaling backbone=dit sweep.axes.dit.patch_size=[2,4,8] sweep.dry_run=true

Three keys (``diffusion.run``) decide what may be reused:

* the **run key** + ``train.steps`` names the point's run directory: a checkpoint is resumed or reused only by a
  point with the same training recipe (the trainer re-checks the key on resume);
* the **point key** adds the evaluation protocol: a CSV row is reused only under the same key, so changing the
  learning rate, schedule, CFG scale, sampler, sample count or metric gives a new row (old rows stay);
* the **recipe key** is the point key without the architecture and the seed (it enters as 0, so keys written
  before seeds were aggregated hold): the plots fit one curve per recipe, the seeds of a point aggregated.

Reuse is announced with where it came from. Rows go to ``<results_dir>/<dataset>/runs.csv`` (schema:
bench/schema.py) through ``bench.results_csv`` (validated on read, atomic under a lock); a failing point gets a
``failed`` row and the sweep goes on; a per-point lock stops two sweeps from training the same point.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import backbones
from backbones.layers import count_parameters
from bench.fid import evaluation_labels
from bench.flops import CONVENTION, forward_gmacs
from bench.results_csv import read_rows, upsert_row
from diffusion.config import CONF_DIR, ConfigError, to_plain, validate, validate_backbone
from diffusion.data import Dataset, load_from_config
from diffusion.latents import vae_decoder_gmacs
from diffusion.run import digest, read_log, run_identity, run_key, steady_throughput
from diffusion.trainer import backbone_kwargs, build_from_checkpoint, effective_precision, load_checkpoint, train
from runio.dist import World, broadcast, init_world
from runio.env import device_name, git_commit, resolve_device

log = logging.getLogger(__name__)
ROW_KEY = "point_key"
EVAL_KEYS = ("metric", "num_samples", "sampler", "steps", "cfg_scale", "seed", "clip_denoised", "batch_size",
             "inception_weights")
# Evaluation keys added since: part of the point key only when they differ from these defaults (existing keys hold)
EVAL_KEYS_IF_SET = {"labels": "balanced", "reference": "test"}
DIFFUSION_CLASSIFIER_KEYS = ("diffusion_classifier", "diffusion_classifier_images", "diffusion_classifier_trials")


class PointBusy(RuntimeError):
    """Another process is training this point."""


# ----------------------------------------------------------------------------------------------------------------
# Points
# ----------------------------------------------------------------------------------------------------------------
def selected_backbones(cfg: DictConfig) -> list[str]:
    """``backbone=<name>`` selects one backbone's points; without it every backbone the grid lists (its explicit
    points, then its axes)."""
    grid = list(cfg.sweep.points or {}) + [n for n in (cfg.sweep.axes or {}) if n not in (cfg.sweep.points or {})]
    if cfg.backbone is None:
        names = list(grid)
        unknown = [n for n in names if n not in backbones.available()]
        if unknown:
            raise ConfigError(f"grid {cfg.sweep.name!r} lists unregistered backbone(s) {unknown}; available: "
                              f"{', '.join(backbones.available())}")
        return names
    name = cfg.backbone.name
    backbones.get(name)  # unknown names fail with the list of available ones
    if name not in grid:
        raise ConfigError(f"grid {cfg.sweep.name!r} has no points for backbone {name!r}; add them to "
                          f"conf/sweep/{cfg.sweep.name}.yaml or choose another grid with sweep=<name>")
    return [name]


def grid_points(cfg: DictConfig, names: list[str]) -> list[tuple[str, dict, bool]]:
    """(backbone, overrides, from_axes) of every point of the grid for ``names``: per backbone its explicit points,
    then the product of its axes (keys in the listed order, the first varying slowest). Points with the same
    overrides appear once (the first)."""
    out: list[tuple[str, dict, bool]] = []
    seen: set[tuple[str, str]] = set()
    for name in names:
        explicit = [dict(p) for p in to_plain((cfg.sweep.points or {}).get(name) or [])]
        axes = to_plain((cfg.sweep.axes or {}).get(name) or {})
        product = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else []
        for overrides, from_axes in [(p, False) for p in explicit] + [(p, True) for p in product]:
            signature = (name, json.dumps(overrides, sort_keys=True, default=str))
            if signature not in seen:
                seen.add(signature)
                out.append((name, overrides, from_axes))
    return out


def build_check(point: DictConfig, dataset: Dataset) -> str | None:
    """None when the point's backbone can be built for the data, else the constructor's message. It is built on the
    meta device with the arguments the trainer will use (no memory, no initialisation)."""
    kwargs = backbone_kwargs(point.backbone, dataset, point.train.class_dropout_prob, point.diffusion.learn_sigma,
                             point.diffusion.diffusion_steps)
    try:
        with torch.device("meta"):
            backbones.build(point.backbone.name, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        return str(e) or type(e).__name__
    return None


def expand_grid(cfg: DictConfig, names: list[str], dataset: Dataset
                ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict, str]]]:
    """The points to run, [(backbone, overrides)], and the skipped axis combinations, [(backbone, overrides,
    reason)]: a combination is skipped when its config is invalid or its constructor refuses it. Explicit points
    are kept as given (a failing one becomes a ``failed`` row, as the user asked for it by name)."""
    points, skipped = [], []
    for name, overrides, from_axes in grid_points(cfg, names):
        if from_axes:
            try:
                reason = build_check(point_config(cfg, name, overrides), dataset)
            except ConfigError as e:
                reason = str(e)
            if reason:
                skipped.append((name, overrides, reason))
                continue
        points.append((name, overrides))
    return points, skipped


def sweep_seeds(cfg: DictConfig) -> list[int]:
    """The run seeds of every point: ``sweep.seeds``, or the config's ``seed`` when it is empty or null."""
    return [int(s) for s in (cfg.sweep.seeds or [])] or [int(cfg.seed)]


def overrides_text(overrides: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}"


def point_config(cfg: DictConfig, name: str, overrides: dict, seed: int | None = None) -> DictConfig:
    """The run config of one point: the backbone group (the user's, if they chose this backbone, else
    conf/backbone/<name>.yaml) with the point's overrides (and run ``seed`` when given), validated like any training
    config."""
    if cfg.backbone is not None and cfg.backbone.name == name:
        base = to_plain(cfg.backbone)
    else:
        base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml"))
        base.pop("defaults", None)
    point = OmegaConf.create(to_plain(cfg))
    point.backbone = validate_backbone({**base, **dict(overrides), "name": name})
    if seed is not None:
        point.seed = int(seed)
    return validate(point)


def point_keys(point: DictConfig, dataset: Dataset) -> dict[str, str]:
    """run_key (training recipe), train_key (+ steps: the run directory), point_key (+ evaluation: the CSV row),
    recipe_key (the point key without the architecture: one fit per recipe in the plots)."""
    plain = to_plain(point)
    kwargs = backbone_kwargs(point.backbone, dataset, point.train.class_dropout_prob, point.diffusion.learn_sigma,
                             point.diffusion.diffusion_steps)
    precision = effective_precision(plain["train"]["precision"], resolve_device(point.device))
    identity = run_identity(plain, kwargs, precision, dataset.identity())
    rkey = run_key(identity)
    prefix = rkey.rsplit("-", 1)[0]
    evaluation = {k: plain["eval"][k] for k in EVAL_KEYS}
    evaluation["clip_denoised"] = dataset.clip_denoised(evaluation["clip_denoised"])  # None resolved per data
    evaluation.update({k: plain["eval"][k] for k, default in EVAL_KEYS_IF_SET.items() if plain["eval"][k] != default})
    if plain["eval"]["diffusion_classifier"]:  # only when on: keys of points without it hold
        evaluation.update({k: plain["eval"][k] for k in DIFFUSION_CLASSIFIER_KEYS})
    steps = int(point.train.steps)
    # Without the architecture and the run seed (the seeds of a point are aggregated in one figure); the seed enters
    # as 0, the default, so that recipe keys written before seeds were aggregated (e.g. results/published) hold.
    recipe = {**{k: v for k, v in identity.items() if k != "backbone"}, "seed": 0}
    return {"run_key": rkey,
            "train_key": f"{prefix}-s{steps}-{digest([identity, steps])}",
            "point_key": f"{prefix}-s{steps}-{digest([identity, steps, evaluation])}",
            "recipe_key": f"s{steps}-bs{point.train.batch_size}-{digest([recipe, steps, evaluation], 8)}"}


@contextmanager
def point_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PointBusy(f"{path.stem} is being trained by another sweep (lock {path}); skipped") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def say(cfg: DictConfig, text: str) -> None:
    from tqdm.auto import tqdm

    if cfg.progress:
        tqdm.write(text)
    else:
        print(text)


# ----------------------------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------------------------
def run_point(point: DictConfig, keys: dict, scorer: Any, dataset: Dataset, world: World = World()) -> dict | None:
    """Train (or resume / reuse) the point's run, then count, sample and score it. Returns its CSV row (on rank 0;
    None on the other ranks of a torchrun job, which train and sample their shares)."""
    from diffusion.sampling import sample_images, save_grid, to_uint8

    t0 = time.time()
    device = resolve_device(point.device)
    run_dir = Path(point.runs_root) / point.dataset.name / keys["train_key"]
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    with contextlib.ExitStack() as stack:
        busy = None
        if world.is_main:
            try:
                stack.enter_context(point_lock(run_dir.with_name(run_dir.name + ".lock")))
            except PointBusy as e:
                busy = str(e)
        busy = broadcast(busy, world)
        if busy:
            raise PointBusy(busy)
        done = load_checkpoint(ckpt_path)["step"] if ckpt_path.exists() else 0
        if done >= point.train.steps:
            say(point, f"reusing the trained checkpoint {ckpt_path} (same run key {keys['run_key']}, step {done})")
        else:
            if done:
                say(point, f"resuming {run_dir} from step {done}")
            train_cfg = OmegaConf.create(to_plain(point))
            train_cfg.run_dir, train_cfg.resume = str(run_dir), str(run_dir) if done else None
            train_cfg.sample.per_class = 0
            train(train_cfg)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["config"].get("key") != keys["run_key"]:
        raise RuntimeError(f"{ckpt_path} holds run {ckpt['config'].get('key')}, not {keys['run_key']}; move it aside")
    model = build_from_checkpoint(ckpt, use_ema=True).to(device)
    arch = model.arch
    clip = dataset.clip_denoised(point.eval.clip_denoised)  # None: on for pixels, off for VAE latents
    labels = evaluation_labels(point.eval.num_samples, model.num_classes, to_plain(point.eval)["labels"],
                               point.eval.seed)  # the same on every rank
    if not world.is_main:  # every rank samples its share of the evaluation set; rank 0 scores it
        sample_images(model, labels,
                      sampler=to_plain(point.eval)["sampler"], steps=point.eval.steps, cfg_scale=point.eval.cfg_scale,
                      seed=point.eval.seed, noise_schedule=to_plain(point.diffusion)["noise_schedule"],
                      diffusion_steps=point.diffusion.diffusion_steps, batch_size=point.eval.batch_size,
                      device=device, progress=False, clip_denoised=clip, world=world)
        return None
    say(point, f"counting GMACs of {point.backbone.name} {arch} ...")
    gmacs = forward_gmacs(model, model.input_size, model.in_channels)
    history = ckpt["config"].get("history") or []
    peaks = [s["peak_mem_mb"] for s in history if s.get("peak_mem_mb") is not None]
    row: dict[str, Any] = {
        **{k: keys[k] for k in ("point_key", "run_key", "recipe_key")},
        "dataset": point.dataset.name, "image_size": model.input_size, "channels": model.in_channels,
        "backbone": point.backbone.name, "size": arch.get("size", ""), "patch": arch.get("patch") or "",
        "depth": arch.get("depth", ""), "width": arch.get("width", ""),
        "params": count_parameters(model), "gmacs": gmacs,
        "train_steps": point.train.steps, "batch": point.train.batch_size, "lr": point.train.lr,
        "train_compute_gmacs": gmacs * 3 * point.train.batch_size * point.train.steps,
        "num_samples": point.eval.num_samples, "sampler": to_plain(point.eval)["sampler"],
        "sample_steps": point.eval.steps, "cfg_scale": point.eval.cfg_scale, "seed": point.seed,
        "train_img_per_s": steady_throughput(read_log(run_dir / "log.csv")),
        "peak_mem_mb": max(peaks) if peaks else "",
        "device": device_name(device), "torch_version": torch.__version__, "git_commit": git_commit(),
        "run_dir": str(run_dir),
    }
    ts = time.time()
    samples = sample_images(model, labels, sampler=row["sampler"], steps=point.eval.steps,
                            cfg_scale=point.eval.cfg_scale, seed=point.eval.seed,
                            noise_schedule=to_plain(point.diffusion)["noise_schedule"],
                            diffusion_steps=point.diffusion.diffusion_steps, batch_size=point.eval.batch_size,
                            device=device, progress=point.progress, clip_denoised=clip,
                            world=world)
    if not dataset.pixel_space:  # VAE latents: decode before any metric or grid
        samples = dataset.decode(samples, device)
        row["vae_gmacs"] = vae_decoder_gmacs(dataset.vae(device), dataset.input_shape())
    row["sample_img_per_s"] = len(labels) / (time.time() - ts)
    scores = scorer.score(to_uint8(samples), labels)  # scored as saved images: 8-bit (DiT's protocol)
    ncol = min(model.num_classes, 10)
    save_grid(samples[: 10 * ncol], run_dir / "eval_samples.png", ncol=ncol,
              class_names=scorer_class_names(scorer, ncol))
    if point.eval.diffusion_classifier:
        row["diffusion_classifier_accuracy"] = diffusion_classifier_score(point, model, device)
    row.update(metric_name=scores["metric_name"], metric_value=scores["metric_value"],
               classifier_accuracy=scores.get("classifier_accuracy", ""), wall_time_s=time.time() - t0,
               status="ok", error="")
    return row


def diffusion_classifier_score(point: DictConfig, model: torch.nn.Module, device: torch.device) -> float:
    """Zero-shot diffusion-classifier accuracy of ``model`` on a fixed class-balanced subset of the test split
    (``eval.diffusion_classifier_images`` images, ``eval.diffusion_classifier_trials`` paired (t, noise) trials)."""
    from bench.diffusion_classifier import diffusion_classifier_accuracy, fixed_subset

    test_ds = load_from_config(point.dataset, "test")
    if not test_ds.pixel_space:
        raise ConfigError("eval.diffusion_classifier needs the test images in the model's input space; latent "
                          "datasets hold only the extracted split: set eval.diffusion_classifier=false")
    idx = fixed_subset(test_ds.labels, point.eval.diffusion_classifier_images, point.eval.seed)
    images, labels = test_ds.fetch(idx)
    out = diffusion_classifier_accuracy(model, to_plain(point.diffusion), images, labels,
                                        trials=point.eval.diffusion_classifier_trials, seed=point.eval.seed,
                                        batch_size=point.eval.batch_size, device=device, progress=point.progress)
    return float(out["accuracy"])


def scorer_class_names(scorer: Any, n: int) -> list[str] | None:
    names = getattr(scorer, "class_names", None)
    return list(names)[:n] if names else None


def make_scorer(cfg: DictConfig) -> Any:
    """The configured metric: the dataset classifier's Frechet distance (CPU scale) or Inception FID against
    ``eval.reference`` (the test or train split, streamed as a Dataset and cached under its identity, or a statistics
    .npz such as ADM's ``VIRTUAL_imagenet256_labeled.npz``)."""
    from bench import metrics

    train_ds = load_from_config(cfg.dataset, "train")
    evaluation = to_plain(cfg.eval)
    if evaluation["metric"] == "classifier":
        train_x = _all_images(train_ds)
        test_ds = load_from_config(cfg.dataset, "test")
        test_x = _all_images(test_ds)
        scorer = metrics.ClassifierMetric(cfg.dataset.name, train_x, train_ds.labels, test_x, test_ds.labels,
                                          cache_dir=cfg.cache_dir, progress=cfg.progress)
    else:
        reference = evaluation["reference"]
        if reference in ("train", "test"):
            ref = train_ds if reference == "train" else load_from_config(cfg.dataset, "test")
            split = reference
        else:
            ref, split = metrics.read_statistics(reference), None
        scorer = metrics.InceptionMetric(ref, cache_dir=cfg.cache_dir, progress=cfg.progress, split=split,
                                         inception_weights=evaluation["inception_weights"],
                                         device=resolve_device(cfg.device))
    scorer.class_names = train_ds.class_names
    return scorer


def _all_images(dataset: Dataset) -> torch.Tensor:
    """Every image of a pixel dataset as one float tensor (the classifier metric trains on them in memory)."""
    if not dataset.pixel_space:
        raise ConfigError(f"eval.metric=classifier needs pixel images and dataset={dataset.name} holds VAE latents: "
                          f"use eval.metric=fid eval.reference=<statistics .npz of the source images>")
    if hasattr(dataset, "images"):
        return dataset.images
    return torch.cat([dataset.fetch(torch.arange(i, min(i + 1024, len(dataset))))[0]
                      for i in range(0, len(dataset), 1024)])


def _failed_row(point: DictConfig, name: str, keys: dict, err: BaseException, seed: int | None = None) -> dict:
    return {**{k: keys.get(k, "") for k in ("point_key", "run_key", "recipe_key")},
            "dataset": point.dataset.name, "image_size": point.dataset.image_size, "backbone": name,
            "train_steps": point.train.steps, "batch": point.train.batch_size, "lr": point.train.lr,
            "seed": point.seed if seed is None else seed, "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:500], "torch_version": torch.__version__,
            "git_commit": git_commit()}


def run_sweep(cfg: DictConfig) -> list[dict]:
    """Run (or resume) every selected grid point; returns the rows of this sweep."""
    from tqdm.auto import tqdm

    cfg = validate(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    world, _ = init_world(resolve_device(cfg.device))  # under torchrun every point trains and samples on all ranks
    if not world.is_main:
        cfg.progress = False
    names = selected_backbones(cfg)
    csv_path = Path(cfg.results_dir) / cfg.dataset.name / "runs.csv"
    dataset = load_from_config(cfg.dataset, "train")
    points, skipped = expand_grid(cfg, names, dataset)
    seeds = sweep_seeds(cfg)
    if world.is_main:
        for name, overrides, reason in skipped:
            print(f"skipped {name} {overrides_text(overrides)}: {reason}")
    runs = [(seed, i, name, overrides) for seed in seeds for i, (name, overrides) in enumerate(points, 1)]
    if world.is_main:
        print(f"sweep {cfg.sweep.name}: {len(points)} points" + (f" ({len(skipped)} combinations skipped)"
                                                                  if skipped else "") +
              f" x {len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds} = {len(runs)} runs on "
              f"{cfg.dataset.name} {cfg.dataset.image_size}px, {cfg.train.steps} steps x batch "
              f"{cfg.train.batch_size}; FLOPs are {CONVENTION}; rows -> {csv_path}")
    if cfg.sweep.dry_run:
        if world.is_main:
            print_points(cfg, points, dataset)
            for j, (seed, i, name, overrides) in enumerate(runs, 1):
                print(f"[{j}/{len(runs)}] point {i}/{len(points)} seed {seed}: {name} {overrides_text(overrides)}")
        return []
    scorer = None
    rows = []
    done_keys: dict[str, str] = {}  # point key -> the point that ran under it in this sweep
    bar = tqdm(runs, desc="sweep", unit="run", position=0, dynamic_ncols=True, disable=not cfg.progress)
    for j, (seed, i, name, overrides) in enumerate(bar, 1):
        keys: dict = {}
        point = None
        where = f"[{j}/{len(runs)}] point {i}/{len(points)} seed {seed}: {name} {overrides_text(overrides)}"
        if world.is_main:
            say(cfg, where)
        try:
            point = point_config(cfg, name, overrides, seed)
            keys = point_keys(point, dataset)
            bar.set_postfix_str(keys["point_key"][:60])
            if keys["point_key"] in done_keys:
                say(cfg, f"{where} has the key of {done_keys[keys['point_key']]} ({keys['point_key']}); not repeated")
                continue
            done_keys[keys["point_key"]] = where
            previous = broadcast({r[ROW_KEY]: r for r in read_rows(csv_path)}.get(keys["point_key"])
                                 if world.is_main else None, world)
            if previous is not None and previous.get("status") == "ok":
                say(cfg, f"reusing row {keys['point_key']} of {csv_path} (same key; commit "
                         f"{previous.get('git_commit')}, run {previous.get('run_dir')})")
                if previous.get("recipe_key") != keys["recipe_key"] and world.is_main:
                    previous = {**previous, "recipe_key": keys["recipe_key"]}  # a row from before seeds aggregated
                    upsert_row(csv_path, previous, key=ROW_KEY)
                rows.append(previous)
                continue
            if scorer is None and world.is_main:
                scorer = make_scorer(cfg)
            row = run_point(point, keys, scorer, dataset, world)
            if row is None:  # not rank 0
                continue
        except KeyboardInterrupt:
            raise
        except PointBusy as e:
            say(cfg, str(e))
            continue
        except Exception as e:  # a failing point is recorded and the sweep goes on
            log.error("point %s %s seed %s failed:\n%s", name, overrides, seed, traceback.format_exc())
            row = _failed_row(point if point is not None else cfg, name, keys, e, seed)
            if not keys or not world.is_main:  # invalid before it had a key: nothing to record under
                rows.append(row)
                continue
        upsert_row(csv_path, row, key=ROW_KEY)
        rows.append(row)
    bar.close()
    if world.is_main:
        print_summary(rows)
    return rows


def print_points(cfg: DictConfig, points: list[tuple[str, dict]], dataset: Dataset) -> None:
    """The expanded points with their parameters and forward GMACs (the counter of the CSV's gmacs column)."""
    from bench.flops import build_for_counting

    for i, (name, overrides) in enumerate(points, 1):
        try:
            point = point_config(cfg, name, overrides)
            kwargs = backbone_kwargs(point.backbone, dataset, point.train.class_dropout_prob,
                                     point.diffusion.learn_sigma, point.diffusion.diffusion_steps)
            model = build_for_counting(name, **kwargs)
            counts = (f"{count_parameters(model) / 1e6:.3f}M params, "
                      f"{forward_gmacs(model, model.input_size, model.in_channels):.4g} GMACs")
        except Exception as e:  # an explicit point the constructor refuses: its run records the failure
            counts = f"not buildable: {e}"
        print(f"point {i}/{len(points)}: {name} {overrides_text(overrides)}: {counts}")


def print_summary(rows: list[dict]) -> None:
    import pandas as pd

    if not rows:
        print("no points")
        return
    df = pd.DataFrame(rows)
    cols = [c for c in ["backbone", "size", "patch", "depth", "width", "seed", "params", "gmacs", "metric_name",
                        "metric_value", "classifier_accuracy", "train_img_per_s", "status"] if c in df]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(df[cols].to_string(index=False))


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        rows = run_sweep(cfg)
    except KeyboardInterrupt:
        print("\nsweep interrupted; rerun the same command to resume (finished points are kept)", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, OSError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} point(s) failed: " + "; ".join(f"{r['point_key'] or r['backbone']}: {r['error']}"
                                                             for r in failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
