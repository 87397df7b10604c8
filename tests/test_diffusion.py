"""Tests for the ADM-style Gaussian diffusion (diffusion/): constants, respacing, posterior, losses, samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion import (
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    space_timesteps,
)

F64 = torch.float64


def _ref_alphas_cumprod(n: int = 1000) -> np.ndarray:
    """Independent float64 linear schedule: alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / (n - 1) for i in range(n)]) * (1000 / n)
    return np.cumprod(1 - betas)


def _oracle(x0: torch.Tensor, alphas_cumprod: np.ndarray, learn_sigma: bool = True):
    """Model that returns the exact noise of x_t given the known x0, at the (original) timestep it receives."""
    ac = torch.as_tensor(alphas_cumprod)
    seen: list[torch.Tensor] = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        a = ac[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    model.seen = seen
    return model


def _toy_model(x, t, **kwargs):
    """Deterministic, smooth 2C-channel model (eps guess, variance value in (-1, 1))."""
    tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
    return torch.cat([0.3 * x + tt, torch.tanh(x - tt)], 1)


# ------------------------------------------------------------------------------------------------- schedules
def test_linear_schedule_constants():
    d = create_diffusion()
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 1000
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert d.betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert d.alphas_cumprod[999] == pytest.approx(4.0358e-05, rel=1e-4)
    np.testing.assert_allclose(d.alphas_cumprod, _ref_alphas_cumprod(), rtol=1e-12)
    assert d.timestep_map == list(range(1000))
    # scaled for other T: same endpoints as 1000 steps times 1000/T
    b = get_named_beta_schedule("linear", 100)
    assert b[0] == pytest.approx(1e-3) and b[-1] == pytest.approx(0.2)


def test_cosine_schedule_clipped_and_decreasing():
    d = create_diffusion(noise_schedule="cosine")
    ab = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    assert d.betas[0] == pytest.approx(1 - ab(1 / 1000) / ab(0), rel=1e-10)
    assert d.betas.max() == 0.999 and d.betas[-1] == 0.999  # last raw beta ~1 is clipped
    assert (d.betas > 0).all()
    assert (np.diff(d.alphas_cumprod) < 0).all()
    cos = get_named_beta_schedule("cosine", 1000)
    np.testing.assert_array_equal(get_named_beta_schedule("squaredcos_cap_v2", 1000), cos)  # DiT's name
    np.testing.assert_allclose(d.betas, cos, rtol=1e-12)  # spaced betas are recomputed from alpha_bar
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 1000)


# ------------------------------------------------------------------------------------------------- respacing
def test_respacing_250():
    d = create_diffusion("250")
    expected = sorted({round(i * 999 / 249) for i in range(250)})
    assert d.timestep_map == expected and len(expected) == 250
    assert expected[:4] == [0, 4, 8, 12] and expected[-3:] == [991, 995, 999]
    assert d.num_timesteps == 250 and d.original_num_steps == 1000
    assert d.betas[-1] == pytest.approx(0.07751934, abs=1e-7)
    base = create_diffusion()
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[expected], rtol=1e-12)
    assert create_diffusion(250).timestep_map == expected


def test_respacing_variants_and_errors():
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))
    assert create_diffusion("ddim250").timestep_map == list(range(0, 1000, 4))
    assert space_timesteps(1000, "") == set(range(1000))
    assert space_timesteps(1000, "1000") == set(range(1000))
    two = sorted(space_timesteps(100, "2,3"))  # sections [0, 50) and [50, 100)
    assert two == [0, 49, 50, 74, 99]
    for bad in ("ddimx", "ddim999", "2000", "abc", "0"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


# ------------------------------------------------------------------------------------- forward / posterior
def test_q_sample_closed_form():
    d = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g, dtype=F64), torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    t = torch.tensor([0, 10, 500, 999])
    ac = torch.as_tensor(_ref_alphas_cumprod())[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise,
                               rtol=1e-12, atol=1e-12)
    # float32 inputs give float32 outputs (constants cast to the input dtype)
    assert d.q_sample(x0.float(), t, noise.float()).dtype == torch.float32


