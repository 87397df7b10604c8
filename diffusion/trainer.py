"""The one trainer every backbone goes through (EDM style: it knows nothing concrete about a network).

It builds a registered backbone from the config, trains it with the ADM diffusion loss (mse + vb with learned
sigma), plus two general hooks: the backbone's ``auxiliary_loss`` (e.g. DiMR's multi-scale loss) and hybrid
distillation from a frozen teacher of any backbone. A run directory holds:

    config.yaml      resolved config
    log.csv          step, loss, mse, vb, aux, distill, grad_norm, img_per_s, elapsed_s
    checkpoints/last.pt   {model, ema, opt, step, rng, config}, written atomically every ``ckpt_every`` steps
    samples.png / samples.npz   class-conditional samples of the EMA model at the end
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import backbones
from backbones.layers import drop_labels, external_label_dropout
from diffusion import create_diffusion
from diffusion.data import ImageDataset, load_dataset
from runio.files import atomic_torch_save, atomic_write_text, load_file, read_state_dict

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "mse", "vb", "aux", "distill", "grad_norm", "img_per_s", "elapsed_s"]


class DivergenceError(RuntimeError):
    """The loss became non-finite; the last good checkpoint is left intact."""


# ----------------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """One of our checkpoints {model, ema, opt, step, rng, config} (a .pt file or a run directory), weights only."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "step" not in ckpt or "config" not in ckpt:
        raise RuntimeError(f"{path} is not a checkpoint written by diffusion.train (no step/config); official "
                           f"weights load with backbones.dit.load_official_checkpoint or init_from=")
    return ckpt


def backbone_kwargs(backbone_cfg: DictConfig | dict, dataset: ImageDataset | None = None,
                    class_dropout_prob: float | None = None, learn_sigma: bool | None = None) -> dict:
    """Constructor keywords of the backbone from its config group (``name`` removed, nulls dropped)."""
    cfg = OmegaConf.to_container(backbone_cfg, resolve=True) if isinstance(backbone_cfg, DictConfig) else dict(
        backbone_cfg)
    # init_from is a training-time action (the trainer's init_from=), not part of the architecture to rebuild
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "init_from") and v is not None}
    if dataset is not None:
        kwargs.update(input_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes)
    if class_dropout_prob is not None:
        kwargs["class_dropout_prob"] = class_dropout_prob
    if learn_sigma is not None:
        kwargs["learn_sigma"] = learn_sigma
    return kwargs


def build_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Rebuild the backbone recorded in a checkpoint's config and load its (EMA) weights."""
    cfg = ckpt["config"]
    model = backbones.build(cfg["backbone_name"], **cfg["backbone_kwargs"])
    model.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"])
    return model


def inherit_weights(model: nn.Module, source: str | os.PathLike) -> dict:
    """Weight inheritance behind ``init_from=``: the backbone's own ``inherit_weights`` when it defines one (LiT:
    every DiT tensor except attention, strictly), else every tensor of the checkpoint whose name and shape match.
    Returns a report {"loaded": [...], "fresh": [...], ...}.
    """
    if hasattr(model, "inherit_weights"):
        return model.inherit_weights(source)
    state, _, _ = read_state_dict(source)
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(take, strict=False)
    return {"loaded": sorted(take), "fresh": sorted(set(own) - set(take)), "ignored": sorted(set(state) - set(take))}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = OrderedDict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Constant decay (DiT), or with warm-up min(decay, (1 + n) / (10 + n)) for short runs."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; parameters the backbone lists in ``no_weight_decay()`` (and 1-D tensors) get no decay."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto_step]


