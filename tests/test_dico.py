"""DiCo backbone: published parameter totals and GMACs, structure, conditioning, input handling, token mixer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones import build, token_mixers
from backbones.dico import DiCo, DiCoBlock, split_depth
from backbones.layers import count_parameters
from bench.flops import forward_gmacs, gmacs_by_operator

# Official README / training logs (4 input channels, 1000 classes, learn_sigma). DiCo-H has no published count:
# 1,037,408,328 is what the official DiCo_H config (C=416, depths [14,12,10,12,14], mlp_ratio 4) gives; it
# matches the paper's "1B" / the reference note's computed 1,037.4M, and our S..XL totals are exact.
PARAMS = {"S": 33_137_672, "B": 129_992_712, "L": 463_897_992, "XL": 701_151_368, "H": 1_037_408_328}
# Official README GMACs at 256x256 (32x32x4 latent), batch 1; DiCo-H is the paper's 194.15.
GMACS = {"S": 4.25, "B": 16.88, "L": 60.24, "XL": 87.30, "H": 194.15}


def _small(**kw) -> DiCo:
    kw = dict(size="S", hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10, input_size=16) | kw
    return build("dico", **kw)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (a fresh model's zeroed adaLN/head would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("size", list(PARAMS))
def test_parameter_totals(size):
    with torch.device("meta"):
        model = build("dico", size=size, in_channels=4, num_classes=1000, learn_sigma=True)
    assert count_parameters(model) == PARAMS[size]


@pytest.mark.parametrize("size", ["S", "B"])
def test_gmacs_small(size):
    gmacs = forward_gmacs(build("dico", size=size), 32, 4)
    assert abs(gmacs / GMACS[size] - 1) < 0.01, gmacs


@pytest.mark.slow
@pytest.mark.parametrize("size", ["L", "XL", "H"])
def test_gmacs_large(size):
    gmacs = forward_gmacs(build("dico", size=size), 32, 4)
    assert abs(gmacs / GMACS[size] - 1) < 0.01, gmacs


@pytest.mark.slow
def test_gmacs_xl_512():
    gmacs = forward_gmacs(build("dico", size="XL"), 64, 4)  # paper: DiCo-XL at 512x512 is 349.78 GFLOPs
    assert abs(gmacs / 349.78 - 1) < 0.01, gmacs


def test_gmacs_count_depthwise_pooling_and_channel_attention():
    """Every conv (depthwise and the CCA's 1x1 on the pooled vector), the pooling and the LayerNorms are counted:
    exact per-operator totals for a tiny model on a rectangular 8x12 input, computed by hand."""
    C, H, W, r = 8, 8, 12, 2.0
    model = build("dico", size="S", hidden_size=C, depth=(1, 1, 1, 1, 1), mlp_ratio=r, num_classes=10,
                  input_size=8)
    # gmacs_by_operator feeds square inputs, so count the rectangular case through fvcore on our own inputs.
    from fvcore.nn import FlopCountAnalysis

    x = torch.randn(1, 4, H, W)
    fca = FlopCountAnalysis(model.eval(), (x, torch.tensor([5]), torch.tensor([1])))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    by_op = fca.by_operator()

    def block(w, hw):  # conv1 + depthwise + CCA conv (1 pixel) + conv3 + FFN
        return w * w * hw + 9 * w * hw + w * w + w * w * hw + 2 * int(r * w) * w * hw

    l1, l2, l3 = H * W, H * W // 4, H * W // 16
    conv = (4 * C * 9 * l1  # stem
            + block(C, l1) + C * (C // 2) * 9 * l1  # enc1, down1_2
            + block(2 * C, l2) + 2 * C * C * 9 * l2  # enc2, down2_3
            + block(4 * C, l3) + 4 * C * 8 * C * 9 * l3  # middle, up3_2
            + 4 * C * 2 * C * l2 + block(2 * C, l2)  # reduce_chan_level2, dec2
            + 2 * C * 4 * C * 9 * l2 + 2 * C * 2 * C * l1 + block(2 * C, l1)  # up2_1, reduce_chan_level1, dec1
            + 2 * C * 8 * 9 * l1)  # head
    pool = C * l1 + 2 * C * l2 + 4 * C * l3 + 2 * C * l2 + 2 * C * l1  # one GAP per block
    norm = 4 * (2 * C * l1 + 2 * 2 * C * l2 + 2 * 4 * C * l3 + 2 * 2 * C * l2 + 3 * 2 * C * l1)  # fvcore: 4/elt
    assert by_op["conv"] == conv
    assert by_op["adaptive_avg_pool2d"] == pool
    assert by_op["layer_norm"] == norm
    # And through the shared counter (square input): no unknown operator, pooling reported.
    assert gmacs_by_operator(model, 8, 4)["adaptive_avg_pool2d"] > 0


def test_structure_follows_official_layout():
    model = build("dico", size="S")
    C = 128
    assert [len(m) for m in (model.encoder_level_1, model.encoder_level_2, model.latent, model.decoder_level_2,
                             model.decoder_level_1)] == [5, 4, 4, 4, 4]
    assert model.encoder_level_1[0].conv1.in_channels == C
    assert model.latent[0].conv1.in_channels == 4 * C
    assert model.decoder_level_1[0].conv1.in_channels == 2 * C  # decoder level 1 runs at 2C
    assert model.decoder_level_1[0].conv4.out_channels == 2 * 2 * C  # mlp_ratio 2
    assert model.encoder_level_1[0].conv2.groups == C  # depthwise
    assert model.final_layer.out_proj.kernel_size == (3, 3) and model.final_layer.out_proj.in_channels == 2 * C
    assert model.reduce_chan_level1.weight.shape == (2 * C, 2 * C, 1, 1)
    assert model.arch == dict(size="S", patch=None, depth=21, width=C, depths=[5, 4, 4, 4, 4], mlp_ratio=2.0)
    # Official key names (label tables are renamed on load by a pre-hook).
    keys = set(model.state_dict())
    for k in ("x_embedder.proj.weight", "t_embedder_3.mlp.2.weight", "down1_2.body.0.weight",
              "up2_1.body.0.weight", "encoder_level_1.0.ca.1.weight", "latent.3.conv5.bias",
              "decoder_level_1.3.adaLN_modulation.1.weight", "final_layer.out_proj.weight"):
        assert k in keys, k


def test_decoder_level1_and_head_are_conditioned_on_c2():
    model = _small()
    seen = {}
    for name in ("decoder_level_1", "decoder_level_2", "encoder_level_1", "latent"):
        getattr(model, name)[0].adaLN_modulation.register_forward_hook(
            lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].shape[1]))
    model.final_layer.adaLN_modulation.register_forward_hook(
        lambda m, inp, out: seen.__setitem__("head", inp[0].shape[1]))
    model(torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert seen == {"encoder_level_1": 16, "latent": 64, "decoder_level_2": 32, "decoder_level_1": 32, "head": 32}


def test_fresh_model_outputs_exact_zero_and_shapes():
    torch.manual_seed(0)
    model = build("dico", size="S", num_classes=10)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), torch.tensor([3, 10])
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and out.is_contiguous()
    assert torch.equal(out, torch.zeros_like(out))
    small = _small(learn_sigma=False, in_channels=3)
    assert small(torch.randn(2, 3, 16, 16), t, y).shape == (2, 3, 16, 16)
    assert small.out_channels == 3 and _small().out_channels == 8


def test_any_size_divisible_by_four_and_clear_error_otherwise():
    model = _small()
    _randomize(model)
    t, y = torch.tensor([10, 500]), torch.tensor([0, 9])
    for hw in [(4, 4), (16, 16), (12, 20), (64, 32)]:
        assert model(torch.randn(2, 4, *hw), t, y).shape == (2, 8, *hw)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(2, 4, 30, 32), t, y)
    with pytest.raises(ValueError, match="divisible by 4"):
        build("dico", size="S", input_size=30)
    with pytest.raises(ValueError, match="no patch size"):
        build("dico", size="S", patch_size=2)
    with pytest.raises(ValueError, match="unknown size preset"):
        build("dico", size="XXL")


def test_depth_and_width_overrides():
    assert split_depth(21, (5, 4, 4, 4, 4)) == (5, 4, 4, 4, 4)
    for total, pattern in [(43, (9, 8, 9, 8, 9)), (46, (9, 9, 10, 9, 9)), (62, (14, 12, 10, 12, 14))]:
        assert split_depth(total, pattern) == pattern
    for total in range(5, 40):
        d = split_depth(total, (9, 9, 10, 9, 9))
        assert sum(d) == total and min(d) >= 1
    with torch.device("meta"):
        m = build("dico", size="XL", depth=23, hidden_size=64)
    assert m.arch["depth"] == 23 and m.arch["width"] == 64 and m.arch["size"] == "XL"
    with torch.device("meta"):
        m = build("dico", size="S", depth=[1, 2, 3, 2, 1])
    assert m.arch["depths"] == [1, 2, 3, 2, 1] and m.arch["depth"] == 9
    with pytest.raises(ValueError, match="at least one block per level"):
        build("dico", size="S", depth=3)
    with pytest.raises(ValueError, match="five per-level depths"):
        build("dico", size="S", depth=[1, 2])
    with pytest.raises(ValueError, match="even"):
        build("dico", size="S", hidden_size=15)


def _reference_block(block: DiCoBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """DiCoBlock written from the paper's equations in plain NCHW functional ops."""
    C = x.shape[1]
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    sh1, sc1, g1, sh2, sc2, g2 = (v[:, :, None, None] for v in mod.chunk(6, dim=1))

    def ln(z):
        mu = z.mean(1, keepdim=True)
        return (z - mu) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + 1e-6)

    h = ln(x) * (1 + sc1) + sh1
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias)
    h = F.gelu(F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1, groups=C))
    att = torch.sigmoid(F.conv2d(h.mean((2, 3), keepdim=True), block.ca[1].weight, block.ca[1].bias))
    x = x + g1 * F.conv2d(h * att, block.conv3.weight, block.conv3.bias)
    h = ln(x) * (1 + sc2) + sh2
    h = F.conv2d(F.gelu(F.conv2d(h, block.conv4.weight, block.conv4.bias)), block.conv5.weight, block.conv5.bias)
    return x + g2 * h


