"""The one trainer every backbone goes through (EDM style: it knows nothing concrete about a network).

    run = build_run(cfg)            # data, model, EMA, optimizer, diffusion, teacher; fresh or resumed
    for each step: train_step(run)  # per-step randomness from (seed, step): t, noise, label dropout
    save_checkpoint(run)            # atomically, every train.ckpt_every steps
    draw_samples(run)               # class-conditional EMA grid at the end

The loss comes from the backbone's own hook ``model.training_losses(diffusion, x, t, y, noise)`` (the ADM loss,
mse + vb with learned sigma, plus e.g. DiMR's multi-scale term); labels are dropped once per batch here, so the
backbone and a distillation teacher see the same labels. Run identity, run directories and the log format are in
``diffusion.run``; a resume is refused when its settings differ from the checkpoint's (``allow_changes=``
accepts and records deliberate changes).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml
from omegaconf import DictConfig, OmegaConf

import backbones
from backbones.layers import count_parameters, drop_labels, flash_attention
from diffusion import create_diffusion
from diffusion.config import HEAP_CACHE_UNAVAILABLE, ConfigError, SwitchUnavailable, to_plain, validate
from diffusion.data import Dataset, batch_loader, load_from_config
from diffusion.run import (
    LOG_COLUMNS,
    check_resume,
    claim_new_run_dir,
    now_text,
    read_log,
    run_identity,
    run_key,
    run_lock,
    steady_throughput,
)
from runio.dist import World, all_ranks_ok, barrier, broadcast, init_world, mean_over_ranks
from runio.env import PeakMemory, device_name, git_commit, keep_freed_memory, resolve_device
from runio.files import atomic_torch_save, atomic_write_text, load_file, read_state_dict

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss or gradient became non-finite; the last good checkpoint (if any) is left intact."""


class Interrupted(RuntimeError):
    """Ctrl-C: the run stopped cleanly between two steps after writing a checkpoint."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}; resume with "
                         f"`python -m diffusion.train resume={run_dir}`")
        self.step, self.run_dir = step, run_dir


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and small pieces
# ----------------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict:
    """One of our checkpoints {model, ema, opt, step, config} (a .pt file or a run directory), weights only."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "step" not in ckpt or "config" not in ckpt:
        raise RuntimeError(f"{path} is not a checkpoint written by diffusion.train (no step/config); official "
                           f"weights load with backbones.dit.load_official_checkpoint or init_from=")
    return ckpt


def backbone_kwargs(backbone_cfg: DictConfig | dict, dataset: Dataset, class_dropout_prob: float,
                    learn_sigma: bool, diffusion_steps: int = 1000) -> dict:
    """Constructor keywords: the backbone group (``name`` removed, nulls dropped) plus the data shape, and
    ``num_timesteps`` for backbones whose time input depends on the diffusion's T (DiMR's time-dependent norms);
    left out at T = 1000, the constructors' default, so the keys of existing runs do not change."""
    cfg = to_plain(backbone_cfg) if isinstance(backbone_cfg, DictConfig) else dict(backbone_cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "name" and v is not None}
    kwargs.update(input_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes,
                  class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma)
    if int(diffusion_steps) != 1000 and "num_timesteps" in inspect.signature(backbones.get(cfg["name"])).parameters:
        kwargs["num_timesteps"] = int(diffusion_steps)
    return kwargs


def build_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Rebuild the backbone recorded in a checkpoint's config and load its (EMA) weights."""
    cfg = ckpt["config"]
    model = backbones.build(cfg["backbone_name"], **cfg["backbone_kwargs"])
    model.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"])
    return model


