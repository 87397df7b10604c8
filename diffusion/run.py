"""Run identity and the run directory: what a run is, where it lives, and what it recorded.

A run's **key** is a readable prefix plus a hash of everything that determines its training trajectory: the
backbone's resolved constructor arguments (data shape included), the dataset, the diffusion, the training recipe
(``train.*`` except the stopping point ``steps``, the logging cadence and the exact ``grad_checkpoint``; a
speed switch that changes the numerics only when on), the seed, weight inheritance and distillation.
``train.steps`` is not part of it: with a constant learning rate a run of N steps is the prefix of a longer one, so
extending a run is a resume, not a new recipe. The device, thread count and progress bars are
recorded in the run's history, not keyed.

Run directory::

    config.yaml          the resolved config of the latest session (resume=<dir> alone restores it)
    log.csv              one row per step (img_per_s only on steady-state window ends), a session column
    history.yaml         one entry per session: steps, commit (+dirty), device, settings changed on resume,
                         throughput and peak memory of that session
    checkpoints/last.pt  {model, ema, opt, step, config: {backbone_name, backbone_kwargs, key, identity, history,
                         train}} written atomically
    run.lock             held while a process trains the run
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "mse", "vb", "aux", "distill", "grad_norm", "img_per_s", "elapsed_s", "session"]
# grad_checkpoint recomputes the same activations with the same RNG state, heap_cache only changes where freed
# memory goes: bit-identical steps, so not keyed
UNKEYED_TRAIN_KEYS = ("steps", "log_every", "ckpt_every", "grad_checkpoint", "heap_cache")
# Speed switches that change the numerics (another kernel, rounding or accumulation order): keyed only when on, so
# the keys of every run without them (results/published included) hold
KEYED_SWITCHES = ("compile", "channels_last", "fused_adamw", "tf32", "flash_attn")


class RunExistsError(FileExistsError):
    """A fresh run was pointed at a directory that holds another run."""


class RunBusyError(RuntimeError):
    """Another process holds the run's lock."""


class RecipeMismatchError(ValueError):
    """A resume whose settings differ from the checkpoint's, without ``allow_changes``."""


# ----------------------------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for nested dicts (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def digest(tree: Any, length: int = 10) -> str:
    """Stable short hash of a JSON-able tree (key order irrelevant)."""
    text = json.dumps(tree, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_identity(plain_cfg: dict, backbone_kwargs: dict, precision: str, dataset_identity: dict | None = None
                 ) -> dict:
    """Everything that determines a run's trajectory (see module docstring); ``plain_cfg`` is the resolved config,
    ``dataset_identity`` what the dataset adds (its crop protocol, the VAE of latents; see ``Dataset.identity``)."""
    train = {k: v for k, v in plain_cfg["train"].items()
             if k not in UNKEYED_TRAIN_KEYS and not (k in KEYED_SWITCHES and not v)}
    train["precision"] = precision  # the effective one: auto resolves per device
    distill = plain_cfg.get("distill") or {}
    return {
        "backbone": {"name": plain_cfg["backbone"]["name"], **backbone_kwargs},
        "dataset": {"name": plain_cfg["dataset"]["name"], "image_size": backbone_kwargs.get("input_size"),
                    "random_flip": bool(plain_cfg["dataset"].get("random_flip", False)),
                    **(dataset_identity or {})},
        "diffusion": dict(plain_cfg["diffusion"]),
        "train": train,
        "seed": plain_cfg["seed"],
        "init_from": plain_cfg.get("init_from"),
        "distill": dict(distill) if distill.get("teacher") else None,
    }


def run_key(identity: dict) -> str:
    bb = identity["backbone"]
    arch = "-".join(str(bb[k]) for k in ("size", "patch_size") if bb.get(k) is not None)
    prefix = f"{bb['name']}-{arch}-{identity['dataset']['name']}{identity['dataset']['image_size']}"
    return f"{prefix.replace('/', '_')}-{digest(identity)}"


def identity_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every setting that differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(old_identity: dict, new_identity: dict, allow: list[str], run_dir: Path) -> dict:
    """The changes of a resume; raises :class:`RecipeMismatchError` for changes not listed in ``allow`` (a listed
    key also allows its sub-keys: ``allow_changes=[train]``)."""
    changes = identity_changes(old_identity, new_identity)
    refused = {k: v for k, v in changes.items()
               if not any(k == a or k.startswith(a + ".") for a in allow)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RecipeMismatchError(
            f"resume of {run_dir}: these settings differ from the ones the checkpoint was trained with: {listed}. "
            f"`resume={run_dir}` alone continues with the run's own config; to change them deliberately add "
            f"allow_changes=[{','.join(refused)}] (recorded in the run's history.yaml)")
    return changes


# ----------------------------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------------------------
def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("config.yaml", "log.csv", "checkpoints"))


def claim_new_run_dir(run_dir: str | None, default_parent: Path, stem: str) -> Path:
    """The directory of a fresh run, created now. An explicit ``run_dir`` must not hold another run; the default
    is ``default_parent/stem`` with a numeric suffix when taken (mkdir is atomic, so concurrent launches in the
    same second get distinct directories)."""
    if run_dir is not None:
        path = Path(run_dir)
        if holds_run(path):
            raise RunExistsError(f"run_dir {path} already holds a run; continue it with resume={path}, or choose "
                                 f"another run_dir (or leave run_dir unset for a new unique directory)")
        path.mkdir(parents=True, exist_ok=True)
        return path
    default_parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        path = default_parent / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunExistsError(f"no free run directory {default_parent / stem}-N")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock of a run directory for the duration of a training session."""
    path = run_dir / "run.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunBusyError(f"run {run_dir} is being trained by another process ({f.read().strip() or 'pid ?'}); "
                               f"wait for it to finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------
# log.csv
# ----------------------------------------------------------------------------------------------------------------
def read_log(path: Path, upto_step: int | None = None) -> list[dict]:
    """The rows of ``log.csv`` (at most ``upto_step``), parsed defensively: a torn or malformed row (killed write,
    hand edit) is dropped with a warning, never rewritten as empty values."""
    if not path.exists():
        return []
    rows, dropped = [], 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "step":
            log.warning("%s has no header; its rows are ignored", path)
            return []
        for fields in reader:
            if len(fields) != len(header):
                dropped += 1
                continue
            row = dict(zip(header, fields))
            try:
                step = int(row["step"])
                float(row["loss"])
            except (KeyError, ValueError):
                dropped += 1
                continue
            if upto_step is None or step <= upto_step:
                rows.append({c: row.get(c, "") for c in LOG_COLUMNS})
    if dropped:
        log.warning("%s: dropped %d torn or malformed row(s)", path, dropped)
    return rows


def steady_throughput(rows: list[dict]) -> float:
    """THE training throughput (img/s): median over the steady-state logging windows of the rows given (each
    session's first window is warm-up and logs no img/s). NaN when no window completed."""
    values = [float(r["img_per_s"]) for r in rows if r.get("img_per_s") not in ("", None)]
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
