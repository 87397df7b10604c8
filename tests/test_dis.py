"""DiS backbone: exact parameter counts and MACs (closed formulas), official init, the bidirectional Mamba v2 mixer
and the whole forward against float64 transcriptions of the official code (feizc/DiS models_dis.py with its bundled
mamba_ssm; written here independently of backbones.kernels), official names, CFG and the shared trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import train_config

from backbones import build, token_mixers
from backbones.dis import DIS_PRESETS, DiS, PlainFinalLayer, load_official_checkpoint
from backbones.layers import FinalLayer
from bench.flops import gmacs_by_operator

N_STATE, D_CONV = 16, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (seconds per test on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Closed formulas
# ----------------------------------------------------------------------------------------------------------------
def dis_params(D: int, depth: int, p: int, c_in: int, num_classes: int, T: int, learn_sigma: bool = True) -> int:
    """Term by term as in models_dis.py (DisModel + bundled Mamba v2); K = 2 (depth//2) + 1 blocks."""
    E, R, N, W = 2 * D, math.ceil(D / 16), N_STATE, D_CONV
    c_out = 2 * c_in if learn_sigma else c_in
    cond = num_classes > 0
    direction = E * W + E + E * (R + 2 * N) + R * E + E + E * N + E  # conv1d(+bias), x_proj, dt_proj(+bias), A_log, D
    mixer = D * 2 * E + 2 * direction + E * D                        # in_proj, two directions, out_proj (no biases)
    block = mixer + D                                                # + RMSNorm weight
    assert block == 6 * D * D + 2 * E * (2 * R + 3 * N + W + 3) + D
    K = 2 * (depth // 2) + 1
    return (K * block + (depth // 2) * (2 * D * D + D)               # blocks, skip_linear of every out-block
            + p * p * c_in * D + D + (T + 1 + cond) * D              # patch embedding, pos_embed over all tokens
            + D * 4 * D + 4 * D + 4 * D * D + D                      # time_embed Linear(D,4D) SiLU Linear(4D,D)
            + (num_classes + 1) * D * cond                           # label table with the CFG null row
            + D                                                      # norm_f (RMSNorm)
            + (2 * D * D + 2 * D) * cond                             # final adaLN (conditional only)
            + D * p * p * c_out + p * p * c_out)                     # final linear


# ImageNet-256 latents (32x32x4), 1000 classes, learn_sigma. The /2 counts equal the issue's, computed from the
# official structure: S/2 29,132,752, B/2 121,163,552, L/2 407,249,952, H/2 906,966,560.
EXACT_PARAMS = {
    ("S", 2): 29_132_752, ("S", 4): 29_115_184,
    ("B", 2): 121_163_552, ("B", 4): 121_126_784,
    ("M", 2): 231_414_560, ("M", 4): 231_377_792,
    ("L", 2): 407_249_952, ("L", 4): 407_200_896,
    ("H", 2): 906_966_560, ("H", 4): 906_892_928,
}
OFFICIAL_SHAPES = {"S": (24, 368), "B": (24, 768), "M": (48, 768), "L": (48, 1024), "H": (48, 1536)}  # depth, D


def meta_model(**kw) -> DiS:
    with torch.device("meta"):
        return build("dis", **kw)


@pytest.mark.parametrize("size,patch", list(EXACT_PARAMS))
def test_parameter_counts(size, patch):
    m = meta_model(size=size, patch_size=patch, input_size=32, in_channels=4, num_classes=1000)
    assert (m.arch["depth"], m.arch["width"]) == OFFICIAL_SHAPES[size]
    assert len(m.all_blocks()) == m.arch["depth"] + 1  # even official depths run depth + 1 blocks
    n = sum(p.numel() for p in m.parameters())
    assert n == EXACT_PARAMS[size, patch] == dis_params(*OFFICIAL_SHAPES[size][::-1], patch, 4, 1000,
                                                       (32 // patch) ** 2)


def test_unconditional_pixel_count():
    """CIFAR-10 pixels, unconditional S/2 (official num_classes=-1): no label table, no final adaLN, one extra."""
    m = meta_model(size="S", patch_size=2, input_size=32, in_channels=3, num_classes=0)
    assert m.label_emb is None and isinstance(m.final_layer, PlainFinalLayer) and m.pos_embed.shape[1] == 257
    assert sum(p.numel() for p in m.parameters()) == dis_params(368, 24, 2, 3, 0, 256)


def dis_macs(D: int, depth: int, p: int, c_in: int, c_out: int, T: int, cond: bool) -> dict[str, int]:
    """The module docstring's formula, per operator (batch 1)."""
    E, R, N, W = 2 * D, math.ceil(D / 16), N_STATE, D_CONV
    K, S = 2 * (depth // 2) + 1, T + 1 + cond
    linear = K * S * (6 * D * D + 4 * E * (R + N)) + (depth // 2) * S * 2 * D * D
    linear += T * p * p * c_out * D + 8 * D * D + 2 * D * D * cond
    return {"linear": linear, "conv": T * p * p * c_in * D, "causal_conv1d": K * S * 2 * E * W,
            "selective_scan": K * S * 2 * E * (4 * N + 3), "layer_norm": 4 * T * D}


@pytest.mark.parametrize("num_classes", [10, 0])
def test_gmacs_formula(num_classes):
    torch.manual_seed(0)
    m = build("dis", size="S", depth=4, hidden_size=48, patch_size=2, input_size=8, in_channels=3,
              num_classes=num_classes)
    by_op = gmacs_by_operator(m, 8, 3)
    expected = dis_macs(48, 4, 2, 3, 6, 16, num_classes > 0)
    assert set(by_op) == set(expected) | {"einsum"}  # einsum: the shared unpatchify's permutation
    for op, macs in expected.items():
        assert by_op[op] * 1e9 == pytest.approx(macs, rel=1e-12), op


# ImageNet-256 latents, forward GMACs from the formula (the README's figures; no published GMACs compared)
GMACS_256 = {"S": 7.50, "B": 30.44, "M": 59.79, "L": 104.51, "H": 231.13}


def test_gmacs_of_the_presets_at_256():
    for size, (depth, D) in OFFICIAL_SHAPES.items():
        assert sum(dis_macs(D, depth, 2, 4, 8, 256, True).values()) / 1e9 == pytest.approx(GMACS_256[size], abs=5e-3)


@pytest.mark.slow
def test_gmacs_s2_counted():
    """DiS-S/2 at 32x32x4 through bench.flops equals the formula (about 10 s of tracing)."""
    from bench.flops import build_for_counting

    by_op = gmacs_by_operator(build_for_counting("dis", size="S", patch_size=2, input_size=32, in_channels=4), 32, 4)
    for op, macs in dis_macs(368, 24, 2, 4, 8, 256, True).items():
        assert by_op[op] * 1e9 == pytest.approx(macs, rel=1e-12), op
    assert sum(by_op.values()) == pytest.approx(GMACS_256["S"], abs=5e-3)


# ----------------------------------------------------------------------------------------------------------------
# Float64 transcription of the official forward (models_dis.py DisModel, fused add+RMSNorm path, and mamba_simple
# Mamba v2 fast path: mamba_inner_fn_no_out_proj twice, summed), reading tensors by their official names
# ----------------------------------------------------------------------------------------------------------------
def ref_conv_silu(x, w, b):
    """causal_conv1d_fn(x, w (E, 1, W), b, "silu"): left zero padding W - 1, tap k reads x[t - (W - 1) + k]."""
    W, L = w.shape[-1], x.shape[-1]
    xp = F.pad(x, (W - 1, 0))
    return F.silu(b[:, None] + sum(w[:, 0, k, None] * xp[..., k:k + L] for k in range(W)))


def ref_scan(u, delta, A, B, C, D, z, delta_bias):
    """selective_scan_ref with delta_softplus=True, token by token."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[-1]):
        h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]
        ys.append((h * C[:, None, :, i]).sum(-1))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)


def ref_inner(sd, pre, sfx, xz):
    """mamba_inner_fn_no_out_proj: conv, x_proj split (dt, B, C), dt_proj, scan gated by z; xz (b, 2E, l)."""
    b, _, L = xz.shape
    x, z = xz.chunk(2, dim=1)
    dt_w = sd[f"{pre}dt_proj{sfx}.weight"]
    R, N = dt_w.shape[1], sd[f"{pre}A{sfx}_log"].shape[1]
    x = ref_conv_silu(x, sd[f"{pre}conv1d{sfx}.weight"], sd[f"{pre}conv1d{sfx}.bias"])
    x_dbl = x.permute(0, 2, 1).reshape(b * L, -1) @ sd[f"{pre}x_proj{sfx}.weight"].T  # (b l, R + 2N)
    delta = (dt_w @ x_dbl[:, :R].T).reshape(-1, b, L).permute(1, 0, 2)               # d (b l) -> b d l
    B = x_dbl[:, R:R + N].reshape(b, L, N).permute(0, 2, 1)
    C = x_dbl[:, -N:].reshape(b, L, N).permute(0, 2, 1)
    A = -torch.exp(sd[f"{pre}A{sfx}_log"])
    return ref_scan(x, delta, A, B, C, sd[f"{pre}D{sfx}"], z, sd[f"{pre}dt_proj{sfx}.bias"])


def ref_mixer(sd, pre, h):
    """Mamba.forward, bimamba_type v2, fast path, no if_divide_out: out_proj(y + flip(y_b of the flipped xz))."""
    b, L, D = h.shape
    xz = (sd[f"{pre}in_proj.weight"] @ h.reshape(b * L, D).T).reshape(-1, b, L).permute(1, 0, 2)
    y = ref_inner(sd, pre, "", xz) + ref_inner(sd, pre, "_b", xz.flip(-1)).flip(-1)
    return y.permute(0, 2, 1) @ sd[f"{pre}out_proj.weight"].T


def ref_rms(x, w, eps=1e-5):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * w


def ref_dis(sd, x, t, y, depth, p, c_out):
    """DisModel.forward in eval mode (drop paths off)."""
    lin = lambda v, name: v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    D = sd["pos_embed"].shape[-1]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    half = D // 2
    # the official embedding is float32 whatever the model's dtype
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1).double()
    time = lin(F.silu(lin(temb, "time_embed.0")), "time_embed.2")
    cond = "label_emb.embedding_table.weight" in sd
    h = torch.cat([time[:, None], tok], 1)
    if cond:
        label = sd["label_emb.embedding_table.weight"][y]
        h = torch.cat([label[:, None], h], 1)
    h = h + sd["pos_embed"]
    residual, skips = None, []

    def block(pre, h, residual, skip=None):
        if skip is not None:
            h = lin(torch.cat([h, skip], -1), f"{pre}skip_linear")
        residual = h if residual is None else residual + h
        return ref_mixer(sd, f"{pre}mixer.", ref_rms(residual, sd[f"{pre}norm.weight"])), residual

    for i in range(depth // 2):
        h, residual = block(f"in_blocks.{i}.", h, residual)
        skips.append(h)
    h, residual = block("mid_block.", h, residual)
    for i in range(depth // 2):
        h, residual = block(f"out_blocks.{i}.", h, residual, skips.pop())
    h = ref_rms(residual + h, sd["norm_f.weight"])
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    if cond:
        shift, scale = lin(F.silu(time + label), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
        h = h * (1 + scale[:, None]) + shift[:, None]
    out = lin(h, "final_layer.linear")[:, 2 if cond else 1:]
    g = int(math.isqrt(out.shape[1]))
    out = out.reshape(-1, g, g, p, p, c_out)  # B (h w) (p1 p2 C) -> B C (h p1) (w p2)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(-1, c_out, g * p, g * p)


def official_shapes(D: int, depth: int, p: int, c_in: int, c_out: int, T: int, num_classes: int) -> dict:
    """Names and shapes of the official DisModel state_dict, enumerated from models_dis.py / mamba_simple.py."""
    E, R, N, W = 2 * D, math.ceil(D / 16), N_STATE, D_CONV
    cond = num_classes > 0
    s = {"patch_embed.proj.weight": (D, c_in, p, p), "patch_embed.proj.bias": (D,),
         "time_embed.0.weight": (4 * D, D), "time_embed.0.bias": (4 * D,),
         "time_embed.2.weight": (D, 4 * D), "time_embed.2.bias": (D,),
         "pos_embed": (1, T + 1 + cond, D), "norm_f.weight": (D,),
         "final_layer.linear.weight": (p * p * c_out, D), "final_layer.linear.bias": (p * p * c_out,)}
    if cond:
        s["label_emb.embedding_table.weight"] = (num_classes + 1, D)
        s["final_layer.adaLN_modulation.1.weight"] = (2 * D, D)
        s["final_layer.adaLN_modulation.1.bias"] = (2 * D,)
    blocks = [f"in_blocks.{i}." for i in range(depth // 2)] + ["mid_block."]
    blocks += [f"out_blocks.{i}." for i in range(depth // 2)]
    for pre in blocks:
        s[pre + "norm.weight"] = (D,)
        s[pre + "mixer.in_proj.weight"] = (2 * E, D)
        s[pre + "mixer.out_proj.weight"] = (D, E)
        for sfx in ("", "_b"):
            s[f"{pre}mixer.conv1d{sfx}.weight"] = (E, 1, W)
            s[f"{pre}mixer.conv1d{sfx}.bias"] = (E,)
            s[f"{pre}mixer.x_proj{sfx}.weight"] = (R + 2 * N, E)
            s[f"{pre}mixer.dt_proj{sfx}.weight"] = (E, R)
            s[f"{pre}mixer.dt_proj{sfx}.bias"] = (E,)
            s[f"{pre}mixer.A{sfx}_log"] = (E, N)
            s[f"{pre}mixer.D{sfx}"] = (E,)
        if pre.startswith("out_blocks"):
            s[pre + "skip_linear.weight"] = (D, 2 * D)
            s[pre + "skip_linear.bias"] = (D,)
    return s


def official_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names, in the ranges trained weights take (A_log near log n, softplus(dt
    bias) ~ 0.01, norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        if k.endswith("_log"):
            v = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float64)) + 0.1 * v
        elif k.endswith(("norm.weight", "norm_f.weight")):
            v = 1 + 0.1 * v
        elif ".dt_proj" in k and k.endswith("bias"):
            v = -4.6 + 0.5 * v
        elif k.split(".")[-1] in ("D", "D_b"):
            v = 1 + 0.1 * v
        else:
            v = v / math.sqrt(shape[-1] if len(shape) > 1 else 16)
        sd[k] = v
    return sd


@pytest.mark.parametrize("num_classes", [10, 0])
def test_official_state_dict_loads_and_forward_equals_official_transcription(num_classes):
    kw = dict(size="S", depth=4, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=num_classes)
    shapes = official_shapes(32, 4, 2, 3, 6, 16, num_classes)
    model = build("dis", **kw).double().eval()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes  # official names and shapes
    sd = official_state_dict(shapes)
    load_official_checkpoint(model, sd)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3, 871])
    y = torch.tensor([4, 10]) if num_classes else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref_dis(sd, x, t, y, 4, 2, 6), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unconditional" if num_classes else "class-conditional"):
        other = official_shapes(32, 4, 2, 3, 6, 16, 0 if num_classes else 10)
        load_official_checkpoint(model, official_state_dict(other))


def test_bimamba_v2_equals_official_transcription_float64():
    torch.manual_seed(0)
    mixer = token_mixers()["bi_mamba"](40, 3, 5).double()  # D 40: dt_rank ceil(40/16) = 3, E 80
    with torch.no_grad():  # move off the init (D = 1, equal directions) so every term shows
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, 15, 40, dtype=torch.float64)
    sd = {f"m.{k}": v for k, v in mixer.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(mixer(h), ref_mixer(sd, "m.", h), rtol=1e-10, atol=1e-12)
        mixer.divide_out = True  # Vim's if_divide_out (not DiS's): the summed directions halved
        torch.testing.assert_close(mixer(h), 0.5 * ref_mixer(sd, "m.", h), rtol=1e-10, atol=1e-12)


def test_bimamba_is_bidirectional():
    """The first token's output depends on the last token (backward scan) and the last on the first (forward)."""
    torch.manual_seed(0)
    mixer = token_mixers()["bi_mamba"](32, 4, 4)
    x = torch.randn(1, 16, 32, requires_grad=True)
    out = mixer(x)
    (g_first,) = torch.autograd.grad(out[:, 0].sum(), x, retain_graph=True)
    (g_last,) = torch.autograd.grad(out[:, -1].sum(), x)
    assert g_first[:, -1].abs().max() > 1e-6 and g_last[:, 0].abs().max() > 1e-6
    # each direction alone is causal: the forward scan's output at token 0 sees token 0 only
    x2 = x.detach().clone()
    x2[:, 1:] += 1.0
    with torch.no_grad():
        fwd, fwd2 = (mixer._direction(mixer.in_proj(v).transpose(1, 2), mixer.conv1d, mixer.x_proj, mixer.dt_proj,
                                      mixer.A_log, mixer.D) for v in (x.detach(), x2))
    torch.testing.assert_close(fwd[..., 0], fwd2[..., 0])
    assert (fwd[..., 1:] - fwd2[..., 1:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Official initialisation
# ----------------------------------------------------------------------------------------------------------------
def test_official_init():
    torch.manual_seed(0)
    D, depth = 64, 24
    m = build("dis", size="S", hidden_size=D, patch_size=4, input_size=16, in_channels=4, num_classes=10)
    E, R = 2 * D, math.ceil(D / 16)
    blocks = m.all_blocks()
    assert len(blocks) == 25 and m.depth == depth
    log_n = torch.log(torch.arange(1, N_STATE + 1, dtype=torch.float32)).expand(E, N_STATE)
    dts, dt_w = [], []
    for blk in blocks:
        mx = blk.mixer
        for sfx in ("", "_b"):
            assert torch.equal(getattr(mx, f"A{sfx}_log").data, log_n)  # S4D-real A = -(1..N)
            assert torch.equal(getattr(mx, f"D{sfx}").data, torch.ones(E))
            dts.append(F.softplus(getattr(mx, f"dt_proj{sfx}").bias.detach()))
            dt_w.append(getattr(mx, f"dt_proj{sfx}").weight.detach())
            assert getattr(mx, f"conv1d{sfx}").bias.abs().max() > 0  # conv biases keep PyTorch's init
        assert mx.in_proj.bias is None and mx.out_proj.bias is None
        bound = 1 / math.sqrt(E) / math.sqrt(depth)  # kaiming_uniform(a=sqrt 5) / sqrt(n_layer), n_layer = depth
        assert 0.95 * bound < mx.out_proj.weight.abs().max() <= bound
        assert mx.in_proj.weight.abs().max() > 0.95 / math.sqrt(D)  # not rescaled
        assert torch.equal(blk.norm.weight.data, torch.ones(D))
    dt = torch.cat(dts)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)  # softplus(bias) in [dt_min, dt_max]
    assert dt.min() < 1.2e-3 and dt.max() > 0.09  # spread over the range ...
    assert dt.log().mean().item() == pytest.approx(math.log(1e-2), abs=0.05)  # ... log-uniformly (6400 draws)
    w = torch.cat([v.flatten() for v in dt_w])
    assert w.abs().max() <= R ** -0.5 and w.abs().max() > 0.99 * R ** -0.5  # U(+-dt_rank^-0.5)
    dt_projs = {id(mod) for blk in blocks for mod in blk.mixer.dt_projections()}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None and id(mod) not in dt_projs:
            assert torch.count_nonzero(mod.bias) == 0, name
    assert torch.count_nonzero(m.pos_embed) == 0  # learned, left at zero by the official init
    assert m.label_emb.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert isinstance(m.final_layer, FinalLayer) and m.final_layer.linear.weight.abs().max() > 0  # not zero-init
    assert m.no_weight_decay() == {"pos_embed"} | {n for n, _ in m.named_parameters() if n.endswith("_log")}


def test_structure_drop_path_and_skip_pairing():
    """depth//2 in-blocks, mid, depth//2 out-blocks with skip_linear; rates [0] + linspace(0, r, depth); out-block j
    fuses cat([its input, the MIXER output of in-block depth//2-1-j])."""
    torch.manual_seed(0)
    m = build("dis", size="S", depth=6, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=10,
              drop_path_rate=0.2)
    assert [b.skip_linear is not None for b in m.all_blocks()] == [False] * 4 + [True] * 3
    assert [b.drop_path for b in m.all_blocks()] == pytest.approx([0.0] + [0.2 * i / 5 for i in range(6)])
    assert m.arch == dict(size="S", patch=2, depth=6, width=32, heads=None)
    outs, skips = {}, {}
    for i, b in enumerate(m.in_blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out[0]))
    for j, b in enumerate(m.out_blocks):
        b.skip_linear.register_forward_hook(lambda mod, inp, out, j=j: skips.__setitem__(j, inp[0]))
    m.eval()(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1]))
    for j in range(3):
        assert torch.equal(skips[j][..., 32:], outs[2 - j])
    m.train()
    torch.manual_seed(1)
    a = m(torch.zeros(2, 3, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1]))
    torch.manual_seed(2)
    assert not torch.equal(a, m(torch.zeros(2, 3, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1])))  # drop path


# ----------------------------------------------------------------------------------------------------------------
# Interface: shapes, CFG, errors, token mixer
# ----------------------------------------------------------------------------------------------------------------
def tiny(**kw) -> DiS:
    cfg = dict(size="S", depth=2, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=10)
    cfg.update(kw)
    return build("dis", **cfg)


def test_shapes_cfg_and_errors():
    torch.manual_seed(0)
    m = tiny().eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    out = m(x, t, y)
    assert out.shape == (3, 6, 8, 8) and m.out_channels == 6 and torch.isfinite(out).all()
    assert tiny(learn_sigma=False)(x, t, y).shape == (3, 3, 8, 8)
    assert tiny(num_classes=0)(x, t).shape == (3, 6, 8, 8)
    assert tiny(patch_size=4)(x, t, y).shape == (3, 6, 8, 8)
    # CFG through the shared forward_with_cfg: 2B batch, second half the null label, all in_channels guided
    xx, tt, yy = torch.cat([x[:2], x[:2]]), torch.tensor([7, 9, 7, 9]), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        guided = m.forward_with_cfg(xx, tt, yy, 4.0)
        raw = m(xx, tt, yy)
    eps = raw[2:, :3] + 4.0 * (raw[:2, :3] - raw[2:, :3])
    torch.testing.assert_close(guided[:, :3], torch.cat([eps, eps]))
    torch.testing.assert_close(guided[:, 3:], raw[:, 3:])
    with pytest.raises(ValueError, match="no attention heads"):
        tiny(num_heads=4)
    with pytest.raises(ValueError, match="unknown size preset"):
        tiny(size="XL")
    with pytest.raises(ValueError, match="pass labels"):
        m(x, t)
    assert set(DIS_PRESETS) == {"S", "B", "M", "L", "H", "cpu"}
    mixer = token_mixers()["bi_mamba"](32, 2, 8)
    assert mixer(torch.randn(2, 16, 32)).shape == (2, 16, 32)


def test_trains_through_the_shared_trainer_fp32_and_bf16(tmp_path):
    """Two optimisation steps of a tiny DiS on digits: every parameter receives a gradient and moves; a bf16
    autocast step (mixed dtypes into the conv and scan kernels) gives the fp32 loss within 1e-2."""
    from diffusion.trainer import build_run, train_step

    backbone = {"name": "dis", "size": "S", "depth": 2, "hidden_size": 32, "drop_path_rate": 0.0}
    losses = {}
    for precision in ("fp32", "bf16"):
        run = build_run(train_config(tmp_path / precision, ["device=cpu", f"train.precision={precision}", "threads=1"],
                                     backbone))
        before = {k: v.detach().clone() for k, v in run.model.named_parameters()}
        losses[precision] = [train_step(run)["loss"] for _ in range(2)]
        if precision == "fp32":
            frozen = [k for k, v in run.model.named_parameters() if torch.equal(v.detach(), before[k])]
            assert not frozen, frozen
    assert all(math.isfinite(v) for v in losses["fp32"] + losses["bf16"])
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=1e-2)