def test_block_matches_reference_float64():
    torch.manual_seed(0)
    block = DiCoBlock(12, mlp_ratio=2.0).double()
    _randomize(block)
    x, c = torch.randn(2, 12, 6, 10, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    ref = _reference_block(block, x, c)
    torch.testing.assert_close(block(x, c), ref, rtol=1e-12, atol=1e-12)
    block_cl = block.to(memory_format=torch.channels_last)
    torch.testing.assert_close(block_cl(x.contiguous(memory_format=torch.channels_last), c), ref,
                               rtol=1e-12, atol=1e-12)


def test_channels_last_matches_contiguous_float64():
    torch.manual_seed(0)
    a, b = _small(channels_last=True).double().eval(), _small(channels_last=False).double().eval()
    _randomize(a)
    b.load_state_dict(a.state_dict())
    assert a.x_embedder.proj.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = torch.randn(3, 4, 16, 12, dtype=torch.float64), torch.tensor([1, 400, 999]), torch.tensor([0, 5, 10])
    out = a(x, t, y)
    assert out.abs().mean() > 0.1  # the whole network contributes, not a zero head
    torch.testing.assert_close(out, b(x, t, y), rtol=1e-10, atol=1e-10)


def test_conditioning_and_labels_reach_all_tables_undropped():
    model = _small(class_dropout_prob=0.5)
    _randomize(model)
    x = torch.randn(2, 4, 8, 8)
    model.eval()  # eval: no dropout; labels and timesteps both change the output
    base = model(x, torch.tensor([10, 10]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([10, 10]), torch.tensor([2, 2])))
    assert not torch.allclose(base, model(x, torch.tensor([900, 900]), torch.tensor([1, 1])))
    seen = []
    for i in (1, 2, 3):
        getattr(model, f"y_embedder_{i}").embedding_table.register_forward_hook(
            lambda m, inp, out: seen.append(inp[0].clone()))
    model.train()
    torch.manual_seed(0)
    y = torch.arange(64) % 11  # null class 10 included: the table has its row
    model(torch.randn(64, 4, 4, 4), torch.randint(0, 1000, (64,)), y)
    # p = 0.5, yet every table sees exactly the given labels: the trainer drops them, once, before the forward
    assert all(torch.equal(s, y) for s in seen) and len(seen) == 3


def test_forward_with_cfg():
    model = _small()
    _randomize(model)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    xx, t, y = torch.cat([x, x]), torch.tensor([50, 60, 50, 60]), torch.tensor([3, 4, 10, 10])
    out = model.forward_with_cfg(xx, t, y, cfg_scale=4.0)
    full = model(xx, t, y)
    guided = full[2:, :4] + 4.0 * (full[:2, :4] - full[2:, :4])
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out[:2, :4], guided)
    torch.testing.assert_close(out[2:, :4], guided)
    torch.testing.assert_close(out[:, 4:], full[:, 4:])
    out3 = model.forward_with_cfg(xx, t, y, cfg_scale=4.0, guided_channels=3)  # official DiCo/DiT variant
    torch.testing.assert_close(out3[:2, 3:4], full[:2, 3:4])


