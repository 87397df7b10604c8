"""Diffusion-classifier accuracy: a class-conditional denoiser used as a zero-shot classifier.

Method of Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier" (ICCV 2023, arXiv 2303.16203),
written from the paper's description (Alg. 1); no code of its repository is used. An image x_0 is assigned the class

    c* = argmin_c  (1/K) sum_k  || eps_k - eps_theta(sqrt(abar_{t_k}) x_0 + sqrt(1 - abar_{t_k}) eps_k, t_k, c) ||^2

i.e. the uniformly weighted epsilon-MSE (the paper's final objective; its Table 5 finds the VLB weighting worse), a
Monte-Carlo estimate over K = ``trials`` draws (t_k, eps_k) of the class-conditional ELBO under a uniform prior.

* **Timesteps**: evenly spaced, the midpoints of K equal bins of [0, T) floored:
  ``t_k = floor((k + 1/2) * T / K)``, k = 0..K-1 (:func:`trial_timesteps`). With T = 1000 and K = 250 these are
  2, 6, ..., 998, the paper's DiT protocol (``t_interval 4``); K = T gives every step once.
* **Noise pairing**: the same (t_k, eps_k) for every candidate class of an image (paired differences: the class
  comparison sees no noise variance of its own), and, as in the paper's DiT evaluation (one saved noise tensor per
  timestep), the same eps_k for every image too. eps_1..eps_K are drawn once from a CPU ``torch.Generator`` seeded
  with ``seed``, so the result does not depend on the device, the batch size or an image's position in the set.
* **Model call**: the plain conditional prediction ``model(x_t, t, y)`` in eval mode without gradients, y in
  [0, num_classes): the CFG null class ``num_classes`` is never a candidate and no guidance is applied; only the
  first C output channels (epsilon) are scored, the learned-variance half of a ``learn_sigma`` model is ignored.
* **Cost**: exactly ``images x classes x trials`` network evaluations (batched over classes and trials, several
  images per batch when they fit), e.g. 1000 test images x 10 classes x 100 trials = 1e6 forwards.

Left out of the paper: the adaptive top-k pruning of Alg. 2 (used for Stable Diffusion's many prompts; with the 10
classes of the CPU datasets it would save little and makes the cost data-dependent) and the L1 / VLB scoring
variants. ``images`` must be in the space the model was trained on ([-1, 1] pixels or scaled VAE latents).

    result = diffusion_classifier_accuracy(model, {"noise_schedule": "linear", "diffusion_steps": 1000},
                                           test_x[idx], test_y[idx], trials=100, seed=0)
    result["accuracy"], result["predictions"]          # idx = fixed_subset(test_y, 500, seed=0)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from diffusion import create_diffusion
from diffusion.gaussian_diffusion import GaussianDiffusion


# ----------------------------------------------------------------------------------------------------------------
# Fixed evaluation subset
# ----------------------------------------------------------------------------------------------------------------
def fixed_subset(labels: Any, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted, int64) of a deterministic class-balanced subset of ``n`` of the given labels.

    Each class present in ``labels`` is shuffled by its own generator (seeded by ``seed`` and the class), then the
    classes are taken round-robin in class order (first pick of every class, then the second, ...) until ``n``
    indices are chosen: class counts differ by at most one (a class with fewer images gives all it has and the others
    fill in), the subset for ``n`` is contained in the subset for any larger ``n``, and it depends only on (labels,
    n, seed).
    """
    y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    n = int(n)
    if not 0 <= n <= len(y):
        raise ValueError(f"fixed_subset: cannot choose n={n} of {len(y)} labelled images")
    per_class = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).reshape(-1)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(c))
        per_class.append(members[torch.randperm(len(members), generator=gen)].tolist())
    picked: list[int] = []
    rank = 0
    while len(picked) < n:
        for members in per_class:
            if rank < len(members) and len(picked) < n:
                picked.append(members[rank])
        rank += 1
    return torch.tensor(sorted(picked), dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------------------------
def trial_timesteps(num_timesteps: int, trials: int) -> torch.Tensor:
    """Evenly spaced timesteps ``t_k = floor((k + 1/2) * T / K)``, k = 0..K-1 (int64; exact integer arithmetic)."""
    if int(trials) < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    k = torch.arange(int(trials), dtype=torch.long)
    return ((2 * k + 1) * int(num_timesteps)) // (2 * int(trials))


def trial_noise(shape: tuple[int, ...], trials: int, seed: int) -> torch.Tensor:
    """The K noise tensors eps_k, (K, *shape) float32, drawn on the CPU from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((int(trials), *shape), generator=gen, dtype=torch.float32)


def _as_diffusion(diffusion_cfg: Any) -> GaussianDiffusion:
    """A diffusion from a config section (mapping with ``noise_schedule``, ``diffusion_steps``; missing keys take the
    training defaults), None (the defaults) or a ready unspaced :class:`GaussianDiffusion`."""
    if isinstance(diffusion_cfg, GaussianDiffusion):
        timestep_map = getattr(diffusion_cfg, "timestep_map", None)
        if timestep_map is not None and list(timestep_map) != list(range(len(timestep_map))):
            raise ValueError("diffusion classifier: pass the trained (unspaced) diffusion, not a respaced one; "
                             "`trials` chooses the timesteps")
        return diffusion_cfg
    if diffusion_cfg is None:
        diffusion_cfg = {}
    if not isinstance(diffusion_cfg, Mapping):
        raise TypeError(f"diffusion_cfg must be a mapping (the diffusion config section), None or a "
                        f"GaussianDiffusion, got {type(diffusion_cfg).__name__}")
    schedule = diffusion_cfg.get("noise_schedule", "linear")
    if isinstance(schedule, enum.Enum):
        schedule = schedule.value
    steps = int(diffusion_cfg.get("diffusion_steps", 1000))
    # learn_sigma only changes the variance half of the output, which the classifier never reads
    return create_diffusion("", noise_schedule=str(schedule), diffusion_steps=steps)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Errors and accuracy
# ----------------------------------------------------------------------------------------------------------------
def diffusion_classifier_errors(model: nn.Module, diffusion_cfg: Any, images: Any, *, trials: int = 100,
                                seed: int = 0, batch_size: int = 256, device: torch.device | str | None = None,
                                progress: bool = False) -> dict[str, Any]:
    """Mean epsilon-MSE of every image under every class: ``errors`` (N, num_classes) float64 on the CPU, plus the
    ``timesteps`` (K,) used. See the module docstring for the trials; ``batch_size`` counts network inputs."""
    from tqdm.auto import tqdm

    x0 = torch.as_tensor(images)
    if x0.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x0.shape)}")
    x0 = x0.float()
    num_classes = int(model.num_classes)
    channels = int(model.in_channels)
    if x0.shape[1] != channels:
        raise ValueError(f"images have {x0.shape[1]} channels, the model takes {channels}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    diffusion = _as_diffusion(diffusion_cfg)
    timesteps = trial_timesteps(diffusion.num_timesteps, trials)
    k_trials = len(timesteps)
    device = torch.device(device) if device is not None else _device_of(model)
    noise = trial_noise(tuple(x0.shape[1:]), k_trials, seed).to(device)
    t_dev = timesteps.to(device)

    n_images = len(x0)
    per_image = k_trials * num_classes
    group = max(1, int(batch_size) // per_image)  # whole images per group; a group's (G, K, classes) errors in memory
    errors = torch.zeros((n_images, num_classes), dtype=torch.float64)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_images * per_image, desc="diffusion classifier", unit="eval", dynamic_ncols=True,
               disable=not progress)
    try:
        with torch.no_grad():
            for g0 in range(0, n_images, group):
                xg = x0[g0:g0 + group].to(device)
                g_err = torch.empty(len(xg) * per_image, dtype=torch.float32, device=device)
                for start in range(0, len(g_err), int(batch_size)):
                    idx = torch.arange(start, min(start + int(batch_size), len(g_err)), device=device)
                    n_idx = idx // per_image                     # flat order (image, trial, class), class fastest
                    k_idx = (idx // num_classes) % k_trials
                    y = idx % num_classes
                    t = t_dev[k_idx]
                    eps = noise[k_idx]
                    x_t = diffusion.q_sample(xg[n_idx], t, eps)
                    out = model(x_t, t, y)
                    if out.shape[0] != len(idx) or out.shape[1] not in (channels, 2 * channels) \
                            or out.shape[2:] != x_t.shape[2:]:
                        raise ValueError(f"model output {tuple(out.shape)} for input {tuple(x_t.shape)}: expected "
                                         f"{channels} (epsilon) or {2 * channels} (epsilon + variance) channels")
                    g_err[start:start + len(idx)] = (out[:, :channels].float() - eps).pow(2).flatten(1).mean(1)
                    bar.update(len(idx))
                errors[g0:g0 + len(xg)] = g_err.view(len(xg), k_trials, num_classes).double().mean(1).cpu()
    finally:
        bar.close()
        model.train(was_training)
    return {"errors": errors, "timesteps": timesteps}


def diffusion_classifier_accuracy(model: nn.Module, diffusion_cfg: Any, images: Any, labels: Any, *,
                                  trials: int = 100, seed: int = 0, batch_size: int = 256,
                                  device: torch.device | str | None = None, progress: bool = False
                                  ) -> dict[str, Any]:
    """Classify ``images`` (N, C, H, W; the model's input space) by the argmin over classes of the mean epsilon-MSE
    and score against ``labels`` (N,) in [0, model.num_classes).

    ``diffusion_cfg``: the run's diffusion section (``noise_schedule``, ``diffusion_steps``), None for the defaults,
    or an unspaced GaussianDiffusion. Returns a dict: ``accuracy`` (float), ``num_images``, ``trials``,
    ``num_classes``, ``per_class`` (list of num_classes accuracies, NaN for a class without images),
    ``predictions`` (N,) int64, ``errors`` (N, num_classes) float64 mean errors, ``timesteps`` (K,) int64,
    ``network_evals`` (= N x num_classes x trials) and ``seed``. Ties go to the lower class index.
    """
    y = torch.as_tensor(np.asarray(labels)).reshape(-1)
    n = len(torch.as_tensor(images))
    num_classes = int(model.num_classes)
    if y.dtype.is_floating_point or y.dtype == torch.bool or len(y) != n:
        raise ValueError(f"labels: expected {n} integer class labels, got {tuple(y.shape)} {y.dtype}")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the null class {num_classes} is not a class)")
    out = diffusion_classifier_errors(model, diffusion_cfg, images, trials=trials, seed=seed, batch_size=batch_size,
                                      device=device, progress=progress)
    errors = out["errors"]
    predictions = errors.argmin(1) if n else torch.zeros(0, dtype=torch.long)
    correct = predictions == y
    per_class = [float(correct[y == c].double().mean()) if bool((y == c).any()) else math.nan
                 for c in range(num_classes)]
    return {"accuracy": float(correct.double().mean()) if n else math.nan, "num_images": n,
            "trials": len(out["timesteps"]), "num_classes": num_classes, "per_class": per_class,
            "predictions": predictions, "errors": errors, "timesteps": out["timesteps"],
            "network_evals": n * num_classes * len(out["timesteps"]), "seed": int(seed)}
