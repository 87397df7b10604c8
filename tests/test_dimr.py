"""DiMR backbone: released sizes, time-dependent norms, multi-scale auxiliary loss, cascade, CFG, input sizes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from backbones import available, build
from backbones.dimr import CascadeUpsample, DiMR
from backbones.layers import TDLayerNorm, TDRMSNorm, TimeDependentParameter, drop_labels, td_time_condition
from bench.flops import forward_gmacs, gmacs_by_operator
from diffusion import create_diffusion

TINY = dict(size="S/2R", depth=3, hidden_size=32, num_heads=2, num_classes=10)  # CPU-fast, same structure


def tiny(**kw) -> DiMR:
    torch.manual_seed(0)
    return build("dimr", **{**TINY, "input_size": 8, "in_channels": 4, **kw})


def meta(size: str, **kw) -> DiMR:
    with torch.device("meta"):
        return build("dimr", size=size, learn_sigma=False, **kw)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def analytic_gmacs(branches: int, depth: int, D: int, s: int, C: int = 4, c_out: int = 4) -> float:
    """Forward MACs at batch 1 from the architecture (DiT convention; fvcore counts LayerNorm as 4 per element)."""
    macs, lowres_dim, P_low = 0, None, None
    for k in range(branches):
        level = branches - 1 - k
        g, d = s // 2 ** level, D // 2 ** k
        P = g * g
        n_cfg = depth if k == 0 else math.ceil(depth / 2)
        n = n_cfg // 2 * 2 + 1
        macs += P * d * C * 4 ** level  # patchify conv
        if k == 0:
            N = P + 1  # class token in context
            macs += n * (N * 10 * d * d + 2 * d * N * N) + (n // 2) * N * 2 * d * d
        else:
            macs += 4 * P_low * lowres_dim + P_low * lowres_dim * 4 * d + 4 * P * d  # cascade upsampler
            macs += n * P * (49 * d + 6 * d * d) + (n // 2) * P * 2 * d * d
        if level == 0:  # lower heads only run in training (aux loss); the count is a sampling-time forward
            macs += 4 * P * d + P * c_out * d * 9
        lowres_dim, P_low = d * (n + 1), P
    return macs / 1e9


# ------------------------------------------------------------------------------------------------------------------
# Released sizes (acceptance numbers) and structure
# ------------------------------------------------------------------------------------------------------------------
def test_registered():
    assert "dimr" in available()


@pytest.mark.parametrize("size, total, b1, b2, up, td", [
    ("XL/2R", 505_046_408, 396_252_484, 108_793_924, 74_040_960, 662_400),
    ("G/2R", 1_056_352_904, 833_236_996, 223_115_908, 154_485_504, 1_145_088),
])
def test_released_parameter_counts(size, total, b1, b2, up, td):
    m = meta(size)
    assert nparams(m) == total  # README / paper: 505M (XL/2R), 1.06B (G/2R); computed from the official code
    assert round(total / 1e6, 2) == {"XL/2R": 505.05, "G/2R": 1056.35}[size]
    assert [nparams(b) for b in m.branches] == [b1, b2]
    assert nparams(m.branches[1].upsample) == up
    tdp = [mod for mod in m.modules() if isinstance(mod, TimeDependentParameter)]
    assert sum(nparams(p) for p in tdp) == td  # all TD params: 0.66M (XL), 1.15M (G)
    nwd = m.no_weight_decay()
    named = dict(m.named_parameters())
    assert len(nwd) == 2 * len(tdp) and all(n.endswith((".nodecay_weight", ".nodecay_bias")) for n in nwd)
    assert sum(named[n].numel() for n in nwd) == td // 2


def test_learn_sigma_doubles_only_highest_head():
    with torch.device("meta"):
        m = build("dimr", size="XL/2R", learn_sigma=True)
    assert nparams(m) == 505_046_408 + 480 * 4 * 9 + 4
    assert m.out_channels == 8
    assert [b.final_conv.out_channels for b in m.branches] == [4, 8]


@pytest.mark.parametrize("size, t_blocks, D, c_blocks", [("XL/2R", 39, 960, 21), ("G/2R", 57, 1152, 29)])
def test_released_structure(size, t_blocks, D, c_blocks):
    m = meta(size)
    low, high = m.branches
    assert (low.block_type, len(low.blocks), low.grid_size, low.x_embedder.patch_size) == ("transformer", t_blocks,
                                                                                           16, 2)
    blk = low.blocks[0]
    assert blk.attn.num_heads == 16 and blk.attn.qkv.bias is None and blk.attn.proj.bias is not None
    assert (blk.mlp.w0.out_features, blk.mlp.w1.out_features, blk.mlp.w2.in_features) == (2 * D,) * 3
    assert low.y_embedder.embedding_table.weight.shape == (1001, D)  # null class 1000 for CFG
    assert low.pos_embed.shape == (1, 256, D) and low.upsample is None and len(low.skip_linears) == t_blocks // 2
    assert (high.block_type, len(high.blocks), high.grid_size, high.x_embedder.patch_size) == ("convnext", c_blocks,
                                                                                               32, 1)
    dw = high.blocks[0].dwconv
    assert dw.kernel_size == (7, 7) and dw.groups == D // 2 and high.blocks[0].mlp.w0.out_features == D
    assert high.y_embedder is None and high.pos_embed.shape == (1, 1024, D // 2)
    assert (high.upsample.proj.in_features, high.upsample.proj.out_features) == (D * (t_blocks + 1), 4 * (D // 2))
    assert high.final_conv.kernel_size == (3, 3)
    assert m.arch == dict(size=size, patch=1, depth=t_blocks, width=D, heads=16, branches=2)


def test_released_gmacs_formula():
    # The formula is checked against fvcore below (fast, tiny models) and in the slow tests (full size).
    assert analytic_gmacs(2, 39, 960, 32) == pytest.approx(160, rel=0.01)
    assert analytic_gmacs(2, 57, 1152, 32) == pytest.approx(331, rel=0.01)


@pytest.mark.parametrize("size, s", [("S/2R", 16), ("S/3R", 16), ("S/2R", 8)])
def test_fvcore_matches_formula(size, s):
    m = tiny(size=size, input_size=s, learn_sigma=True)
    by_op = gmacs_by_operator(m, s, 4)
    assert set(by_op) <= {"conv", "linear", "scaled_dot_product_attention", "layer_norm"}
    assert sum(by_op.values()) == pytest.approx(analytic_gmacs(m.num_branches, 3, 32, s, c_out=8), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("size, gmacs", [("XL/2R", 160), ("G/2R", 331)])
def test_released_gmacs_fvcore(size, gmacs):
    m = build("dimr", size=size, learn_sigma=False, input_size=32)
    g = forward_gmacs(m, 32, 4)
    assert g == pytest.approx(gmacs, rel=0.01)
    assert g == pytest.approx(analytic_gmacs(2, m.arch["depth"], m.arch["width"], 32), rel=1e-9)


def test_small_presets_and_overrides():
    s, b = meta("S/2R"), meta("B/2R")
    assert nparams(s) == 27_746_504 and nparams(b) == 109_166_984
    m = meta("S/2R", depth=7, hidden_size=128, num_heads=4)
    assert m.arch == dict(size="S/2R", patch=1, depth=7, width=128, heads=4, branches=2)
    assert len(m.branches[1].blocks) == 5 and m.branches[1].blocks[0].mlp.w0.in_features == 64  # ceil(7/2)->5
    m3 = meta("XL/3R", input_size=64)  # structure only; the paper's 3R configs are unpublished
    assert [b.grid_size for b in m3.branches] == [16, 32, 64]
    assert [b.block_type for b in m3.branches] == ["transformer", "convnext", "convnext"]
    assert m3.loss_coeffs == (1 / 16, 1 / 4, 1.0)
    # Our 3R rule at 512 (64x64 latents) lands on the paper's DiMR-XL/3R 525M / 206 GFLOPs; a consistency check
    # of our extrapolation, not a reproduction of an (unpublished) official config.
    assert nparams(m3) == 525_027_372
    assert analytic_gmacs(3, 39, 960, 64) == pytest.approx(206.137, abs=1e-3)


# ------------------------------------------------------------------------------------------------------------------
# Time-dependent norms
# ------------------------------------------------------------------------------------------------------------------
def test_time_condition_matches_official_mapping():
    t = torch.tensor([0, 499, 999, 250])
    # official: n = t + 1 in 1..1000, log_snr = n/1000*8 - 4, t_norm = log_snr / 4
    expected = [((n + 1) / 1000 * 8 - 4) / 4 for n in t.tolist()]
    assert td_time_condition(t).tolist() == pytest.approx(expected, abs=1e-7)
    assert td_time_condition(t)[:3].tolist() == pytest.approx([-0.998, 0.0, 1.0], abs=1e-7)
    assert td_time_condition(t).dtype == torch.float32


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _theta(p: dict, tt: np.ndarray) -> np.ndarray:
    s = 1 / (1 + np.exp(-(tt[:, None] * (p["nodecay_weight"] + 1) + p["nodecay_bias"])))
    return p["param1"] + s * (p["param0"] - p["param1"])


def test_td_layernorm_and_rmsnorm_against_hand_computation():
    torch.manual_seed(1)
    t = torch.tensor([0, 300, 999])
    tt = ((t.numpy().astype(np.float64) + 1) / 1000 * 8 - 4) / 4  # official mapping, float64
    time = torch.from_numpy(tt)
    torch.testing.assert_close(td_time_condition(t), time.float())
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)  # channel-last (B, H, W, D)
    xn = x.numpy()

    ln = TDLayerNorm(6).double()
    _randomise(ln)
    P = {k: v.detach().numpy() for k, v in ln.named_parameters()}
    gamma = _theta({k.split(".")[1]: v for k, v in P.items() if k.startswith("weight")}, tt)
    beta = _theta({k.split(".")[1]: v for k, v in P.items() if k.startswith("bias")}, tt)
    mu, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
    ref = (xn - mu) / np.sqrt(var + 1e-5) * gamma[:, None, None] + beta[:, None, None]
    np.testing.assert_allclose(ln(x, time).detach().numpy(), ref, rtol=1e-10, atol=1e-12)

    rms = TDRMSNorm(6).double()
    _randomise(rms, seed=1)
    scale = _theta({k.split(".")[1]: v.detach().numpy() for k, v in rms.named_parameters()}, tt)
    ref = xn / (np.sqrt((xn ** 2).mean(-1, keepdims=True)) + 1e-8) * scale[:, None, None]
    out = rms(x, time)
    assert out.dtype == torch.float64  # TDRMSNorm computes in float32-or-wider and returns the input dtype
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-6)  # x.float() inside: fp32 accuracy


def test_td_parameter_official_init():
    p = TimeDependentParameter((4,), 1.0)
    assert torch.equal(p.param0, torch.ones(4)) and torch.equal(p.param1, torch.ones(4))
    assert torch.equal(p.nodecay_weight, torch.zeros(4)) and torch.equal(p.nodecay_bias, torch.zeros(4))
    assert torch.equal(p(torch.tensor([-1.0, 0.3, 1.0])), torch.ones(3, 4))  # p1 == p2: time independent


# ------------------------------------------------------------------------------------------------------------------
# Model behaviour
# ------------------------------------------------------------------------------------------------------------------
def _batch(m: DiMR, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, m.num_classes, (B,), generator=g)
    return x, t, y


def test_fresh_init_official():
    m = tiny().eval()
    x, t, y = _batch(m)
    with torch.no_grad():
        out0 = m(x, torch.zeros_like(t), y)
        out1 = m(x, torch.full_like(t, 999), y)
    # All TD params start with p1 == p2, so the fresh model ignores t exactly; official heads are default-init
    # convs (NOT zero-init), so the fresh output is not zero.
    assert torch.equal(out0, out1)
    assert out0.shape == (3, 8, 8, 8) and out0.abs().mean() > 1e-2
    lin = m.branches[0].blocks[0].mlp.w0
    assert lin.weight.std().item() == pytest.approx(0.02, rel=0.2) and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    # once time-dependent params move, t matters
    with torch.no_grad():
        m.branches[1].final_norm.weight.param0.add_(1.0)
        assert not torch.allclose(m(x, torch.zeros_like(t), y), m(x, torch.full_like(t, 999), y))


def test_input_sizes_and_errors():
    for size, s in [("S/2R", 8), ("S/2R", 16), ("S/2R", 32), ("S/3R", 8), ("S/3R", 16)]:
        m = tiny(size=size, input_size=s, learn_sigma=False).eval()
        x, t, y = _batch(m, B=2)
        outs = m.forward_all(x, t, y)
        R = m.num_branches
        assert [o.shape[-1] for o in outs] == [s // 2 ** (R - 1 - k) for k in range(R)]
        assert m(x, t, y).shape == (2, 4, s, s)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(size="S/3R", input_size=6)
    m = tiny()
    with pytest.raises(ValueError, match="input_size=16"):
        m(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="loss_coeffs"):
        tiny(loss_coeffs=[0.5, 0.5])
    with pytest.raises(ValueError, match="unknown size"):
        tiny(size="XXL/2R")


def _hand_aux(lows: list[torch.Tensor], noise: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    B, C, H, _ = noise.shape
    total = torch.zeros(B, dtype=torch.float64)
    for pred, coeff in zip(lows, coeffs):
        r = H // pred.shape[-1]
        g = H // r
        target = noise.reshape(B, C, g, r, g, r).sum(dim=(3, 5)) / r  # mean over r x r, times r
        total += coeff * ((pred - target) ** 2).reshape(B, -1).mean(1)
    return total


def _counting_forward_all(m: DiMR) -> list[int]:
    """Wrap ``m.forward_all`` (instance attribute) so calls are counted; returns the one-element counter."""
    calls, inner = [0], m.forward_all

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    m.forward_all = counted
    return calls


@pytest.mark.parametrize("size, coeffs, learn_sigma", [("S/2R", [1 / 4], True), ("S/2R", [1 / 4], False),
                                                       ("S/3R", [1 / 16, 1 / 4], True)])
def test_training_losses_against_hand_computation(size, coeffs, learn_sigma):
    m = tiny(size=size, input_size=16, class_dropout_prob=0.0, learn_sigma=learn_sigma).double().train()
    diffusion = create_diffusion(learn_sigma=learn_sigma)
    x, t, y = _batch(m)
    x = x.double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # Hand computation: noise x, run every branch once, mse + vb on the top head, aux on the lower ones.
    x_t = diffusion.q_sample(x, t, noise)
    with torch.no_grad():
        outs = m.forward_all(x_t, t, y)
    top = outs[-1]
    mse = ((noise - top[:, :4]) ** 2).reshape(3, -1).mean(1)
    # vb from the diffusion's own formula on that fixed top output (zero with a fixed variance)
    vb = diffusion.training_losses(lambda *_, **__: top, x, t, noise=noise)["vb"]
    assert learn_sigma or torch.equal(vb, torch.zeros(3, dtype=torch.float64))
    aux = _hand_aux(outs[:-1], noise, coeffs)  # only the lower branches: the highest is the diffusion's mse

    calls = _counting_forward_all(m)
    terms = m.training_losses(diffusion, x, t, y, noise)
    assert calls[0] == 1  # one cascade pass per step
    assert {"loss", "mse", "vb", "aux", "model_output", "x_t"} <= set(terms)
    assert all(terms[k].shape == (3,) for k in ("loss", "mse", "vb", "aux"))
    torch.testing.assert_close(terms["x_t"], x_t, rtol=0, atol=0)
    torch.testing.assert_close(terms["model_output"].detach(), top, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["mse"].detach(), mse, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["vb"].detach(), vb, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["aux"].detach().double(), aux, rtol=1e-6, atol=0)  # aux in float32
    torch.testing.assert_close(terms["loss"].detach(), mse + vb + aux, rtol=1e-6, atol=0)
    terms["loss"].sum().backward()  # the lower heads train through the aux term
    assert m.branches[0].final_conv.weight.grad.abs().sum() > 0


def test_training_losses_keep_no_state_on_the_model():
    m = tiny(class_dropout_prob=0.0).train()
    diffusion = create_diffusion()
    before = dict(vars(m))
    for B, seed in ((3, 0), (2, 1)):
        x, t, y = _batch(m, B=B, seed=seed)
        terms = m.training_losses(diffusion, x, t, y, torch.randn_like(x))
        assert terms["aux"].shape == terms["loss"].shape == (B,)
    assert dict(vars(m)).keys() == before.keys() and all(vars(m)[k] is v for k, v in before.items())
    copy.deepcopy(m)  # EMA copies see only parameters and buffers


def test_gradients_reach_lowres_branch_from_main_output():
    m = tiny(class_dropout_prob=0.0).train()
    x, t, y = _batch(m)
    m(x, t, y).square().mean().backward()  # main output only (highest-resolution head)
    low = m.branches[0]
    assert low.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert low.y_embedder.embedding_table.weight.grad.abs().sum() > 0
    assert low.final_conv.weight.grad is None  # the low head only feeds training_losses' aux term


def test_cascade_pixel_shuffle_layout():
    torch.manual_seed(0)
    up = CascadeUpsample(12, 5).double()
    _randomise(up)
    x = torch.randn(2, 3, 4, 12, dtype=torch.float64)
    time = td_time_condition(torch.tensor([10, 900])).double()
    z = up.proj(up.norm_in(x, time))
    expected = torch.empty(2, 6, 8, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            for a in range(2):
                for c in range(2):
                    expected[:, 2 * i + a, 2 * j + c] = z[:, i, j, (a * 2 + c) * 5:(a * 2 + c + 1) * 5]
    torch.testing.assert_close(up(x, time), up.norm_out(expected, time))


def test_class_token_and_null_class():
    m = tiny(class_dropout_prob=1.0)
    x, t, y = _batch(m)
    null = torch.full_like(y, m.num_classes)
    m.eval()
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, null)
        assert not torch.allclose(cond, uncond)  # the in-context class token matters
        m.train()
        torch.testing.assert_close(m(x, t, y), cond)  # p = 1, yet no dropout inside the forward
        dropped = m(x, t, drop_labels(y, 1.0, m.num_classes))  # the trainer's drop: every label -> null class
    torch.testing.assert_close(dropped, uncond)


def test_forward_with_cfg():
    m = tiny().eval()
    x, t, y = _batch(m, B=2)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, m.num_classes)])
    with torch.no_grad():
        out = m.forward_with_cfg(xx, tt, yy, cfg_scale=1.5)
        direct = m(xx, tt, yy)
    cond, uncond = direct[:2], direct[2:]
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out[:2, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[2:, :4], out[:2, :4])
    torch.testing.assert_close(out[:, 4:], direct[:, 4:])


def test_grad_checkpoint_same_result():
    m = tiny(class_dropout_prob=0.0).train()
    x, t, y = _batch(m)
    ref = m(x, t, y)
    ref.sum().backward()
    g_ref = m.branches[0].blocks[1].mlp.w0.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out = m(x, t, y)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m.branches[0].blocks[1].mlp.w0.weight.grad, g_ref)
