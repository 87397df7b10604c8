"""Diffusion-RWKV backbone: exact parameter counts and MACs (closed formulas), official init, q_shift, U-ViT skips."""

from __future__ import annotations

import math

import pytest
import torch

from backbones import build, token_mixers
from backbones.rwkv import DiffusionRWKV, DRWKVBlock, SpatialMix, q_shift
from bench.flops import gmacs_by_operator


def drwkv_params(D: int, L: int, p: int, c_in: int, num_classes: int, T: int, learn_sigma: bool = True) -> int:
    """Closed formula, term by term as in models_drwkv.py."""
    c_out = 2 * c_in if learn_sigma else c_in
    block = 4 * D * D + 5 * D          # spatial mix: key, value, receptance, output; decay, first, 3 mixing vectors
    block += 9 * D * D + 2 * D         # channel mix: key D->4D, value 4D->D, receptance; 2 mixing vectors
    block += 4 * D + 6 * D * D + 6 * D  # ln1, ln2 (affine); adaLN SiLU -> Linear(D, 6D)
    assert block == 19 * D * D + 17 * D
    return (L * block + 2 * D                      # ln0 of the first block
            + (L // 2) * (2 * D * D + D)           # skip_linear of every out-block
            + p * p * c_in * D + D + T * D         # patch embedding, learned pos_embed
            + 256 * D + D + D * D + D              # timestep MLP
            + (num_classes + 1) * D * (num_classes > 0)  # label table with the CFG null row
            + 2 * D                                # norm_f (affine)
            + 2 * D * D + 2 * D + D * p * p * c_out + p * p * c_out)  # final adaLN and linear


# ImageNet-256 latents (32x32x4), 1000 classes, learn_sigma; H/2 is the ~779M DRWKV-H/2 of the sCM comparison table
EXACT_PARAMS = {
    ("S", 2): 39_323_552, ("S", 4): 39_305_216,
    ("B", 2): 74_793_632, ("B", 4): 74_775_296,
    ("M", 2): 132_623_904, ("M", 4): 132_599_424,
    ("L", 2): 439_352_096, ("L", 4): 439_315_328,
    ("H", 2): 780_313_632, ("H", 4): 780_264_576,
}


def meta_model(**kw) -> DiffusionRWKV:
    with torch.device("meta"):
        return build("rwkv", **kw)


@pytest.mark.parametrize("size,patch", list(EXACT_PARAMS))
def test_parameter_counts(size, patch):
    m = meta_model(size=size, patch_size=patch, input_size=32, in_channels=4, num_classes=1000)
    n = sum(p.numel() for p in m.parameters())
    D, L = m.arch["width"], m.arch["depth"]
    assert (D, L) == {"S": (384, 13), "B": (384, 25), "M": (512, 25), "L": (768, 37), "H": (1024, 37)}[size]
    assert n == EXACT_PARAMS[size, patch] == drwkv_params(D, L, patch, 4, 1000, (32 // patch) ** 2)
    if (size, patch) == ("H", 2):
        assert round(n / 1e6) == 780


@pytest.mark.parametrize("input_size,c_in,classes,expected", [
    (32, 3, 0, 38_934_552),    # CIFAR-10 pixels, unconditional S/2 (38.9M)
    (64, 3, 0, 39_229_464),    # CelebA-64 pixels, unconditional S/2 (39.2M)
])
def test_pixel_space_counts(input_size, c_in, classes, expected):
    m = meta_model(size="S", patch_size=2, input_size=input_size, in_channels=c_in, num_classes=classes)
    assert m.label_emb is None
    assert sum(p.numel() for p in m.parameters()) == expected == drwkv_params(
        384, 13, 2, c_in, classes, (input_size // 2) ** 2)


def test_imagenet512_h2_count():
    m = meta_model(size="H", patch_size=2, input_size=64, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == 781_100_064 == drwkv_params(1024, 37, 2, 4, 1000, 1024)


def linear_macs(D: int, L: int, p: int, c_out: int, T: int) -> int:
    """Per-token linears (13 D^2 per block, 2 D^2 per skip fusion, final projection) plus per-sample adaLN and
    timestep MLP (batch 1)."""
    return T * (13 * L * D * D + 2 * (L // 2) * D * D + p * p * c_out * D) + 6 * L * D * D + 2 * D * D + 256 * D + D * D


def check_gmacs(model: DiffusionRWKV, input_size: int, c_in: int) -> dict:
    by_op = gmacs_by_operator(model, input_size, c_in)
    D, L, p = model.arch["width"], model.arch["depth"], model.arch["patch"]
    T = (input_size // p) ** 2
    assert by_op["linear"] == pytest.approx(linear_macs(D, L, p, model.out_channels, T) / 1e9, rel=1e-12)
    assert by_op["conv"] == pytest.approx(T * p * p * c_in * D / 1e9, rel=1e-12)
    assert by_op["bi_wkv"] == pytest.approx(6.5 * T * D * L / 1e9, rel=1e-12)  # 13 FLOPs per token and channel
    return by_op


def test_gmacs_s2():
    torch.manual_seed(0)
    by_op = check_gmacs(build("rwkv", size="S", patch_size=2, input_size=32, in_channels=4), 32, 4)
    assert by_op["linear"] == pytest.approx(6.85, abs=0.005)  # reference note: 6.85 linear GMACs for S/2 at 256 px


@pytest.mark.slow
def test_gmacs_h2():
    """DRWKV-H/2 at 256 px: ~139 GMACs, more than DiT-XL/2's 118.6 (the FLOP advantage needs long sequences)."""
    by_op = check_gmacs(build("rwkv", size="H", patch_size=2, input_size=32, in_channels=4), 32, 4)
    assert sum(by_op.values()) == pytest.approx(139.0, abs=0.3)


def tiny(**kw) -> DiffusionRWKV:
    cfg = dict(size="S", depth=5, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=10)
    cfg.update(kw)
    return build("rwkv", **cfg)


def test_forward_shapes_and_zero_output_at_init():
    torch.manual_seed(0)
    m = tiny()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    out = m(x, t, y)
    assert out.shape == (3, 6, 8, 8) and m.out_channels == 6
    assert torch.count_nonzero(out) == 0  # zero-initialised final projection (adaLN-Zero)
    assert tiny(learn_sigma=False)(x, t, y).shape == (3, 3, 8, 8)
    assert m.forward_with_cfg(torch.cat([x[:1], x[:1]]), t[:2], torch.tensor([1, 10]), 4.0).shape == (2, 6, 8, 8)
    assert m.arch == dict(size="S", patch=2, depth=5, width=32, heads=None)
    assert m.no_weight_decay() == {"pos_embed"} and m.pos_embed.requires_grad


def test_blocks_are_identity_at_init():
    """adaLN-Zero: with zero gates every block returns its input (block 0: its extra ln0 applied)."""
    torch.manual_seed(0)
    m = tiny()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(m.in_blocks[0](x, c), m.in_blocks[0].ln0(x))
    assert torch.equal(m.mid_block(x, c), x)
    assert not hasattr(m.mid_block, "ln0") and m.mid_block.skip_linear is None


def test_structure_and_skip_pairing():
    """L//2 in-blocks, mid block, L//2 out-blocks; out-block j fuses cat([x, output of in-block L//2-1-j])."""
    torch.manual_seed(0)
    m = tiny(depth=7)
    assert [b.layer_id for b in m.all_blocks()] == list(range(7))
    assert [b.skip_linear is not None for b in m.all_blocks()] == [False] * 4 + [True] * 3
    assert [b.drop_path for b in m.all_blocks()] == pytest.approx([0.1 * i / 7 for i in range(7)])
    outs, skips = {}, {}
    for i, b in enumerate(m.in_blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out))
    for j, b in enumerate(m.out_blocks):
        b.skip_linear.register_forward_hook(lambda mod, inp, out, j=j: skips.__setitem__(j, inp[0]))
    m(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1]))
    for j in range(3):
        assert torch.equal(skips[j][..., 32:], outs[2 - j])  # shallow half = in-block output, deep half first


def q_shift_channels_first(x: torch.Tensor, H: int, W: int, s: int, gamma: float) -> torch.Tensor:
    """The official formulation (models_drwkv.py q_shift): channels-first slice assignments into zeros."""
    B, N, C = x.shape
    x = x.transpose(1, 2).reshape(B, C, H, W)
    out = torch.zeros_like(x)
    g = [int(C * gamma * i) for i in range(5)]
    out[:, g[0]:g[1], :, s:W] = x[:, g[0]:g[1], :, 0:W - s]
    out[:, g[1]:g[2], :, 0:W - s] = x[:, g[1]:g[2], :, s:W]
    out[:, g[2]:g[3], s:H, :] = x[:, g[2]:g[3], 0:H - s, :]
    out[:, g[3]:g[4], 0:H - s, :] = x[:, g[3]:g[4], s:H, :]
    out[:, g[4]:] = x[:, g[4]:]
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("H,W,C,shift,gamma", [(4, 4, 8, 1, 0.25), (3, 5, 10, 1, 0.25), (4, 6, 13, 2, 0.2),
                                               (2, 3, 7, 1, 0.25), (1, 1, 8, 1, 0.25)])
def test_q_shift_matches_official_formulation(H, W, C, shift, gamma):
    x = torch.randn(2, H * W, C)
    assert torch.equal(q_shift(x, H, W, shift, gamma), q_shift_channels_first(x, H, W, shift, gamma))


def test_q_shift_neighbours():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(1, 8, 2, 3)  # (B, C, H, W) with C = 8
    out = q_shift(x.flatten(2).transpose(1, 2), 2, 3).transpose(1, 2).reshape(1, 8, 2, 3)
    assert out[0, 0, 1, 2] == x[0, 0, 1, 1] and out[0, 0, 1, 0] == 0      # left neighbour, zero border
    assert out[0, 2, 1, 0] == x[0, 2, 1, 1] and out[0, 2, 1, 2] == 0      # right neighbour
    assert out[0, 4, 1, 2] == x[0, 4, 0, 2] and out[0, 4, 0, 2] == 0      # neighbour above
    assert out[0, 6, 0, 1] == x[0, 6, 1, 1] and out[0, 6, 1, 1] == 0      # neighbour below
    with pytest.raises(ValueError, match="grid"):
        q_shift(x.flatten(2).transpose(1, 2), 3, 3)


def test_fancy_init_matches_official_formulas():
    D, L = 12, 7
    for layer_id in (0, 3, 6):
        att = SpatialMix(D, L, layer_id, (2, 2))
        r01, r10 = layer_id / (L - 1), 1 - layer_id / L
        for h in range(D):
            assert att.spatial_decay[h].item() == pytest.approx(-5 + 8 * (h / (D - 1)) ** (0.7 + 1.3 * r01), abs=1e-6)
            assert att.spatial_first[h].item() == pytest.approx(math.log(0.3) + 0.5 * ((h + 1) % 3 - 1), abs=1e-6)
            assert att.spatial_mix_k[0, 0, h].item() == pytest.approx((h / D) ** r10, abs=1e-6)
            assert att.spatial_mix_v[0, 0, h].item() == pytest.approx((h / D) ** r10 + 0.3 * r01, abs=1e-6)
            assert att.spatial_mix_r[0, 0, h].item() == pytest.approx((h / D) ** (0.5 * r10), abs=1e-6)
    assert att.spatial_decay.min().item() == pytest.approx(-5) and att.spatial_decay.max().item() == pytest.approx(3)


def test_official_init_of_linears_and_embeddings():
    torch.manual_seed(0)
    m = tiny()
    for blk in m.all_blocks():
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0
        assert blk.att.key.bias is None and blk.ffn.value.bias is None
        bound = math.sqrt(6 / (32 + 32))  # xavier_uniform on the RWKV projections
        assert blk.att.key.weight.abs().max() <= bound and blk.att.key.weight.std() > bound / 3
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert m.time_embed.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    from backbones.layers import get_2d_sincos_pos_embed

    assert torch.allclose(m.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float())


def test_gradients_reach_rwkv_parameters():
    """Through the Bi-WKV custom op: with non-zero adaLN gates the decay/bonus parameters get finite gradients."""
    torch.manual_seed(0)
    m = tiny()
    for blk in m.all_blocks():
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.1)
    m(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(b.att.spatial_decay.grad.abs().sum() > 0 for b in m.all_blocks())
    assert all(b.att.spatial_first.grad.abs().sum() > 0 for b in m.all_blocks())


def test_bf16_autocast():
    torch.manual_seed(0)
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2]))
    out.float().square().mean().backward()
    assert torch.isfinite(m.final_layer.linear.weight.grad).all()


def test_unconditional_model_ignores_labels():
    torch.manual_seed(0)
    m = tiny(num_classes=0)
    torch.nn.init.normal_(m.final_layer.linear.weight)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert torch.equal(m(x, t, None), m(x, t, torch.tensor([5, 7])))


def test_token_mixer_registered():
    mixer = token_mixers()["bi_wkv"](64, 4, 8)
    assert isinstance(mixer, SpatialMix) and mixer.grid_size == (4, 8)
    assert mixer(torch.randn(2, 32, 64)).shape == (2, 32, 64)


def test_bad_configurations():
    with pytest.raises(ValueError, match="odd depth"):
        tiny(depth=4)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=4)
    with pytest.raises(ValueError, match="unknown size preset"):
        tiny(size="XL")
    with pytest.raises(ValueError, match="input_size=16"):
        tiny()(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="channel_gamma"):
        DRWKVBlock(8, 3, 0, (2, 2), channel_gamma=0.5)
