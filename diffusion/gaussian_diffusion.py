"""Gaussian diffusion with the conventions of ADM / IDDPM as used by DiT, fast-DiT, DiCo and the other backbones.

- Schedule constants are float64 numpy arrays; they are gathered per timestep and cast to the dtype of the tensor
  they multiply (float32 normally), so float64 inputs get exact float64 arithmetic.
- ``model`` is any callable ``model(x, t, **model_kwargs) -> (B, C or 2C, ...)``; with a learned variance the
  second half of the channels is the variance output ``v`` (LEARNED_RANGE: interpolation weight in [-1, 1]).
- Timesteps passed to the model are the ORIGINAL timesteps in [0, T) (no rescaling); ``SpacedDiffusion`` maps
  its spaced indices back through ``timestep_map``.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

ModelFn = Callable[..., torch.Tensor]


class ModelMeanType(enum.Enum):
    """What the mean half of the model output predicts."""

    EPSILON = enum.auto()  # the noise added to x_0 (DiT default)
    START_X = enum.auto()  # x_0 itself


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    FIXED_SMALL = enum.auto()    # posterior variance beta~_t (log clipped at t=0)
    FIXED_LARGE = enum.auto()    # beta_t, with beta~_1 at t=0 for a finite decoder likelihood
    LEARNED = enum.auto()        # model outputs the log variance directly
    LEARNED_RANGE = enum.auto()  # IDDPM: log var = frac*log beta_t + (1-frac)*log beta~_t, frac = (v+1)/2


class LossType(enum.Enum):
    MSE = enum.auto()           # eps/x0 MSE (+ VB in bits when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term scaled by num_timesteps/1000 (IDDPM's rescale_learned_sigmas)
    KL = enum.auto()            # variational bound only
    RESCALED_KL = enum.auto()   # VB * num_timesteps (an estimate of the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ------------------------------------------------------------------------------------------------------------------
# Beta schedules
# ------------------------------------------------------------------------------------------------------------------
def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretize alpha_bar(s), s in [0, 1]: beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)."""
    n = num_diffusion_timesteps
    return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                    dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """'linear' (DDPM, scaled so any T matches the 1000-step endpoints 1e-4..0.02), 'cosine' (IDDPM) or
    'scaled_linear' (Stable Diffusion's schedule, used by U-ViT and the official DiMR: sqrt(beta_t) linear from
    sqrt(0.00085) to sqrt(0.012) over the T steps, not rescaled with T).

    'squaredcos_cap_v2' (the name DiT's code uses for the cosine schedule) is accepted as an alias of 'cosine'.
    """
    if int(num_diffusion_timesteps) != num_diffusion_timesteps or num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}")
    n = int(num_diffusion_timesteps)
    if schedule_name == "linear":
        scale = 1000 / n
        return np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)
    if schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(n, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if schedule_name == "scaled_linear":  # sqrt(beta) linear over the T steps, as diffusers / U-ViT / DiMR define it
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=np.float64) ** 2
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; use 'linear', 'cosine' or 'scaled_linear'")


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise; a generator on another device type draws there and is moved (reproducible on CPU)."""
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _broadcast_mask(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 where t != 0 else 0 (no noise on the last reverse step), shaped (B, 1, ..., 1)."""
    return (t != 0).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _model_device(model: Any) -> torch.device:
    """Device of a module, or of the module a bound method (e.g. ``forward_with_cfg``) belongs to; else CPU."""
    owner = getattr(model, "__self__", model)
    params = getattr(owner, "parameters", None)
    if callable(params):
        try:
            return next(params()).device
        except (StopIteration, TypeError):
            pass
    return torch.device("cpu")