def test_q_posterior_against_gaussian_conditioning():
    d = create_diffusion()
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(4, 2, 3, 3, generator=g, dtype=F64), torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 7, 400, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    # Bayes: q(x_{t-1}|x0) = N(sqrt(acp) x0, 1-acp), q(x_t|x_{t-1}) = N(sqrt(a) x_{t-1}, beta)
    ac = _ref_alphas_cumprod()
    for i, ti in enumerate(t.tolist()):
        acp, beta = ac[ti - 1], 1 - ac[ti] / ac[ti - 1]
        prec = 1 / (1 - acp) + (1 - beta) / beta
        ref_mean = (np.sqrt(acp) * x0[i].numpy() / (1 - acp) + np.sqrt(1 - beta) * xt[i].numpy() / beta) / prec
        np.testing.assert_allclose(mean[i].numpy(), ref_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(var[i].numpy(), 1 / prec, rtol=1e-9)
        np.testing.assert_allclose(logvar[i].numpy(), np.log(1 / prec), rtol=1e-9)
    # t = 0: posterior collapses onto x0, log variance clipped to the t = 1 value
    mean0, var0, logvar0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, rtol=0, atol=1e-15)
    assert (var0 == 0).all()
    assert torch.allclose(logvar0, torch.tensor(np.log(d.posterior_variance[1]), dtype=F64))


# ---------------------------------------------------------------------------------------------- p(x_{t-1}|x_t)
@pytest.mark.parametrize("respacing", ["", "250"])
def test_learned_range_endpoints(respacing):
    d = create_diffusion(respacing)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    eps = torch.zeros_like(x)
    for v, ref in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(lambda x_, t_: torch.cat([eps, torch.full_like(x, v)], 1), x, t)
        expect = torch.as_tensor(ref[t.numpy()]).view(-1, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(out["log_variance"], expect, rtol=1e-12, atol=0)
        torch.testing.assert_close(out["variance"], expect.exp(), rtol=1e-12, atol=0)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    # frac = 1/2 is the geometric mean of the two variances
    out = d.p_mean_variance(lambda x_, t_: torch.cat([eps, torch.zeros_like(x)], 1), x, t)
    mid = 0.5 * (d.posterior_log_variance_clipped + np.log(d.betas))[t.numpy()]
    torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], torch.as_tensor(mid), rtol=1e-12, atol=0)


def test_fixed_variances():
    x, t = torch.randn(3, 2, 2, 2, dtype=F64), torch.tensor([0, 5, 999])
    large, small = create_diffusion(learn_sigma=False), create_diffusion(learn_sigma=False, sigma_small=True)
    model = lambda x_, t_: torch.zeros_like(x_)  # noqa: E731
    ref_large = np.log(np.append(large.posterior_variance[1], large.betas[1:]))[t.numpy()]
    torch.testing.assert_close(large.p_mean_variance(model, x, t)["log_variance"][:, 0, 0, 0],
                               torch.as_tensor(ref_large), rtol=1e-12, atol=0)
    torch.testing.assert_close(small.p_mean_variance(model, x, t)["log_variance"][:, 0, 0, 0],
                               torch.as_tensor(small.posterior_log_variance_clipped[t.numpy()]), rtol=1e-12, atol=0)


def test_output_channel_mismatch_is_explained():
    d = create_diffusion()
    with pytest.raises(ValueError, match="learn_sigma"):
        d.training_losses(lambda x, t: x, torch.randn(2, 4, 2, 2), torch.tensor([3, 4]))


