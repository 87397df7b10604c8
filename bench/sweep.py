"""Resumable sweeps: every grid point is counted, trained, sampled, scored and appended to one CSV row.

    python -m bench.sweep backbone=rwkv                  # rwkv's points of the default grid (conf/sweep/cpu.yaml)
    python -m bench.sweep                                # every registered backbone the grid lists
    python -m bench.sweep 'backbones=[dit,lit]'          # several backbones in one process
    python -m bench.sweep -m backbone=dit,lit hydra/launcher=joblib hydra.launcher.n_jobs=2

Rows go to ``results/<dataset>/runs.csv`` (schema: bench/schema.py and the README). Rerunning an interrupted
sweep skips points that already have an ``ok`` row and resumes unfinished ones from their checkpoints; a failing
point gets a ``failed`` row with its error and the sweep goes on. The CSV is rewritten atomically under a file
lock (temporary file + rename), so concurrent jobs and killed processes leave neither torn nor duplicate rows.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import platform
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import backbones
from bench.flops import CONVENTION, count_params, forward_gmacs
from bench.schema import RUN_COLUMNS
from diffusion.trainer import (
    build_from_checkpoint,
    git_commit,
    load_checkpoint,
    resolve_device,
    train,
)
from runio.files import atomic_write_text

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# ----------------------------------------------------------------------------------------------------------------
# The CSV: one row per point_id, rewritten atomically under a lock
# ----------------------------------------------------------------------------------------------------------------
@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_rows(csv_path: Path) -> list[dict]:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def upsert_row(csv_path: Path, row: dict) -> None:
    """Insert or replace the row of ``row['point_id']``; the whole file is replaced atomically."""
    unknown = set(row) - set(RUN_COLUMNS)
    if unknown:
        raise KeyError(f"columns {sorted(unknown)} are not in bench.schema.RUN_COLUMNS")
    with locked(csv_path):
        rows = [r for r in read_rows(csv_path) if r["point_id"] != row["point_id"]]
        rows.append({c: row.get(c, "") for c in RUN_COLUMNS})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RUN_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Grid points
# ----------------------------------------------------------------------------------------------------------------
def grid_points(cfg: DictConfig) -> list[tuple[str, dict]]:
    """(backbone name, backbone overrides) for every point of the grid that ``backbone`` (or ``backbones``) keeps."""
    grid = OmegaConf.to_container(cfg.sweep.points, resolve=True)
    selection = cfg.get("backbones") or cfg.backbone.name
    if selection == "all":
        names = [n for n in grid if n in backbones.available()]
    elif isinstance(selection, str):
        names = [selection]
    else:  # backbones=[dit,lit]
        names = [str(n) for n in selection]
    points = []
    for name in names:
        backbones.get(name)  # unknown names fail here with the list of available ones
        if name not in grid:
            raise ValueError(f"grid {cfg.sweep.name!r} has no points for backbone {name!r}; add them to "
                             f"conf/sweep/{cfg.sweep.name}.yaml or choose another grid with sweep=<name>")
        points += [(name, dict(p)) for p in grid[name]]
    return points


def backbone_config(name: str, overrides: dict) -> dict:
    """conf/backbone/<name>.yaml (if present) merged with the point's overrides."""
    base_path = CONF_DIR / "backbone" / f"{name}.yaml"
    base = OmegaConf.to_container(OmegaConf.load(base_path)) if base_path.exists() else {"name": name}
    base.update(overrides)
    base["name"] = name
    return base


def point_id(name: str, overrides: dict, cfg: DictConfig) -> str:
    arch = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    return (f"{name}-{arch}-img{cfg.dataset.image_size}-steps{cfg.train.steps}-bs{cfg.train.batch_size}"
            f"-seed{cfg.seed}").replace("/", "_").replace(" ", "")


