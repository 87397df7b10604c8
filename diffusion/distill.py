"""Hybrid knowledge distillation (LiT guideline 5), usable with any student and any registered teacher backbone.

A frozen teacher sees the same noisy input x_t, timestep and label as the student; the student's own loss
(mse + vb) gets

    lambda_eps * mean_flat((eps_T - eps_S)^2)  +  lambda_var * mean_flat((Sigma_T - Sigma_S)^2)

with eps the first ``in_channels`` output channels and Sigma the learned-variance half. As in lit.md ("Sigma =
variance head, DiT's second output half"), Sigma is the raw network output v of the learned-range
parametrisation (log var = (v+1)/2 log beta_t + (1-(v+1)/2) log beta~_t), not the variance it implies; both
live on the same scale for teacher and student at the same t, so matching v matches the variance. Pass
``var_transform`` (e.g. v -> log variance from the diffusion object) to compare another quantity instead.
Defaults lambda_eps = 0.5, lambda_var = 0.05: the best C2I ablation in the paper (LiT-S/2, DiT-XL/2 teacher).

Labels: the trainer drops labels for classifier-free guidance once per batch (``backbones.layers.drop_labels``)
before calling the student, and feeds the same dropped labels to the teacher; no backbone drops labels itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

import backbones
from runio.files import read_state_dict

log = logging.getLogger(__name__)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def hybrid_distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor | None, in_channels: int,
                             lambda_eps: float = 0.5, lambda_var: float = 0.05,
                             var_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample (B,) distillation loss between student and teacher outputs of shape (B, C_out, H, W).

    ``teacher_out`` None or both lambdas 0 gives zeros (the student's loss is unchanged). The variance term needs
    learned-sigma outputs (C_out = 2 * in_channels) from both models; it is skipped when lambda_var is 0.
    The teacher output is detached. Computed in float32.
    """
    B = student_out.shape[0]
    zeros = student_out.new_zeros(B, dtype=torch.float32)
    if teacher_out is None or (lambda_eps == 0 and lambda_var == 0):
        return zeros
    if teacher_out.shape[0] != B or teacher_out.shape[2:] != student_out.shape[2:]:
        raise ValueError(f"teacher output {tuple(teacher_out.shape)} and student output {tuple(student_out.shape)} "
                         f"differ in batch or latent size; the teacher must share the student's latent shape")
    for who, out in (("student", student_out), ("teacher", teacher_out)):
        if out.shape[1] < in_channels:
            raise ValueError(f"{who} output has {out.shape[1]} channels, fewer than in_channels={in_channels}")
    s = student_out.float()
    t = teacher_out.detach().float()
    loss = zeros
    if lambda_eps:
        loss = loss + lambda_eps * _mean_flat((t[:, :in_channels] - s[:, :in_channels]) ** 2)
    if lambda_var:
        for who, out in (("student", student_out), ("teacher", teacher_out)):
            if out.shape[1] != 2 * in_channels:
                raise ValueError(f"the variance term needs a learned-sigma {who} ({2 * in_channels} output "
                                 f"channels), got {out.shape[1]}; build it with learn_sigma=True or set lambda_var=0")
        sig_s, sig_t = s[:, in_channels:], t[:, in_channels:]
        if var_transform is not None:
            sig_s, sig_t = var_transform(sig_s), var_transform(sig_t)
        loss = loss + lambda_var * _mean_flat((sig_t - sig_s) ** 2)
    return loss


def _backbone_from_config(config: Mapping) -> tuple[str | None, dict]:
    """Name and kwargs from a checkpoint's config: the trainer's ``{"backbone_name", "backbone_kwargs"}``, or
    ``config["backbone"]`` as a name (kwargs in ``config["backbone_kwargs"]``) or as a dict
    ``{"name": ..., "kwargs": {...}}`` / ``{"name": ..., **kwargs}``."""
    if not isinstance(config, Mapping):
        return None, {}
    spec = config.get("backbone_name", config.get("backbone"))
    if isinstance(spec, str):
        return spec, dict(config.get("backbone_kwargs") or {})
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = spec.pop("name", None)
        kwargs = dict(spec.pop("kwargs", None) or {})
        kwargs.update(spec)
        return name, kwargs
    return None, {}


