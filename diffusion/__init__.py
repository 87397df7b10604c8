"""ADM-style Gaussian diffusion shared by every backbone (DiT / IDDPM conventions).

``create_diffusion`` has the signature DiT, fast-DiT and DiCo users know; it always returns a ``SpacedDiffusion``
(respacing "" = all steps, so training uses the plain 1000-step process).
"""

from __future__ import annotations

from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_named_beta_schedule,
)
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "get_named_beta_schedule",
    "betas_for_alpha_bar", "ModelMeanType", "ModelVarType", "LossType", "normal_kl",
    "discretized_gaussian_log_likelihood", "mean_flat",
]


def create_diffusion(timestep_respacing: str | int | None = "", noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
    """Build the diffusion; defaults are DiT's (linear 1e-4..0.02, 1000 steps, eps prediction, learned-range
    variance, loss = MSE + VB).

    Args:
        timestep_respacing: "" (all steps), "250" / 250, "10,20,30" (per-section counts) or "ddim50".
        noise_schedule: "linear", "cosine" or "scaled_linear" (see get_named_beta_schedule).
        use_kl: train on the (rescaled) variational bound instead of the hybrid MSE loss.
        sigma_small: with a fixed variance, use the posterior variance instead of beta_t.
        predict_xstart: the model predicts x_0 instead of the noise.
        learn_sigma: the model outputs 2C channels, the second half parametrizing the variance.
        rescale_learned_sigmas: scale the VB term by num_timesteps/1000 (ignored when use_kl).
        diffusion_steps: number of steps T of the trained process.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