def test_loads_official_key_names():
    model = _small()
    _randomize(model)
    state = model.state_dict()
    official = {(f"y_embedder.embedding_table_{int(k[11]) - 1}.weight" if k.startswith("y_embedder_") else k): v
                for k, v in state.items()}
    assert "y_embedder.embedding_table_2.weight" in official
    fresh = _small()
    fresh.load_state_dict(official, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_token_mixer_registered():
    factory = token_mixers()["dico_conv"]
    mixer = factory(16, 4, 6)
    _randomize(mixer)
    x = torch.randn(2, 24, 16)
    out = mixer(x)
    assert out.shape == x.shape
    # Same as the ConvMixer on the row-major grid.
    grid = x.reshape(2, 4, 6, 16).permute(0, 3, 1, 2).contiguous()
    ref = mixer.mixer(grid).permute(0, 2, 3, 1).reshape(2, 24, 16)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="tokens"):
        mixer(torch.randn(2, 25, 16))


@pytest.mark.parametrize("grid", [8, 16])
def test_token_mixer_cost_is_linear_in_tokens(grid):
    """Two 1x1 convs, a 3x3 depthwise conv and the pooling per token; the CCA's CxC conv once per image."""
    from fvcore.nn import FlopCountAnalysis

    w, T = 32, grid * grid
    mixer = token_mixers()["dico_conv"](w, grid, grid)
    fca = FlopCountAnalysis(mixer, (torch.randn(1, T, w),))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    assert fca.total() == T * (2 * w * w + 9 * w + w) + w * w