# ------------------------------------------------------------------------------------------------------ losses
def test_training_losses_structure_and_gradients():
    d = create_diffusion()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 17, 900])
    leaf = torch.randn(3, 8, 4, 4, generator=g, requires_grad=True)
    seen = []
    out = d.training_losses(lambda x, t_, y=None: (seen.append(y), leaf * 0.5)[1], x0, t,
                            model_kwargs={"y": torch.tensor([1, 2, 3])}, noise=noise)
    assert set(out) == {"loss", "mse", "vb", "model_output", "x_t"}
    for k in ("loss", "mse", "vb"):
        assert out[k].shape == (3,) and torch.isfinite(out[k]).all()
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    torch.testing.assert_close(out["x_t"], d.q_sample(x0, t, noise))
    assert out["model_output"].shape == (3, 8, 4, 4) and out["model_output"].requires_grad
    assert seen[0].tolist() == [1, 2, 3]
    torch.testing.assert_close(out["mse"], ((noise - 0.5 * leaf[:, :4]) ** 2).mean((1, 2, 3)))
    # VB trains only the variance half, MSE only the mean half
    (gvb,) = torch.autograd.grad(out["vb"].sum(), leaf, retain_graph=True)
    assert (gvb[:, :4] == 0).all() and (gvb[:, 4:] != 0).any()
    (gmse,) = torch.autograd.grad(out["mse"].sum(), leaf)
    assert (gmse[:, 4:] == 0).all() and (gmse[:, :4] != 0).any()
    # fixed variance: vb is zeros and loss = mse
    fixed = create_diffusion(learn_sigma=False)
    out = fixed.training_losses(lambda x, t_: 0.5 * x, x0, t, noise=noise)
    assert (out["vb"] == 0).all()
    torch.testing.assert_close(out["loss"], out["mse"])


