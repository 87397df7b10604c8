"""DiMR's training setting: the scaled-linear schedule and a time input that follows the diffusion's T."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import backbones
from diffusion import create_diffusion
from diffusion.data import load_dataset
from diffusion.gaussian_diffusion import get_named_beta_schedule
from diffusion.trainer import backbone_kwargs


def test_scaled_linear_is_stable_diffusions_schedule():
    betas = get_named_beta_schedule("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000), rtol=1e-12)
    # SD's alphas_cumprod at the last step (a published constant of that schedule: ~0.0047)
    assert np.prod(1 - betas) == pytest.approx(0.004660, abs=2e-5)
    d = create_diffusion("", noise_schedule="scaled_linear")
    assert d.num_timesteps == 1000 and d.betas[500] == pytest.approx(betas[500])


def test_dimr_time_input_follows_the_diffusion_steps():
    digits = load_dataset("digits")
    cfg = {"name": "dimr", "size": "S/2R", "depth": 3, "hidden_size": 32, "num_heads": 2}
    assert "num_timesteps" not in backbone_kwargs(cfg, digits, 0.1, True, 1000)  # default: keys unchanged
    kw = backbone_kwargs(cfg, digits, 0.1, True, 500)
    assert kw["num_timesteps"] == 500
    assert "num_timesteps" not in backbone_kwargs({"name": "dit", "size": "S"}, digits, 0.1, True, 500)
    torch.manual_seed(0)
    m500 = backbones.build("dimr", **kw).eval()
    torch.manual_seed(0)
    m1000 = backbones.build("dimr", **backbone_kwargs(cfg, digits, 0.1, True, 1000)).eval()
    for m in (m500, m1000):  # at init p1 = p2, so the norms ignore time: give them a time dependence
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(m.named_parameters()):
                if name.endswith("param0"):
                    p.add_(torch.randn_like(p))
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    # step 249 of 500 is the same time input as step 499 of 1000 ((t + 1) / T = 0.5)
    torch.testing.assert_close(m500(x, torch.tensor([249, 249]), y), m1000(x, torch.tensor([499, 499]), y))
    assert not torch.allclose(m500(x, torch.tensor([499, 499]), y), m1000(x, torch.tensor([499, 499]), y))