def train_config(cfg: DictConfig, bb: dict, run_dir: Path, resume: bool) -> DictConfig:
    """The trainer's config (conf/train.yaml schema) for one point."""
    return OmegaConf.create({
        "seed": cfg.seed, "device": cfg.device, "threads": cfg.threads, "progress": cfg.progress,
        "run_dir": str(run_dir), "resume": str(run_dir) if resume else None, "init_from": None,
        "backbone": bb, "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "diffusion": OmegaConf.to_container(cfg.diffusion, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "distill": {"teacher": None}, "sample": {"per_class": 0},
    })


# ----------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak device memory of a block: CUDA max_memory_allocated, or on CPU the peak resident set size above the
    level at entry, sampled every 20 ms from /proc/self/statm (the host has no allocator statistics)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._rss_mb()
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb()) - self._base


# ----------------------------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------------------------
def run_point(cfg: DictConfig, name: str, overrides: dict, scorer: Any) -> dict:
    from diffusion.sampling import sample_images, to_uint8

    t0 = time.time()
    device = resolve_device(cfg.device)
    pid = point_id(name, overrides, cfg)
    run_dir = Path(cfg.runs_root) / cfg.dataset.name / pid
    bb = backbone_config(name, overrides)
    row: dict[str, Any] = {
        "point_id": pid, "dataset": cfg.dataset.name, "image_size": cfg.dataset.image_size,
        "backbone": name, "train_steps": cfg.train.steps, "batch": cfg.train.batch_size, "lr": cfg.train.lr,
        "num_samples": cfg.eval.num_samples, "sampler": cfg.eval.sampler, "sample_steps": cfg.eval.steps,
        "cfg_scale": cfg.eval.cfg_scale, "seed": cfg.seed, "device": _device_name(device),
        "torch_version": torch.__version__, "git_commit": git_commit(), "run_dir": str(run_dir),
    }
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    done_steps = load_checkpoint(ckpt_path)["step"] if ckpt_path.exists() else 0
    peak_file = run_dir / "train_peak_mem_mb.txt"
    if done_steps < cfg.train.steps:
        with PeakMemory(device) as mem:
            summary = train(train_config(cfg, bb, run_dir, resume=done_steps > 0))
        train_ips, peak_mb = summary["train_img_per_s"], mem.peak_mb
        atomic_write_text(peak_file, f"{peak_mb}\n")
    else:  # trained before an interruption during evaluation: keep what its training measured
        train_ips = _logged_throughput(run_dir)
        peak_mb = float(peak_file.read_text()) if peak_file.exists() else float("nan")
    ckpt = load_checkpoint(ckpt_path)
    model = build_from_checkpoint(ckpt, use_ema=True).to(device)
    arch = model.arch
    row.update(size=arch.get("size", ""), patch=arch.get("patch") or "", depth=arch.get("depth", ""),
               width=arch.get("width", ""), channels=model.in_channels, **count_params(model))
    row.pop("trainable_params", None)
    row["gmacs"] = forward_gmacs(model, model.input_size, model.in_channels)
    row["train_compute_gmacs"] = row["gmacs"] * 3 * cfg.train.batch_size * cfg.train.steps

    labels = torch.arange(cfg.eval.num_samples) % model.num_classes
    ts = time.time()
    samples = sample_images(model, labels, sampler=cfg.eval.sampler, steps=cfg.eval.steps,
                            cfg_scale=cfg.eval.cfg_scale, seed=cfg.eval.seed,
                            noise_schedule=cfg.diffusion.noise_schedule,
                            diffusion_steps=cfg.diffusion.diffusion_steps, batch_size=cfg.eval.batch_size,
                            device=device, progress=False, clip_denoised=cfg.eval.clip_denoised)
    sample_ips = len(labels) / (time.time() - ts)
    scores = scorer.score(to_uint8(samples), labels)  # scored as saved images: clamped, 8-bit (DiT's protocol)
    from diffusion.sampling import save_grid

    save_grid(samples[: 10 * min(model.num_classes, 10)], run_dir / "eval_samples.png",
              ncol=min(model.num_classes, 10))
    row.update(metric_name=scores["metric_name"], metric_value=scores["metric_value"],
               classifier_accuracy=scores.get("classifier_accuracy", ""), train_img_per_s=train_ips,
               sample_img_per_s=sample_ips, peak_mem_mb=peak_mb, wall_time_s=time.time() - t0, status="ok",
               error="")
    return row


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def _logged_throughput(run_dir: Path) -> float:
    with open(run_dir / "log.csv", newline="") as f:
        values = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["img_per_s"] not in ("", "nan")]
    return sorted(values)[len(values) // 2] if values else float("nan")


def make_scorer(cfg: DictConfig) -> Any:
    """The configured metric: the dataset classifier's Frechet distance (CPU scale) or Inception FID."""
    from bench import metrics
    from diffusion.data import load_dataset

    train_ds = load_dataset(cfg.dataset.name, "train", cfg.dataset.image_size, cfg.dataset.get("root"))
    test_ds = load_dataset(cfg.dataset.name, "test", cfg.dataset.image_size, cfg.dataset.get("root"))
    if cfg.eval.metric == "classifier":
        return metrics.ClassifierMetric(cfg.dataset.name, train_ds.images, train_ds.labels, test_ds.images,
                                        test_ds.labels, cache_dir=cfg.cache_dir)
    if cfg.eval.metric == "fid":
        return metrics.InceptionMetric(test_ds.images, cache_dir=cfg.cache_dir,
                                       inception_weights=cfg.eval.inception_weights, device=cfg.device)
    raise ValueError(f"unknown eval.metric {cfg.eval.metric!r}; choose classifier or fid")


def run_sweep(cfg: DictConfig) -> list[dict]:
    """Run (or resume) every selected grid point; returns the rows of this sweep."""
    from tqdm.auto import tqdm

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    points = grid_points(cfg)
    csv_path = Path(cfg.results_dir) / cfg.dataset.name / "runs.csv"
    print(f"sweep {cfg.sweep.name}: {len(points)} points on {cfg.dataset.name} {cfg.dataset.image_size}px, "
          f"{cfg.train.steps} steps x batch {cfg.train.batch_size}; FLOPs are {CONVENTION}; rows -> {csv_path}")
    scorer = make_scorer(cfg)
    rows = []
    bar = tqdm(points, desc="sweep", unit="point", position=0, dynamic_ncols=True, disable=not cfg.progress)
    for name, overrides in bar:
        pid = point_id(name, overrides, cfg)
        bar.set_postfix_str(pid[:60])
        done = {r["point_id"]: r for r in read_rows(csv_path)}
        if done.get(pid, {}).get("status") == "ok":
            rows.append(done[pid])
            continue
        try:
            row = run_point(cfg, name, overrides, scorer)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing point is recorded and the sweep goes on
            log.error("point %s failed:\n%s", pid, traceback.format_exc())
            row = {"point_id": pid, "dataset": cfg.dataset.name, "image_size": cfg.dataset.image_size,
                   "backbone": name, "train_steps": cfg.train.steps, "batch": cfg.train.batch_size,
                   "seed": cfg.seed, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
                   "torch_version": torch.__version__, "git_commit": git_commit()}
        upsert_row(csv_path, row)
        rows.append(row)
    bar.close()
    print_summary(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    import pandas as pd

    if not rows:
        print("no points")
        return
    df = pd.DataFrame(rows)
    cols = [c for c in ["backbone", "size", "patch", "depth", "width", "params", "gmacs", "metric_name",
                        "metric_value", "classifier_accuracy", "train_img_per_s", "status"] if c in df]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(df[cols].to_string(index=False))


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    rows = run_sweep(cfg)
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} point(s) failed: " + "; ".join(f"{r['point_id']}: {r['error']}" for r in failed))


if __name__ == "__main__":
    main()