def train(cfg: DictConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train one backbone as configured (see conf/train.yaml). Returns a summary dict.

    ``on_step(step, metrics)`` is called after every optimisation step (progress hooks, tests).
    """
    from diffusion.sampling import class_grid_labels, sample_images, save_grid, save_npz

    t_start = time.time()
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    tc = cfg.train

    resume_ckpt = None
    if cfg.get("resume"):
        resume_ckpt = load_checkpoint(cfg.resume)
        run_dir = Path(cfg.resume)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent.parent
    else:
        run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    dataset = load_dataset(cfg.dataset.name, "train", cfg.dataset.get("image_size"), cfg.dataset.get("root"))
    kwargs = backbone_kwargs(cfg.backbone, dataset, tc.class_dropout_prob, cfg.diffusion.learn_sigma)
    model = backbones.build(cfg.backbone.name, **kwargs)
    init_from = cfg.get("init_from") or cfg.backbone.get("init_from")
    if init_from and resume_ckpt is None:
        report = inherit_weights(model, init_from)
        log.info("init_from %s: loaded %d tensors, kept %d fresh: %s", init_from, len(report["loaded"]),
                 len(report["fresh"]), report["fresh"][:12])
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    diffusion = create_diffusion("", noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=cfg.diffusion.learn_sigma,
                                 diffusion_steps=cfg.diffusion.diffusion_steps)

    teacher, distill_cfg = None, cfg.get("distill")
    if distill_cfg is not None and distill_cfg.get("teacher"):
        from diffusion.distill import hybrid_distillation_loss, load_teacher

        teacher = load_teacher(distill_cfg.teacher).to(device)

    config_record = {"backbone_name": cfg.backbone.name, "backbone_kwargs": kwargs,
                     "train": OmegaConf.to_container(cfg, resolve=True)}
    step = 0
    if resume_ckpt is not None:
        if resume_ckpt["config"]["backbone_kwargs"] != kwargs or \
                resume_ckpt["config"]["backbone_name"] != cfg.backbone.name:
            raise ValueError(f"resume: the checkpoint in {run_dir} was trained with backbone "
                             f"{resume_ckpt['config']['backbone_name']} {resume_ckpt['config']['backbone_kwargs']}, "
                             f"not {cfg.backbone.name} {kwargs}; resume with the run's own config")
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        opt.load_state_dict(resume_ckpt["opt"])
        step = int(resume_ckpt["step"])
        _set_rng_state(resume_ckpt["rng"])
        log.info("resumed %s at step %d", run_dir, step)
    else:
        ema.load_state_dict(model.state_dict())

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log_path = run_dir / "log.csv"
    # Drop rows logged after the checkpoint we resume from, so the log never holds a step twice.
    previous = _read_log(log_path, step)
    atomic_write_text(log_path, ",".join(LOG_COLUMNS) + "\n" +
                      "".join(",".join(str(r[c]) for c in LOG_COLUMNS) + "\n" for r in previous))

    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s %s: %.3fM params, dataset %s %s, device %s", cfg.backbone.name, model.arch, n_params / 1e6,
             dataset.name, tuple(dataset.images.shape[1:]), device)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and tc.precision in ("auto", "bf16"))

    def save(at_step: int) -> None:
        atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                           "step": at_step, "rng": _rng_state(), "config": config_record},
                          run_dir / "checkpoints" / "last.pt")

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=step, desc=f"train {cfg.backbone.name}", dynamic_ncols=True,
               disable=not cfg.get("progress", True))
    model.train()
    losses: list[float] = [float(r["loss"]) for r in previous]
    window_start, window_images = time.time(), 0
    img_per_s = float("nan")
    throughputs: list[float] = []
    with open(log_path, "a", newline="") as log_file:
        writer = csv.writer(log_file)
        while step < tc.steps:
            x, y = dataset.batch(step, tc.batch_size, cfg.seed)
            x, y = x.to(device), y.to(device)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            noise = torch.randn_like(x)
            label_ctx = contextlib.nullcontext()
            if teacher is not None:  # drop labels once here so the teacher sees exactly the student's labels
                y = drop_labels(y, tc.class_dropout_prob, model.num_classes)
                label_ctx = external_label_dropout()
            with autocast, label_ctx:
                terms = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
                loss = terms["loss"]
                aux = model.auxiliary_loss(noise)
                if aux is not None:
                    loss = loss + aux
                distill = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_out = teacher(terms["x_t"], t, y)
                    distill = hybrid_distillation_loss(terms["model_output"], teacher_out, model.in_channels,
                                                       distill_cfg.lambda_eps, distill_cfg.lambda_var)
                    loss = loss + distill
                loss = loss.mean()
            if not torch.isfinite(loss):
                bar.close()
                raise DivergenceError(f"non-finite loss {loss.item()} at step {step + 1} of {cfg.backbone.name}; "
                                      f"the last good checkpoint in {run_dir / 'checkpoints'} is intact; lower "
                                      f"train.lr or set train.grad_clip")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                bar.close()
                raise DivergenceError(f"non-finite gradient norm at step {step + 1} of {cfg.backbone.name}; the "
                                      f"last good checkpoint in {run_dir / 'checkpoints'} is intact")
            opt.step()
            update_ema(ema, model, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
            step += 1
            window_images += x.shape[0]
            zero = loss.new_zeros(())
            values = torch.stack([loss.detach(), terms["mse"].detach().mean(), terms["vb"].detach().mean(),
                                  aux.detach().mean() if aux is not None else zero,
                                  distill.detach().mean() if distill is not None else zero]).tolist()  # one sync
            metrics = dict(zip(("loss", "mse", "vb", "aux", "distill"), values), grad_norm=grad_norm)
            losses.append(metrics["loss"])
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.time()
                img_per_s = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                throughputs.append(img_per_s)
                log_file.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{img_per_s:.0f}")
            writer.writerow([step] + [f"{metrics[c]:.6g}" for c in LOG_COLUMNS[1:7]] +
                            [f"{img_per_s:.2f}", f"{time.time() - t_start:.1f}"])
            bar.update(1)
            if step % tc.ckpt_every == 0 or step == tc.steps:
                log_file.flush()
                save(step)
            if on_step is not None:
                on_step(step, metrics)
    bar.close()
    if not (run_dir / "checkpoints" / "last.pt").exists():  # e.g. train.steps=0: keep the (inherited) init
        save(step)

    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": step, "params": n_params,
                               "final_loss": losses[-1] if losses else float("nan"),
                               "train_img_per_s": _median_throughput(throughputs),
                               "wall_time_s": time.time() - t_start}
    sc = cfg.get("sample")
    if sc is not None and sc.get("per_class", 0) > 0:
        labels = class_grid_labels(dataset.num_classes, sc.per_class)
        sampled = ema if sc.use_ema else model
        images = sample_images(sampled, labels, sampler=sc.sampler, steps=sc.steps, cfg_scale=sc.cfg_scale,
                               seed=sc.seed, noise_schedule=cfg.diffusion.noise_schedule,
                               diffusion_steps=cfg.diffusion.diffusion_steps, device=device,
                               progress=cfg.get("progress", True), clip_denoised=sc.get("clip_denoised", True))
        save_grid(images, run_dir / "samples.png", ncol=min(dataset.num_classes, 10), upscale=sc.get("upscale", 1))
        save_npz(images, labels, run_dir / "samples.npz")
        summary["samples"] = str(run_dir / "samples.png")
    return summary


def _median_throughput(values: list[float]) -> float:
    """Median img/s over the logging windows of this session, the first (warm-up) window skipped."""
    values = sorted(values[1:] if len(values) > 2 else values)
    return values[len(values) // 2] if values else float("nan")