def test_vb_terms_match_hand_computation():
    """t = 0: discretized-Gaussian decoder NLL; t > 0: Gaussian KL; both in bits per dim, all in float64."""
    d = create_diffusion()
    x0 = torch.tensor([-1.0, -0.2, 0.3, 1.0], dtype=F64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    noise = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=F64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    eps_hat = torch.tensor([0.4, -0.8, 0.3, 1.5], dtype=F64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    v = torch.tensor([-0.5, 0.0, 0.5, 1.0], dtype=F64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    t = torch.tensor([0, 300])
    out = d.training_losses(lambda x, t_: torch.cat([eps_hat, v], 1), x0, t, noise=noise)

    ac = _ref_alphas_cumprod()
    x0n, nn_, en, vn = (a[0, 0].numpy() for a in (x0, noise, eps_hat, v))
    frac = (vn + 1) / 2

    def posterior(ti):
        acp = ac[ti - 1] if ti > 0 else 1.0
        beta = 1 - ac[ti] / acp
        coef1, coef2 = beta * np.sqrt(acp) / (1 - ac[ti]), (1 - acp) * np.sqrt(1 - beta) / (1 - ac[ti])
        var = beta * (1 - acp) / (1 - ac[ti])
        return beta, coef1, coef2, var

    def model_mean_logvar(ti, xt):
        beta, c1, c2, _ = posterior(ti)
        pred_x0 = xt / np.sqrt(ac[ti]) - np.sqrt(1 / ac[ti] - 1) * en
        min_log = np.log(posterior(1)[3]) if ti == 0 else np.log(posterior(ti)[3])
        return c1 * pred_x0 + c2 * xt, frac * np.log(beta) + (1 - frac) * min_log

    # t = 0: decoder NLL with the tanh CDF approximation, edge bins open-ended
    xt0 = np.sqrt(ac[0]) * x0n + np.sqrt(1 - ac[0]) * nn_
    mean, logvar = model_mean_logvar(0, xt0)
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv_std = np.exp(-0.5 * logvar)
    plus, minus = cdf(inv_std * (x0n - mean + 1 / 255)), cdf(inv_std * (x0n - mean - 1 / 255))
    logp = np.where(x0n < -0.999, np.log(plus), np.where(x0n > 0.999, np.log(1 - minus), np.log(plus - minus)))
    nll_bits = -logp.mean() / np.log(2)
    assert out["vb"][0].item() == pytest.approx(nll_bits, rel=1e-10)
    # the tanh CDF is within 2e-4 of the exact one, so the exact-erf NLL is close
    exact_cdf = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    p_exact, m_exact = exact_cdf(inv_std * (x0n - mean + 1 / 255)), exact_cdf(inv_std * (x0n - mean - 1 / 255))
    logp_exact = np.where(x0n < -0.999, np.log(p_exact),
                          np.where(x0n > 0.999, np.log(1 - m_exact), np.log(p_exact - m_exact)))
    assert out["vb"][0].item() == pytest.approx(-logp_exact.mean() / np.log(2), rel=2e-2)

    # t = 300: KL between the true posterior and the model Gaussian
    ti = 300
    xt = np.sqrt(ac[ti]) * x0n + np.sqrt(1 - ac[ti]) * nn_
    _, c1, c2, var = posterior(ti)
    true_mean, true_logvar = c1 * x0n + c2 * xt, np.log(var)
    mean, logvar = model_mean_logvar(ti, xt)
    kl = 0.5 * (logvar - true_logvar + (np.exp(true_logvar) + (true_mean - mean) ** 2) / np.exp(logvar) - 1)
    assert out["vb"][1].item() == pytest.approx(kl.mean() / np.log(2), rel=1e-9)
    mse = ((nn_ - en) ** 2).mean()
    assert out["mse"][0].item() == pytest.approx(mse, rel=1e-12)
    assert out["loss"][1].item() == pytest.approx(mse + kl.mean() / np.log(2), rel=1e-9)


def test_discretized_likelihood_sums_to_one():
    """The 256 bins of [-1, 1] (edge bins open-ended) form a probability distribution."""
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    for mu, log_s in ((0.1, -3.0), (-0.7, -1.0), (0.95, -4.0)):
        logp = discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, mu),
                                                   log_scales=torch.full_like(bins, log_s))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("respacing", ["", "250"])
def test_exact_noise_oracle_has_zero_mse(respacing):
    d, base = create_diffusion(respacing), create_diffusion()
    x0 = torch.randn(4, 3, 4, 4, dtype=F64)
    model = _oracle(x0, base.alphas_cumprod)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    out = d.training_losses(model, x0, t)
    assert out["mse"].max().item() < 1e-20
    # the model was called with original timesteps
    assert model.seen[0].tolist() == [d.timestep_map[i] for i in t.tolist()]


def test_kl_loss_types():
    x0, noise, t = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2), torch.tensor([3, 40])
    hybrid = create_diffusion().training_losses(_toy_model, x0, t, noise=noise)
    kl = create_diffusion(use_kl=True).training_losses(_toy_model, x0, t, noise=noise)
    torch.testing.assert_close(kl["loss"], 1000 * hybrid["vb"])
    resc = create_diffusion("250", rescale_learned_sigmas=True).training_losses(_toy_model, x0, t, noise=noise)
    plain = create_diffusion("250").training_losses(_toy_model, x0, t, noise=noise)
    torch.testing.assert_close(resc["vb"], 0.25 * plain["vb"])


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("method", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_loops_finite_and_deterministic(method):
    d = create_diffusion("ddim10" if method == "ddim_sample_loop" else "10")
    run = lambda seed: getattr(d, method)(_toy_model, (2, 3, 4, 4), model_kwargs={},  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    steps = list(getattr(d, method + "_progressive")(_toy_model, (2, 3, 4, 4),
                                                   generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 10 and torch.equal(steps[-1]["sample"], a)
    noise = torch.randn(2, 3, 4, 4)
    from_noise = getattr(d, method)(_toy_model, noise.shape, noise, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(from_noise, a)  # explicit x_T replaces the generator's first draw
    assert torch.equal(from_noise, getattr(d, method)(_toy_model, noise.shape, noise.clone(),
                                                      generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="shape"):
        getattr(d, method)(_toy_model, (1, 3, 4, 4), noise)


@pytest.mark.parametrize("method,respacing", [("ddim_sample_loop", "ddim50"), ("ddim_sample_loop", ""),
                                              ("p_sample_loop", "250")])
def test_oracle_sampling_recovers_x0(method, respacing):
    d, base = create_diffusion(respacing), create_diffusion()
    x0 = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64) * 2 - 1
    model = _oracle(x0, base.alphas_cumprod)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    sample = getattr(d, method)(model, x0.shape, noise, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-9)
    assert [int(s) for s in torch.cat(model.seen)] == d.timestep_map[::-1]


def test_ddim_inversion_roundtrip():
    d, base = create_diffusion("ddim20"), create_diffusion()
    g = torch.Generator().manual_seed(6)
    x0, e = torch.rand(1, 2, 2, 2, generator=g, dtype=F64) * 2 - 1, torch.randn(1, 2, 2, 2, generator=g, dtype=F64)
    model = _oracle(x0, base.alphas_cumprod)
    x = d.q_sample(x0, torch.tensor([0]), e)
    for i in range(d.num_timesteps - 1):  # index 0 -> T'-1 along the deterministic ODE path
        x = d.ddim_reverse_sample(model, x, torch.tensor([i]))["sample"]
    torch.testing.assert_close(x, d.q_sample(x0, torch.tensor([d.num_timesteps - 1]), e), rtol=0, atol=1e-9)
    torch.testing.assert_close(d.ddim_sample_loop(model, x.shape, x, eta=0.0), x0, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(model, x, torch.tensor([0]), eta=0.5)


def test_ddim_eta_one_matches_ddpm_variance():
    """eta = 1: the DDIM noise scale sigma_t^2 equals the DDPM posterior variance beta~_t (Song et al. §4.1)."""
    d = create_diffusion("ddim25")
    x, t = torch.randn(3, 2, 2, 2, dtype=F64), torch.tensor([1, 12, 24])
    step = lambda eta: d.ddim_sample(_toy_model, x, t, eta=eta,  # noqa: E731
                                     generator=torch.Generator().manual_seed(7))["sample"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    det = step(0.0)
    # mean_pred uses sqrt(1 - abar_prev - sigma^2) eps, so compare via the stochastic part plus that shift
    ab, abp = (torch.as_tensor(a[t.numpy()]).view(-1, 1, 1, 1) for a in (d.alphas_cumprod, d.alphas_cumprod_prev))
    pv = torch.as_tensor(d.posterior_variance[t.numpy()]).view(-1, 1, 1, 1)
    eps = (x / ab.sqrt() - d.p_mean_variance(_toy_model, x, t)["pred_xstart"]) / (1 / ab - 1).sqrt()
    expected = det + ((1 - abp - pv).sqrt() - (1 - abp).sqrt()) * eps + pv.sqrt() * noise
    torch.testing.assert_close(step(1.0), expected, rtol=1e-10, atol=1e-12)


def test_with_dit_backbone_and_cfg():
    """End to end with a tiny DiT: loss backward, and CFG sampling through the bound forward_with_cfg."""
    from backbones.dit import DiT

    torch.manual_seed(0)
    model = DiT(size="S", input_size=8, patch_size=2, num_classes=10, depth=1, hidden_size=64, num_heads=4)
    d = create_diffusion()
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    out = d.training_losses(model, x0, torch.tensor([0, 500]), model_kwargs={"y": y})
    out["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # fresh DiT outputs exactly 0: eps = 0, so mse = mean(noise^2); frac = 1/2
    noise = (out["x_t"] - d.q_sample(x0, torch.tensor([0, 500]), torch.zeros_like(x0))) \
        / torch.as_tensor(d.sqrt_one_minus_alphas_cumprod[[0, 500]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["mse"], (noise**2).mean((1, 2, 3)), rtol=1e-4, atol=1e-5)

    sampler = create_diffusion("5")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"y": torch.cat([y, torch.full_like(y, 10)]), "cfg_scale": 1.5}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    samples = sampler.p_sample_loop(model.forward_with_cfg, (4, 4, 8, 8), torch.cat([z, z]), model_kwargs=kwargs,
                                    generator=torch.Generator().manual_seed(1))
    assert samples.shape == (4, 4, 8, 8) and torch.isfinite(samples).all()
