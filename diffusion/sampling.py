"""Drawing class-conditional samples from any backbone with the shared samplers, and saving them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from runio.dist import World, gather_to_main
from runio.files import atomic_write

SAMPLERS = ("ddpm", "ddim")


def to_uint8(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """(N, C, H, W) floats in [-1, 1] (clamped) or uint8 -> uint8 on the CPU; the one conversion in the project.

    DiT's sample.py rounding: ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8, i.e. round-half-up of
    127.5 (x + 1). uint8 input is returned as is; other integer, bool or complex dtypes and non-4D shapes are errors.
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no images")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected uint8 or floating images, got {x.dtype}")
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)


@torch.no_grad()
def sample_images(model: nn.Module, labels: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
                  cfg_scale: float = 1.0, seed: int = 0, learn_sigma: bool | None = None,
                  noise_schedule: str = "linear", diffusion_steps: int = 1000, batch_size: int = 256,
                  device: torch.device | str | None = None, progress: bool = False,
                  guided_channels: int | None = None, clip_denoised: bool = True,
                  world: World | None = None) -> torch.Tensor | None:
    """Class-conditional samples in [-1, 1], shape (len(labels), C, H, W).

    CFG (scale > 1) runs the model on a doubled batch with the null class ``num_classes`` (DiT's
    ``forward_with_cfg``). Deterministic: chunk i of ``batch_size`` labels draws its noise from its own generator
    seeded by (seed, i), so under torchrun (``world``) rank r samples chunks r, r + W, ... and the set gathered on
    rank 0 (None on the other ranks) is the same as a single process draws, whatever the world size.
    ``clip_denoised`` clips the predicted x0 to [-1, 1] at every step: right for pixel-space data in [-1, 1] (ADM's
    default; without it DDIM can diverge for weak models), wrong for unbounded VAE latents (DiT passes False).
    """
    from diffusion import create_diffusion

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    learn_sigma = model.learn_sigma if learn_sigma is None else learn_sigma
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    diffusion = create_diffusion(respacing, noise_schedule=noise_schedule, learn_sigma=learn_sigma,
                                 diffusion_steps=diffusion_steps)
    was_training = model.training
    model.eval()
    world = world or World()
    shape = (model.in_channels, model.input_size, model.input_size)
    out = []
    starts = list(range(0, len(labels), batch_size))
    try:
        for chunk in range(world.rank, len(starts), world.size):
            start = starts[chunk]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            y = labels[start:start + batch_size].to(device)
            n = len(y)
            z = torch.randn((n, *shape), generator=generator).to(device)
            sample_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            if cfg_scale > 1.0:
                z = torch.cat([z, z], 0)
                y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
                fn = model.forward_with_cfg
                kwargs = dict(y=y, cfg_scale=cfg_scale, guided_channels=guided_channels)
            else:
                fn, kwargs = model.forward, dict(y=y)
            loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
            x = loop(fn, z.shape, noise=z, clip_denoised=clip_denoised, model_kwargs=kwargs, device=device,
                     progress=progress, generator=sample_gen)
            out.append(x[:n].float().cpu())
    finally:
        model.train(was_training)
    shape_empty = torch.empty((0, *shape))
    mine = [(chunk, x) for chunk, x in zip(range(world.rank, len(starts), world.size), out)]
    if not world.distributed:
        return torch.cat([x for _, x in mine] or [shape_empty], 0)
    gathered = gather_to_main(torch.cat([x for _, x in mine] or [shape_empty], 0), world)
    if gathered is None:
        return None
    # rank r's part holds chunks r, r + W, ...: put every chunk back in its place
    sizes = [min(batch_size, len(labels) - s) for s in starts]
    owners = [list(range(r, len(starts), world.size)) for r in range(world.size)]
    pieces, offset = {}, 0
    for r in range(world.size):
        for chunk in owners[r]:
            pieces[chunk] = gathered[offset:offset + sizes[chunk]]
            offset += sizes[chunk]
    return torch.cat([pieces[c] for c in range(len(starts))], 0)


def class_grid_labels(num_classes: int, per_class: int, max_classes: int = 10) -> torch.Tensor:
    """Labels for a grid with one column per class (at most ``max_classes``) and ``per_class`` rows."""
    classes = torch.arange(min(num_classes, max_classes))
    return classes.repeat(per_class)


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int, upscale: int = 1,
              class_names: list[str] | None = None) -> Path:
    """Save a PNG grid of (N, C, H, W) images in [-1, 1] (C = 1 grayscale or 3 RGB), ``ncol`` per row, 2 px white
    gaps, written atomically. Tiles are upscaled (nearest) by max(``upscale``, ceil(64 / size)) so each is at least
    64 px. ``class_names``: a header row naming the class of each column (names cut to the tile width)."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    min_tile = 64  # px: smaller samples are upscaled (nearest) to at least this size
    x = to_uint8(torch.as_tensor(images).detach().cpu()).numpy()
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid: expected 1 (grayscale) or 3 (RGB) channels, got {c}")
    factor = max(int(upscale), math.ceil(min_tile / min(h, w)))
    x = x.repeat(factor, axis=2).repeat(factor, axis=3).transpose(0, 2, 3, 1)  # (N, H', W', C)
    th, tw, pad = h * factor, w * factor, 2
    cols = max(1, min(ncol, n))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default() if class_names else None
    header = font.getbbox("Ag")[3] + 2 * pad + 2 if font is not None else 0
    canvas = np.full((header + rows * (th + pad) + pad, cols * (tw + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        top, left = header + pad + (i // cols) * (th + pad), pad + (i % cols) * (tw + pad)
        canvas[top:top + th, left:left + tw] = x[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # mode L (grayscale) or RGB
    if font is not None:
        draw = ImageDraw.Draw(img)
        for j, name in enumerate(list(class_names)[:cols]):
            name = str(name)
            while len(name) > 1 and draw.textlength(name, font=font) > tw - 2:  # cut to the tile width
                name = name[:-1]
            left = pad + j * (tw + pad) + (tw - draw.textlength(name, font=font)) / 2
            draw.text((left, pad), name, fill=0 if c == 1 else (0, 0, 0), font=font)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_npz(images: torch.Tensor, labels: torch.Tensor, path: str | os.PathLike) -> Path:
    """ADM-evaluator layout: ``arr_0`` uint8 (N, H, W, C) plus ``labels``; written atomically."""
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    return atomic_write(path, lambda f: np.savez(f, arr_0=arr, labels=labels.numpy()))