def inherit_weights(model: nn.Module, source: str | os.PathLike) -> dict:
    """Weight inheritance behind ``init_from=``: the backbone's own ``inherit_weights`` when it defines one (LiT:
    every DiT tensor except attention, strictly), else every tensor whose name and shape match. Returns
    {"loaded": [...], "fresh": [...], ...}; matching nothing is an error (wrong file or backbone)."""
    if hasattr(model, "inherit_weights"):
        report = model.inherit_weights(source)
    else:
        state, _, _ = read_state_dict(source)
        own = model.state_dict()
        take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(take, strict=False)
        report = {"loaded": sorted(take), "fresh": sorted(set(own) - set(take)),
                  "ignored": sorted(set(state) - set(take))}
    if not report["loaded"]:
        raise ValueError(f"init_from={source}: no tensor of the checkpoint matches {type(model).__name__} by name and "
                         f"shape; check that it holds this backbone at this size and data shape")
    return report


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param for every parameter (frozen ones too, as DiT's train.py), paired by
    name; the same two roundings as DiT's per-tensor ``mul_(decay).add_(param, alpha=1 - decay)``, as two
    multi-tensor ops instead of a Python loop of 2 x (number of tensors) ops."""
    ema_params = OrderedDict(ema.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    targets = [ema_params[name] for name in names]
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, [p.detach() for p in model.parameters()], alpha=1 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Constant decay (DiT), or with warm-up min(decay, (1 + n) / (10 + n)) for short runs."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; parameters the backbone lists in ``no_weight_decay()`` (and 1-D tensors) get no decay. ``fused``:
    torch's one-kernel AdamW (train.fused_adamw; rounds differently from the default per-tensor loop)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if fused else {}))


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in one optimisation step (t, noise, label dropout, drop-path): a function of
    (run seed, step) only, so resuming needs no RNG state and the draw does not depend on the device."""
    return (seed * 1_000_003 + step * 7919 + 1) % (2**63 - 1)


def effective_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


SWITCHES = ("compile", "channels_last", "fused_adamw", "tf32", "flash_attn", "grad_checkpoint", "heap_cache")


def switches_on(train_cfg: Any) -> list[str]:
    """The speed switches (train.compile, ...) a config turns on, in a fixed order."""
    return [name for name in SWITCHES if train_cfg.get(name)]


def apply_switches(model: nn.Module, train_cfg: Any, device: torch.device) -> None:
    """What the switches change on the model and the process, before training: TF32 (set either way on CUDA, so a
    previous run in the process cannot leak it), channels_last, per-block checkpointing, glibc's malloc policy
    (heap_cache: for the rest of the process, it cannot be undone); compile comes last, after
    the EMA copy (see build_run). flash-attn and the channels_last input are applied per step by train_step."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(train_cfg.tf32)
    if train_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if train_cfg.grad_checkpoint:
        model.set_grad_checkpointing(True)
    if train_cfg.get("heap_cache") and not keep_freed_memory():
        raise SwitchUnavailable(HEAP_CACHE_UNAVAILABLE)


# ----------------------------------------------------------------------------------------------------------------
# The Run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    dataset: Dataset
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    diffusion: Any
    teacher: nn.Module | None
    kwargs: dict
    identity: dict
    key: str
    step: int = 0
    history: list = field(default_factory=list)
    created_dir: bool = False
    checkpoint_written: bool = False
    world: World = field(default_factory=World)
    loss_module: nn.Module | None = None  # the backbone's training_losses, DDP-wrapped under torchrun
    batches: Any = None                   # iterator over this rank's (images, labels) slices, one per step

    @property
    def session(self) -> dict:
        return self.history[-1]

    def checkpoint_config(self) -> dict:
        return {"backbone_name": self.cfg.backbone.name, "backbone_kwargs": self.kwargs, "key": self.key,
                "identity": self.identity, "history": self.history, "train": to_plain(self.cfg)}


def _load_data(cfg: DictConfig) -> Dataset:
    try:
        return load_from_config(cfg.dataset, "train")
    except ValueError as e:  # an option that does not apply to this dataset
        raise ConfigError(str(e)) from None


def build_run(cfg: DictConfig, dataset: Dataset | None = None) -> Run:
    """Everything a training session needs, from a validated config: fresh (a new run directory) or resumed
    (``cfg.resume``: the checkpoint's identity must match unless ``allow_changes`` lists the difference).
    ``dataset`` replaces the one ``cfg.dataset`` names (in-memory data: bench.throughput); its name and identity
    are then the run's."""
    cfg = validate(cfg)
    world, device = init_world(resolve_device(cfg.device))
    if cfg.train.batch_size % world.size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
                          f"{world.size} processes; choose a multiple of {world.size}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = load_checkpoint(cfg.resume)
        resume_path = Path(cfg.resume).resolve()  # runs/<dataset>/latest is a symlink
        run_dir = resume_path if resume_path.is_dir() else resume_path.parent.parent

    plain = to_plain(cfg)
    if dataset is None:
        dataset = _load_data(cfg)
    else:  # keyed by its own name (a loaded dataset's may differ from its config name: keys stay as they were)
        plain["dataset"]["name"] = dataset.name
    kwargs = backbone_kwargs(cfg.backbone, dataset, cfg.train.class_dropout_prob, cfg.diffusion.learn_sigma,
                             cfg.diffusion.diffusion_steps)
    identity = run_identity(plain, kwargs, effective_precision(plain["train"]["precision"], device),
                            dataset.identity())
    key = run_key(identity)
    changes: dict = {}
    if resume_ckpt is not None:
        old_identity = resume_ckpt["config"].get("identity")
        if old_identity is None:
            raise RuntimeError(f"{run_dir} was written by an older version without a run key; it cannot be resumed "
                               f"safely: start a new run")
        changes = check_resume(old_identity, identity, list(cfg.allow_changes), run_dir)

    torch.manual_seed(cfg.seed)  # the initialisation is a function of the seed
    model = backbones.build(cfg.backbone.name, **kwargs)
    if cfg.init_from and resume_ckpt is None:
        report = inherit_weights(model, cfg.init_from)
        log.info("init_from %s: loaded %d tensors, kept %d fresh: %s", cfg.init_from, len(report["loaded"]),
                 len(report["fresh"]), report["fresh"][:12])
    model.to(device)
    apply_switches(model, cfg.train, device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, fused=cfg.train.fused_adamw)
    diffusion = create_diffusion("", noise_schedule=str(to_plain(cfg.diffusion)["noise_schedule"]),
                                 learn_sigma=cfg.diffusion.learn_sigma, diffusion_steps=cfg.diffusion.diffusion_steps)
    teacher = None
    if cfg.distill.teacher:
        from diffusion.distill import load_teacher

        teacher = load_teacher(cfg.distill.teacher).to(device)

    history: list = []
    step = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        opt.load_state_dict(resume_ckpt["opt"])
        for group, wd in zip(opt.param_groups, (cfg.train.weight_decay, 0.0)):  # a changed recipe really applies
            group["lr"], group["weight_decay"] = cfg.train.lr, wd
            group["fused"] = True if cfg.train.fused_adamw else None
        step = int(resume_ckpt["step"])
        history = list(resume_ckpt["config"].get("history") or [])
        created = False
        log.info("resumed %s at step %d%s", run_dir, step,
                 f" with changes {changes}" if changes else "")
    else:
        ema.load_state_dict(model.state_dict())
        stem = f"{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}-{key.rsplit('-', 1)[1][:6]}"
        run_dir = None
        if world.is_main:  # rank 0 claims the directory; every rank agrees on it
            run_dir = claim_new_run_dir(cfg.run_dir, Path("runs") / cfg.dataset.name, stem)
            if cfg.run_dir is None:
                point_latest(run_dir)
        run_dir = Path(broadcast(None if run_dir is None else str(run_dir), world))
        created = world.is_main
    history.append({"session": len(history) + 1, "started": now_text(), "start_step": step, "end_step": step,
                    "target_steps": int(cfg.train.steps), "git_commit": git_commit(), "device": device_name(device),
                    "torch": str(torch.__version__), "changes": {k: list(v) for k, v in changes.items()},
                    "switches": switches_on(cfg.train)})
    if cfg.train.compile:  # the EMA (sampling) stays eager; nn.Module.compile keeps the state_dict's names
        model.compile()
    loss_module: nn.Module = _TrainingLoss(model, diffusion)
    if world.distributed:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    batches = iter(batch_loader(dataset, cfg.train.batch_size, cfg.seed, step, cfg.train.steps, world.rank,
                                world.size, cfg.dataset.workers, pin_memory=device.type == "cuda"))
    return Run(cfg=cfg, run_dir=run_dir, device=device, dataset=dataset, model=model, ema=ema, opt=opt,
               diffusion=diffusion, teacher=teacher, kwargs=kwargs, identity=identity, key=key, step=step,
               history=history, created_dir=created, checkpoint_written=resume_ckpt is not None, world=world,
               loss_module=loss_module, batches=batches)


class _TrainingLoss(nn.Module):
    """The backbone's own loss hook as a module, so that DDP can wrap it and synchronise the gradients."""

    def __init__(self, model: nn.Module, diffusion: Any):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> dict:
        return self.model.training_losses(self.diffusion, x, t, y, noise)


def point_latest(run_dir: Path) -> None:
    """``runs/<dataset>/latest`` -> the newest default run directory (what the README's commands use)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def save_checkpoint(run: Run) -> None:
    run.session["end_step"] = run.step
    if not run.world.is_main:
        return
    atomic_torch_save({"model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
                       "step": run.step, "config": run.checkpoint_config()},
                      run.run_dir / "checkpoints" / "last.pt")
    run.checkpoint_written = True
    atomic_write_text(run.run_dir / "history.yaml", yaml.safe_dump(run.history, sort_keys=False))


def train_step(run: Run) -> dict[str, float]:
    """One optimisation step at ``run.step`` (then incremented); returns the logged metrics.

    One host synchronisation per step (DiT's train.py has one, ``loss.item()``): the loss terms and the gradient
    norm come back together, before the optimizer step, so a non-finite loss or gradient still stops the run with
    the weights of the previous step. Under torchrun the loss is also checked on every rank before the backward (a
    rank that raised there would leave the others waiting in DDP's gradient all-reduce)."""
    cfg, tc, model = run.cfg, run.cfg.train, run.model
    x, y = next(run.batches)  # this rank's slice of the global batch of this step
    # Everything random is drawn for the GLOBAL batch from (seed, step), then sliced: the same whatever the
    # world size. Order of draws: t, noise, label dropout, flips.
    seed = step_seed(cfg.seed, run.step)
    gen = torch.Generator().manual_seed(seed)
    B, rank_slice = tc.batch_size, slice(run.world.rank * x.shape[0], (run.world.rank + 1) * x.shape[0])
    t = torch.randint(0, run.diffusion.num_timesteps, (B,), generator=gen)[rank_slice]
    noise = torch.randn((B, *run.dataset.input_shape()), generator=gen)[rank_slice]
    drop = torch.rand(B, generator=gen)[rank_slice] < tc.class_dropout_prob
    y = drop_labels(y, tc.class_dropout_prob, model.num_classes, force_drop_ids=drop.long())  # for model and teacher
    flip = torch.rand(B, generator=gen)[rank_slice] < 0.5 if cfg.dataset.random_flip else None
    posterior_noise = None
    if run.dataset.stochastic:  # e.g. a sample of each VAE latent posterior
        posterior_noise = torch.randn((B, *run.dataset.input_shape()), generator=gen)[rank_slice]
    x = run.dataset.model_input(x, flip, posterior_noise)
    torch.manual_seed(seed + run.world.rank)  # randomness inside the model (drop-path), per rank
    x, y, t, noise = (v.to(run.device, non_blocking=True) for v in (x, y, t, noise))
    if tc.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    precision = run.identity["train"]["precision"]
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast, flash_attention(bool(tc.flash_attn)):
        terms = run.loss_module(x, t, y, noise)
        loss = terms["loss"]
        distill = None
        if run.teacher is not None:
            from diffusion.distill import hybrid_distillation_loss

            with torch.no_grad():
                teacher_out = run.teacher(terms["x_t"], t, y)
            distill = hybrid_distillation_loss(terms["model_output"], teacher_out, model.in_channels,
                                               cfg.distill.lambda_eps, cfg.distill.lambda_var)
            loss = loss + distill
        loss = loss.mean()
    if run.world.distributed and not all_ranks_ok(bool(torch.isfinite(loss)), run.world, run.device):
        raise DivergenceError(_divergence_message(run, f"non-finite loss ({loss.item()} on rank {run.world.rank})"))
    run.opt.zero_grad(set_to_none=True)
    with flash_attention(bool(tc.flash_attn)):  # checkpointed blocks recompute their forward in here
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if tc.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    else:  # the norm alone, for the log: clip_grad_norm_ would also rescale every gradient by 1
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    zero = loss.new_zeros(())
    aux = terms.get("aux")
    terms_mean = mean_over_ranks(torch.stack([loss.detach(), terms["mse"].detach().mean(),
                                              terms["vb"].detach().mean(),
                                              aux.detach().mean() if aux is not None else zero,
                                              distill.detach().mean() if distill is not None else zero]).float(),
                                 run.world)
    *values, own_loss, grad_norm = torch.cat([terms_mean, loss.detach().float().reshape(1),
                                              grad_norm.detach().float().reshape(1).to(terms_mean.device)]).tolist()
    if not math.isfinite(own_loss):
        raise DivergenceError(_divergence_message(run, f"non-finite loss ({own_loss} on rank {run.world.rank})"))
    if not math.isfinite(grad_norm):
        raise DivergenceError(_divergence_message(run, "non-finite gradient norm"))
    run.opt.step()
    update_ema(run.ema, model, ema_decay_at(run.step, tc.ema_decay, tc.ema_warmup))
    run.step += 1
    return dict(zip(("loss", "mse", "vb", "aux", "distill"), values), grad_norm=grad_norm)


def _divergence_message(run: Run, what: str) -> str:
    where = (f"the last good checkpoint in {run.run_dir / 'checkpoints'} (step {run.session['end_step']}) is intact"
             if run.checkpoint_written else
             f"no checkpoint had been written yet (the first is at step {run.cfg.train.ckpt_every})")
    return (f"{what} at step {run.step + 1} of {run.cfg.backbone.name}; {where}; lower train.lr or set "
            f"train.grad_clip")


@contextlib.contextmanager
def _graceful_interrupt() -> Any:
    """The first Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(cfg: DictConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train one backbone as configured (see ``diffusion.config.RunConfig``). Returns a summary dict.

    ``on_step(step, metrics)`` is called after every optimisation step (progress hooks, tests).
    """
    t_start = time.time()
    run = build_run(cfg)
    try:
        with run_lock(run.run_dir) if run.world.is_main else contextlib.nullcontext():
            return _train_session(run, on_step, t_start)
    except BaseException:
        if run.created_dir and not run.checkpoint_written:  # nothing worth keeping: leave no empty run directory
            shutil.rmtree(run.run_dir, ignore_errors=True)
        raise


def _train_session(run: Run, on_step: Callable[[int, dict], None] | None, t_start: float) -> dict:
    from tqdm.auto import tqdm

    cfg, tc, main = run.cfg, run.cfg.train, run.world.is_main
    log_path = run.run_dir / "log.csv"
    previous = read_log(log_path, run.step)  # rows after the checkpoint and torn rows are dropped
    if main:  # rank 0 alone writes the run directory
        atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
        atomic_write_text(log_path, ",".join(LOG_COLUMNS) + "\n" +
                          "".join(",".join(str(r[c]) for c in LOG_COLUMNS) + "\n" for r in previous))
    session = run.session["session"]
    n_params = count_parameters(run.model)
    log.info("%s %s: %.3fM params, dataset %s %s, device %s, run %s (key %s)", cfg.backbone.name, run.model.arch,
             n_params / 1e6, run.dataset.name, run.dataset.input_shape(), run.device, run.run_dir, run.key)

    bar = tqdm(total=tc.steps, initial=run.step, desc=f"train {cfg.backbone.name}", dynamic_ncols=True,
               disable=not cfg.progress or not main)
    run.model.train()
    rows: list[dict] = []
    window_start, window_images, first_window = time.time(), 0, True
    metrics: dict = {}
    log_file = open(log_path, "a", newline="") if main else open(os.devnull, "w")
    with PeakMemory(run.device) as mem, _graceful_interrupt() as stop, log_file:
        try:
            while run.step < tc.steps:
                metrics = train_step(run)
                window_images += tc.batch_size
                img_per_s = ""
                if run.step % tc.log_every == 0 or run.step == tc.steps:
                    if run.device.type == "cuda":
                        torch.cuda.synchronize(run.device)
                    now = time.time()
                    if not first_window:  # the first window of a session is warm-up
                        img_per_s = f"{window_images / max(now - window_start, 1e-9):.2f}"
                    first_window, window_start, window_images = False, now, 0
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=img_per_s or "warm-up")
                row = {"step": run.step, **{c: f"{metrics[c]:.6g}" for c in LOG_COLUMNS[1:7]},
                       "img_per_s": img_per_s, "elapsed_s": f"{time.time() - t_start:.1f}", "session": session}
                rows.append(row)
                log_file.write(",".join(str(row[c]) for c in LOG_COLUMNS) + "\n")
                bar.update(1)
                if run.step % tc.ckpt_every == 0 or run.step == tc.steps:
                    log_file.flush()
                    save_checkpoint(run)
                if on_step is not None:
                    on_step(run.step, metrics)
                if all_ranks_stop(stop.is_set(), run):
                    log_file.flush()
                    save_checkpoint(run)
                    raise Interrupted(run.step, run.run_dir)
        finally:
            bar.close()
    run.session.update(img_per_s=steady_throughput(rows), peak_mem_mb=mem.peak_mb, finished=now_text())
    save_checkpoint(run)  # also when no step ran (train.steps reached, or 0: keeps the inherited init)
    barrier(run.world)

    summary: dict[str, Any] = {"run_dir": str(run.run_dir), "key": run.key, "steps": run.step, "params": n_params,
                               "final_loss": metrics.get("loss", float(previous[-1]["loss"]) if previous else
                                                         float("nan")),
                               "train_img_per_s": run.session["img_per_s"], "peak_mem_mb": mem.peak_mb,
                               "wall_time_s": time.time() - t_start}
    if cfg.sample.per_class > 0 and main:
        summary["samples"] = str(draw_samples(run))
    return summary


def all_ranks_stop(requested: bool, run: Run) -> bool:
    """Ctrl-C on any rank (torchrun forwards it to all) stops every rank after the same step."""
    return not all_ranks_ok(not requested, run.world, run.device)


def draw_samples(run: Run) -> Path:
    """The end-of-training grid (one column per class, named) and its .npz, from the EMA (or raw) model."""
    from diffusion.sampling import class_grid_labels, sample_images, save_grid, save_npz

    sc = run.cfg.sample
    labels = class_grid_labels(run.dataset.num_classes, sc.per_class)
    images = sample_images(run.ema if sc.use_ema else run.model, labels, sampler=to_plain(sc)["sampler"],
                           steps=sc.steps, cfg_scale=sc.cfg_scale, seed=sc.seed,
                           noise_schedule=to_plain(run.cfg.diffusion)["noise_schedule"],
                           diffusion_steps=run.cfg.diffusion.diffusion_steps, device=run.device,
                           progress=run.cfg.progress, clip_denoised=run.dataset.clip_denoised(sc.clip_denoised))
    images = run.dataset.decode(images, run.device)  # VAE latents -> pixels; identity for pixel data
    ncol = min(run.dataset.num_classes, 10)
    path = save_grid(images, run.run_dir / "samples.png", ncol=ncol, class_names=run.dataset.class_names[:ncol])
    save_npz(images, labels, run.run_dir / "samples.npz")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Configs for resume
# ----------------------------------------------------------------------------------------------------------------
def resume_config(resume: str | os.PathLike, overrides: list[str] = ()) -> DictConfig:
    """The run's own config (its config.yaml) with ``overrides`` applied: what ``resume=<dir>`` means.

    Overrides are Hydra override strings (``train.steps=2000``, ``allow_changes=[train.lr]``, ``train.lr=1e-4``,
    ``backbone=lit`` for a group); the identity check in :func:`build_run` refuses recipe changes not listed in
    ``allow_changes``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from diffusion.config import CONF_DIR, DatasetConfig, RunConfig, plain_error

    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume}: no such run directory; pass a directory written by "
                                f"diffusion.train (runs/<dataset>/latest is the newest)")
    path = Path(resume).resolve()
    run_dir = path if path.is_dir() else path.parent.parent
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"resume={resume}: {saved_path} not found; pass the directory of a run written by "
                                f"diffusion.train")
    saved = OmegaConf.load(saved_path)
    for k in ("eval", "sweep", "results_dir", "runs_root", "cache_dir"):  # a sweep point's extra sections
        saved.pop(k, None)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), saved)
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        for ov in parsed:
            key = ov.key_or_group.lstrip("+~")
            if key == "resume" or key.startswith("hydra"):
                continue
            value = ov.value()
            if key in ("backbone", "dataset") and isinstance(value, str):  # a config-group choice
                group = OmegaConf.load(CONF_DIR / key / f"{value}.yaml")
                group.pop("defaults", None)
                cfg[key] = OmegaConf.merge(OmegaConf.structured(DatasetConfig), group) if key == "dataset" else group
            else:
                OmegaConf.update(cfg, key, value, merge=True)
    except Exception as e:
        raise ConfigError(plain_error(e)) from None
    cfg.resume = str(run_dir)
    cfg.run_dir = str(run_dir)
    return cfg