def official_dit_kwargs(state: Mapping[str, torch.Tensor]) -> dict | None:
    """DiT constructor keywords read off a bare state_dict in the official DiT layout (``DiT-XL-2-256x256.pt``):
    patch size, input size, channels, classes and learn_sigma from the tensor shapes, the size preset from (depth,
    width), which also fixes the head count (not visible in any shape). None when the keys are not DiT's or no DiT
    preset has that depth and width (then the caller must name the backbone and its keywords)."""
    from backbones.dit import DIT_PRESETS

    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in state for k in needed):
        return None
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = next((s for s, p in DIT_PRESETS.items() if (p["depth"], p["hidden_size"]) == (depth, hidden)), None)
    tokens = state["pos_embed"].shape[1]
    grid = round(tokens ** 0.5)
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if size is None or grid * grid != tokens or out_channels not in (in_channels, 2 * in_channels):
        return None
    kwargs = dict(size=size, patch_size=int(patch), input_size=int(grid * patch), in_channels=int(in_channels),
                  # the official embedding table has the CFG null row: num_classes + 1 rows (class dropout 0.1)
                  num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1, class_dropout_prob=0.1,
                  learn_sigma=out_channels == 2 * in_channels)
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    return kwargs


def load_teacher(path: str | os.PathLike, build_kwargs: Mapping | None = None, backbone: str | None = None,
                 prefer_ema: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen teacher in eval mode from a checkpoint.

    ``path``: our trainer's checkpoint ``{"model", "ema", "config", ...}`` (EMA weights preferred; the backbone
    name and constructor kwargs come from the config, see :func:`_backbone_from_config`), a run directory (its
    ``checkpoints/last.pt``) or a bare state_dict. A bare state_dict in the official DiT layout such as
    ``DiT-XL-2-256x256.pt`` is recognised (:func:`official_dit_kwargs`), so ``distill.teacher=`` takes the released
    file as it is; any other bare state_dict needs ``backbone`` and ``build_kwargs``. Explicit ``backbone`` /
    ``build_kwargs`` override the checkpoint's.
    Loaded with ``weights_only=True`` and strictly.
    """
    state, name, config = read_state_dict(path, prefer_ema, what="teacher checkpoint")
    cfg_name, cfg_kwargs = _backbone_from_config(config)
    if backbone is None and cfg_name is None:  # a bare state_dict: the official DiT release layout?
        official = official_dit_kwargs(state)
        if official is not None:
            cfg_name, cfg_kwargs = "dit", official
            log.info("teacher %s: a bare DiT state_dict, read as %s", name, official)
    bb_name = backbone or cfg_name
    if bb_name is None:
        raise ValueError(f"{name} does not say which backbone it holds (no config['backbone_name'], and not a DiT "
                         f"state_dict whose depth and width match a DiT preset); pass backbone=<name> (one of "
                         f"{', '.join(backbones.available())}) and build_kwargs")
    kwargs = {**cfg_kwargs, **dict(build_kwargs or {})}
    kwargs.pop("init_from", None)  # the teacher is fully loaded below; never re-initialise from another file
    model = backbones.build(bb_name, **kwargs)
    hint = "pass the build_kwargs the teacher was trained with"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"teacher checkpoint {name} does not fit backbone {bb_name!r} built with {kwargs}: "
                         f"{err}; {hint}") from None
    if missing or unexpected:
        raise ValueError(f"teacher checkpoint {name} does not match backbone {bb_name!r} built with {kwargs}: "
                         f"missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}; {hint}")
    model.requires_grad_(False).eval().to(device)
    log.info("teacher %s (%s, %d params) loaded from %s", bb_name, getattr(model, "arch", {}),
             sum(p.numel() for p in model.parameters()), name)
    return model


@torch.no_grad()
def teacher_output(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's output on the student's noisy input (no graph, eval mode kept)."""
    if teacher.training:
        raise RuntimeError("the teacher is in training mode (it would drop labels itself); use load_teacher or "
                           "call teacher.eval()")
    return teacher(x_t, t, y)