class GaussianDiffusion:
    """Forward process, posterior, reverse process (DDPM / DDIM sampling) and training losses.

    Args:
        betas: 1-D float64 array of per-step betas in (0, 1].
        model_mean_type, model_var_type, loss_type: see the enums above.
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.log_betas = np.log(betas)
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0); the variance is 0 at t=0, so its log is clipped to the t=1 value.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # FIXED_LARGE: beta_t, but beta~_1 at t=0 so the decoder likelihood stays finite (as in IDDPM).
        self.fixed_large_variance = np.append(pv1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._torch_consts: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- internals
    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather constant ``name`` at timesteps t, cast to like.dtype, shaped (B, 1, ..., 1) for broadcasting.

        The float64 table is cached per device (the constant arrays are treated as immutable after __init__).
        """
        key = (name, t.device)
        table = self._torch_consts.get(key)
        if table is None:
            dtype = torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64
            table = torch.as_tensor(getattr(self, name), dtype=dtype, device=t.device)
            self._torch_consts[key] = table
        return table[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps the model is conditioned on (identity here; SpacedDiffusion maps to original steps)."""
        return t

    def _run_model(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor,
                   model_kwargs: dict[str, Any] | None) -> torch.Tensor:
        return model(x, self._model_timesteps(t), **(model_kwargs or {}))

    @property
    def learns_sigma(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance part or None), checking the channel count against the variance setting."""
        c = x.shape[1]
        want = 2 * c if self.learns_sigma else c
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] != want \
                or model_output.shape[2:] != x.shape[2:]:
            fix = ("build the backbone with learn_sigma=True or use create_diffusion(learn_sigma=False)"
                   if self.learns_sigma else
                   "build the backbone with learn_sigma=False or use create_diffusion(learn_sigma=True)")
            raise ValueError(f"model output has shape {tuple(model_output.shape)} but input {tuple(x.shape)} with "
                             f"model_var_type={self.model_var_type.name} needs {want} channels; {fix}")
        if self.learns_sigma:
            mean_part, var_part = torch.split(model_output, c, dim=1)
            return mean_part, var_part
        return model_output, None

    # ---------------------------------------------------------------------------------------- forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
                                 ) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # ---------------------------------------------------------------------------------------- reverse process
    def p_mean_variance(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and the implied x_0 prediction.

        Returns a dict with "mean", "variance", "log_variance", "pred_xstart" (all shaped like x) and
        "model_output" (the raw model output).
        """
        model_output = self._run_model(model, x, t, model_kwargs)
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        out["model_output"] = model_output
        return out

    def _p_mean_variance_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                     clip_denoised: bool = False,
                                     denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                                     ) -> dict[str, torch.Tensor]:
        mean_out, var_out = self._split_output(model_output, x)

        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_out
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_out + 1) / 2  # nominally in [0, 1]; deliberately not clamped (as in IDDPM/ADM)
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            log_variance = self._extract("fixed_large_log_variance", t, x).expand_as(x)
        else:
            log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)
        variance = torch.exp(log_variance)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x, t, mean_out)
        else:
            pred_xstart = mean_out
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                 denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 model_kwargs: dict[str, Any] | None = None,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x.shape, generator, x.device, x.dtype)
        sample = out["mean"] + _broadcast_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step: Callable[..., dict[str, torch.Tensor]], model: ModelFn, shape: Sequence[int],
              noise: torch.Tensor | None, device: torch.device | str | None, progress: bool,
              generator: torch.Generator | None, **step_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        shape = tuple(int(s) for s in shape)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match requested shape {shape}")
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        device = torch.device(device)
        img = noise.to(device) if noise is not None else _randn(shape, generator, device)
        indices: Any = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None, *,
                                  clip_denoised: bool = False,
                                  denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                  model_kwargs: dict[str, Any] | None = None,
                                  device: torch.device | str | None = None, progress: bool = False,
                                  generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"sample", "pred_xstart"} after each DDPM step, from index T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, generator,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def p_sample_loop(self, model: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None, *,
                      clip_denoised: bool = False, denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                      progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling from pure noise (or ``noise``); returns the final x_0 sample."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised=clip_denoised,
                                                    denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                                    device=device, progress=progress, generator=generator):
            pass
        return final["sample"]

    # ---------------------------------------------------------------------------------------------------- DDIM
    def ddim_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    model_kwargs: dict[str, Any] | None = None, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. eq. 12); eta=0 is deterministic, eta=1 matches DDPM's posterior variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        noise = _randn(x.shape, generator, x.device, x.dtype)
        sample = mean_pred + _broadcast_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                            denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            model_kwargs: dict[str, Any] | None = None, eta: float = 0.0
                            ) -> dict[str, torch.Tensor]:
        """Deterministic DDIM inversion step x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is only defined for eta=0 (deterministic inversion)")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(self, model: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None,
                                     *, clip_denoised: bool = False,
                                     denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                     model_kwargs: dict[str, Any] | None = None,
                                     device: torch.device | str | None = None, progress: bool = False,
                                     eta: float = 0.0, generator: torch.Generator | None = None
                                     ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"sample", "pred_xstart"} after each DDIM step, from index T-1 down to 0."""
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, generator,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                              eta=eta)

    def ddim_sample_loop(self, model: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None, *,
                         clip_denoised: bool = False, denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                         progress: bool = False, eta: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM sampling (use a "ddimN" respacing for N steps); returns the final x_0 sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised=clip_denoised,
                                                       denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                                       device=device, progress=progress, eta=eta,
                                                       generator=generator):
            pass
        return final["sample"]

    # -------------------------------------------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Per-sample VB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample training losses for timesteps t (indices into this diffusion's steps).

        Returns a dict of (B,) tensors "loss", "mse", "vb" plus two extra keys:
        - "model_output": the raw model output on x_t (B, C or 2C, ...), with gradient (e.g. for distillation);
        - "x_t": the noised input the model saw.
        MSE losses: loss = mse + vb, where vb (bits/dim, decoder NLL at t=0) is computed with the predicted
        mean detached, so it trains only the variance half; vb = 0 when the variance is fixed.
        KL losses: loss = vb (times num_timesteps for RESCALED_KL) with gradient to the whole output; "mse" is
        then reported detached, for logging only.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._run_model(model, x_t, t, model_kwargs)
        mean_out, var_out = self._split_output(model_output, x_t)

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model_output, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
        elif var_out is not None:
            # Stop-gradient on the mean: the VB only trains the variance (IDDPM's hybrid objective).
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)  # the hybrid loss was tuned with 1000 steps
        else:
            vb = None

        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        mse = mean_flat((target - mean_out) ** 2)
        if self.loss_type.is_vb():
            loss, mse = vb, mse.detach()
        else:
            if vb is None:
                vb = torch.zeros_like(mse)
            loss = mse + vb
        return {"loss": loss, "mse": mse, "vb": vb, "model_output": model_output, "x_t": x_t}
