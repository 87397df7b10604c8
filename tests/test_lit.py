"""LiT: linear attention vs a float64 T x T reference, O(T) intermediates, parameter and GMAC counts from lit.md,
weight inheritance from DiT, and the hybrid distillation loss / teacher loading in diffusion.distill."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import backbones
from backbones.layers import count_parameters
from backbones.lit import LIT_PRESETS, LinearAttention, inherit_from_dit
from bench.flops import forward_gmacs, gmacs_by_operator
from diffusion.distill import hybrid_distillation_loss, load_teacher, teacher_output

TINY = dict(depth=2, hidden_size=64, input_size=8, patch_size=2, num_classes=10)


def _attn_key(k: str) -> bool:
    return ".attn." in k


def _perturbed_dit(seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny DiT whose every tensor is random (not its init), so that inherited values are recognisable."""
    torch.manual_seed(seed)
    dit = backbones.build("dit", size="S", num_heads=4, **{**TINY, **kw})
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p))
    return dit


# ----------------------------------------------------------------------------------------------------------------
# Linear attention
# ----------------------------------------------------------------------------------------------------------------
def _reference_linear_attention(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Direct T x T form: O_i = sum_j (phi(q_i).phi(k_j)) v_j / sum_j phi(q_i).phi(k_j), + per-head DWC(V)."""
    B, T, D = x.shape
    h, d = m.num_heads, m.head_dim
    gh, gw = m.grid_size
    q = torch.relu(F.linear(x, m.q.weight, m.q.bias)) + m.eps
    kv = F.linear(x, m.kv.weight, m.kv.bias)
    k, v = torch.relu(kv[..., :D]) + m.eps, kv[..., D:]
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            A = q[b, :, sl] @ k[b, :, sl].T                                   # (T, T) similarities
            attn = (A @ v[b, :, sl]) / (A.sum(-1, keepdim=True) + T * m.eps)  # the module's eps, in sum form
            v_img = v[b, :, sl].T.reshape(1, d, gh, gw)
            local = F.conv2d(v_img, m.dwc.weight, m.dwc.bias, padding=m.dwc.padding, groups=d)  # same conv per head
            out[b, :, sl] = attn + local.reshape(d, T).T
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("heads,grid", [(1, (4, 4)), (2, (3, 5)), (4, (6, 2))])
def test_linear_attention_matches_quadratic_reference_float64(heads, grid):
    torch.manual_seed(0)
    m = LinearAttention(32, heads, grid).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, grid[0] * grid[1], 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference_linear_attention(m, x), rtol=1e-10, atol=1e-10)


def test_dwc_is_shared_across_heads_and_sized_by_head_dim():
    m = LinearAttention(384, 2, (16, 16))
    assert tuple(m.dwc.weight.shape) == (192, 1, 5, 5) and tuple(m.dwc.bias.shape) == (192,)
    assert {n for n, _ in m.named_parameters()} == {"q.weight", "q.bias", "kv.weight", "kv.bias", "dwc.weight",
                                                      "dwc.bias", "proj.weight", "proj.bias"}


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def test_no_token_by_token_intermediate_forward_and_backward():
    T = 32 * 32
    m = LinearAttention(32, 2, (32, 32))
    x = torch.randn(1, T, 32, requires_grad=True)
    with _ShapeRecorder() as rec:
        m(x).sum().backward()
    assert rec.shapes and max(s.count(T) for s in rec.shapes) <= 1
    assert max(torch.Size(s).numel() for s in rec.shapes) < T * 32 * 3  # O(T D): largest is the kv projection


def test_bf16_autocast_keeps_the_token_sums_in_float32():
    torch.manual_seed(0)
    m = LinearAttention(64, 2, (16, 16))
    x = torch.randn(2, 256, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x), rtol=0.05, atol=0.05)


def test_wrong_token_count_and_heads_are_clear_errors():
    m = LinearAttention(32, 2, (4, 4))
    with pytest.raises(ValueError, match="4x4 token grid"):
        m(torch.randn(1, 15, 32))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        LinearAttention(30, 4, 4)


def test_token_mixer_registered():
    mixer = backbones.token_mixers()["linear_attention"](384, 8, 16)
    assert isinstance(mixer, LinearAttention) and mixer.num_heads == 2
    assert mixer(torch.randn(2, 128, 384)).shape == (2, 128, 384)


# ----------------------------------------------------------------------------------------------------------------
# Backbone: presets, names, parameters, GMACs
# ----------------------------------------------------------------------------------------------------------------
def test_presets_heads_and_forward():
    assert {k: v["num_heads"] for k, v in LIT_PRESETS.items()} == {"S": 2, "B": 3, "L": 4, "XL": 4, "cpu": 2}
    torch.manual_seed(0)
    m = backbones.build("lit", size="S", **TINY)
    assert m.arch == dict(size="S", patch=2, depth=2, width=64, heads=2, kernel_size=5)
    assert (m.in_channels, m.out_channels, m.learn_sigma, m.input_size) == (4, 8, True, 8)
    x = torch.randn(3, 4, 8, 8)
    out = m(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8) and torch.isfinite(out).all()
    m.eval()
    cfg = m.forward_with_cfg(torch.cat([x[:1], x[:1]]), torch.tensor([5, 5]), torch.tensor([3, 10]), 4.0)
    assert cfg.shape == (2, 8, 8, 8)
    assert backbones.build("lit", size="S", learn_sigma=False, **TINY)(x, torch.tensor([1, 2, 3]),
                                                                     torch.tensor([0, 1, 2])).shape == (3, 4, 8, 8)


# Exact totals; lit.md section 2 rounds them to 33.02M, 130.59M, 458.26M, 675.34M, 676.22M.
EXPECTED_PARAMS = {("S", 32): 33_023_264, ("B", 32): 130_592_288, ("L", 32): 458_262_560,
                   ("XL", 32): 675_339_296, ("XL", 64): 676_224_032}


@pytest.mark.parametrize("size,input_size", list(EXPECTED_PARAMS))
def test_parameter_counts_match_lit_md(size, input_size):
    with torch.device("meta"):
        lit = backbones.build("lit", size=size, patch_size=2, input_size=input_size)
        dit = backbones.build("dit", size=size, patch_size=2, input_size=input_size)
    n = count_parameters(lit)
    assert n == EXPECTED_PARAMS[(size, input_size)]
    # Only the DWC is new: d*25 weights + d biases per block (separate q/kv hold exactly DiT's qkv parameters).
    d = LIT_PRESETS[size]["hidden_size"] // LIT_PRESETS[size]["num_heads"]
    assert n - count_parameters(dit) == LIT_PRESETS[size]["depth"] * 26 * d


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_every_non_attention_name_and_shape_equals_dit(size, patch):
    with torch.device("meta"):
        lit = backbones.build("lit", size=size, patch_size=patch).state_dict()
        dit = backbones.build("dit", size=size, patch_size=patch).state_dict()
    lit_rest = {k: v.shape for k, v in lit.items() if not _attn_key(k)}
    assert lit_rest == {k: v.shape for k, v in dit.items() if not _attn_key(k)}
    assert {k.split(".attn.")[1] for k in lit if _attn_key(k)} == {
        "q.weight", "q.bias", "kv.weight", "kv.bias", "dwc.weight", "dwc.bias", "proj.weight", "proj.bias"}


def _attention_macs(T: int, D: int, d: int, k: int = 5) -> int:
    """The linear-attention core per block (LinearAttention docstring): T D (2d + 1 + k^2)."""
    return T * D * (2 * d + 1 + k * k)


def test_gmacs_of_linear_attention_by_hand_against_counter():
    """Counter vs closed form on a small model: matmuls = depth T D (2d+1); conv = patch embed + depth 25 T D;
    and LiT - DiT = depth (T D (2d+1+25) - 2 T^2 D) exactly (the projections cost the same)."""
    cfg = dict(size="S", depth=2, hidden_size=96, input_size=16, patch_size=2, num_classes=10)
    lit = backbones.build("lit", num_heads=3, **cfg)
    dit = backbones.build("dit", num_heads=3, **cfg)
    T, D, d, depth = 64, 96, 32, 2
    by_op = gmacs_by_operator(lit, 16, 4)
    assert by_op["matmul"] * 1e9 == pytest.approx(depth * T * D * (2 * d + 1), rel=1e-9)
    assert by_op["conv"] * 1e9 == pytest.approx(T * D * 4 * 4 + depth * 25 * T * D, rel=1e-9)
    diff = (forward_gmacs(lit, 16, 4) - forward_gmacs(dit, 16, 4)) * 1e9
    assert diff == pytest.approx(depth * (_attention_macs(T, D, d) - 2 * T * T * D), rel=1e-6)


def test_gmacs_S2_matches_lit_md():
    torch.manual_seed(0)
    g = forward_gmacs(backbones.build("lit", size="S", patch_size=2, input_size=32), 32, 4)
    assert g == pytest.approx(5.95, abs=0.006)  # 5.9452; DiT-S/2 is 6.07 on the same counter


@pytest.mark.slow
@pytest.mark.parametrize("size,input_size,expected", [("B", 32, 23.09), ("L", 32, 80.91), ("XL", 32, 119.43),
                                                      ("XL", 64, 477.05)])
def test_gmacs_large_presets_match_lit_md(size, input_size, expected):
    g = forward_gmacs(backbones.build("lit", size=size, patch_size=2, input_size=input_size), input_size, 4)
    assert g == pytest.approx(expected, rel=2e-3)
    if input_size == 64:
        assert g < 524.6  # DiT-XL/2 at 512 px: linear attention pays off at 1024 tokens


# ----------------------------------------------------------------------------------------------------------------
# Weight inheritance
# ----------------------------------------------------------------------------------------------------------------
def test_inherit_from_official_style_state_dict(tmp_path):
    dit = _perturbed_dit()
    path = tmp_path / "dit.pt"
    torch.save(dit.state_dict(), path)
    torch.manual_seed(1)
    fresh = backbones.build("lit", size="S", **TINY)
    torch.manual_seed(1)
    lit = backbones.build("lit", size="S", init_from=str(path), **TINY)
    src, got, ref = dit.state_dict(), lit.state_dict(), fresh.state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k] if _attn_key(k) else src[k], rtol=0, atol=0)
    rep = lit.init_report
    assert rep["source"] == str(path)
    assert rep["loaded"] == [k for k in got if not _attn_key(k)]
    assert rep["skipped"] == sorted(k for k in src if _attn_key(k))
    assert all(k.split(".attn.")[1] in {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} for k in rep["skipped"])
    assert rep["fresh"] == [k for k in got if _attn_key(k)]
    assert rep["loaded_params"] + rep["fresh_params"] == count_parameters(lit)


def test_inherit_prefers_ema_of_trainer_checkpoint_and_takes_state_dicts(tmp_path):
    model, ema = _perturbed_dit(0), _perturbed_dit(1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "config": {"backbone": "dit"}}, path)
    lit = backbones.build("lit", size="S", **TINY)
    inherit_from_dit(lit, path)
    torch.testing.assert_close(lit.blocks[1].mlp.fc2.weight, ema.blocks[1].mlp.fc2.weight, rtol=0, atol=0)
    inherit_from_dit(lit, path, prefer_ema=False)
    torch.testing.assert_close(lit.final_layer.linear.bias, model.final_layer.linear.bias, rtol=0, atol=0)
    prefixed = {"module." + k: v for k, v in ema.state_dict().items()}
    report = inherit_from_dit(lit, prefixed)
    assert report["source"] == "<state_dict>"
    torch.testing.assert_close(lit.y_embedder.embedding_table.weight, ema.y_embedder.embedding_table.weight)


def test_inherit_mismatch_is_a_clear_error(tmp_path):
    sd = _perturbed_dit().state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches \['pos_embed"):
        backbones.build("lit", size="S", **{**TINY, "input_size": 16}, init_from=sd)
    with pytest.raises(ValueError, match=r"final_layer.linear.weight: checkpoint \(32, 64\) vs model \(16, 64\)"):
        backbones.build("lit", size="S", learn_sigma=False, **TINY, init_from=sd)
    with pytest.raises(ValueError, match=r"missing \['blocks.2.mlp"):
        backbones.build("lit", size="S", **{**TINY, "depth": 3}, init_from=sd)
    with pytest.raises(FileNotFoundError, match="not found"):
        backbones.build("lit", size="S", **TINY, init_from=str(tmp_path / "nope.pt"))


# ----------------------------------------------------------------------------------------------------------------
# Hybrid distillation
# ----------------------------------------------------------------------------------------------------------------
def test_hybrid_loss_equals_hand_computed_value():
    # in_channels 2, outputs (B=2, 4, 1, 2): channels 0-1 epsilon, 2-3 learned variance; student all zero.
    student = torch.zeros(2, 4, 1, 2)
    teacher = torch.tensor([[[[1., 1.]], [[1., 1.]], [[2., 2.]], [[2., 2.]]],
                            [[[1., 2.]], [[3., 4.]], [[-1., -1.]], [[-1., 1.]]]])
    loss = hybrid_distillation_loss(student, teacher, in_channels=2)
    # sample 0: 0.5 * mean(1,1,1,1) + 0.05 * mean(4,4,4,4) = 0.5 + 0.2
    # sample 1: 0.5 * mean(1,4,9,16) + 0.05 * mean(1,1,1,1) = 3.75 + 0.05
    torch.testing.assert_close(loss, torch.tensor([0.7, 3.8]))
    torch.testing.assert_close(hybrid_distillation_loss(student, teacher, 2, lambda_eps=1.0, lambda_var=0.0),
                               torch.tensor([1.0, 7.5]))
    e = math.e
    torch.testing.assert_close(hybrid_distillation_loss(student, teacher, 2, 0.0, 1.0, var_transform=torch.exp),
                               torch.tensor([(e ** 2 - 1) ** 2, (3 * (1 / e - 1) ** 2 + (e - 1) ** 2) / 4]))


def test_hybrid_loss_matches_formula_float64_and_only_grads_the_student():
    torch.manual_seed(0)
    s = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = hybrid_distillation_loss(s, t, 4, 0.3, 0.2)
    ref = (0.3 * ((t[:, :4] - s[:, :4]) ** 2).mean((1, 2, 3)) + 0.2 * ((t[:, 4:] - s[:, 4:]) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(loss, ref.float().detach())
    loss.sum().backward()
    assert s.grad is not None and t.grad is None


def test_no_teacher_or_zero_lambdas_change_nothing():
    s = torch.randn(2, 8, 4, 4)
    t = torch.randn(2, 8, 4, 4)
    for loss in (hybrid_distillation_loss(s, None, 4), hybrid_distillation_loss(s, t, 4, 0.0, 0.0)):
        assert loss.shape == (2,) and torch.equal(loss, torch.zeros(2))
    base = torch.tensor([1.25, 0.5])
    assert torch.equal(base + hybrid_distillation_loss(s, None, 4), base)


def test_variance_term_needs_learned_sigma():
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="learned-sigma teacher"):
        hybrid_distillation_loss(s, t, 4)
    torch.testing.assert_close(hybrid_distillation_loss(s, t, 4, 0.5, 0.0),
                               0.5 * ((t - s[:, :4]) ** 2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="latent shape"):
        hybrid_distillation_loss(s, torch.randn(2, 8, 8, 8), 4)


def test_load_teacher_from_trainer_checkpoint_and_bare_state_dict(tmp_path):
    model, ema = _perturbed_dit(0), _perturbed_dit(1)
    kwargs = dict(size="S", num_heads=4, **TINY)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "config": {"backbone": {"name": "dit", **kwargs}}}, ckpt)
    teacher = load_teacher(ckpt)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    ema.eval()
    torch.testing.assert_close(teacher_output(teacher, x, t, y), ema(x, t, y))

    run_dir = tmp_path / "run"  # a run directory of diffusion.train, with the trainer's config record
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "ema": None,
                "config": {"backbone_name": "dit", "backbone_kwargs": kwargs}}, run_dir / "checkpoints" / "last.pt")
    torch.testing.assert_close(load_teacher(run_dir).blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)

    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="pass backbone="):
        load_teacher(bare)
    teacher = load_teacher(bare, kwargs, backbone="dit")
    torch.testing.assert_close(teacher.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(ValueError, match="build_kwargs the teacher was trained with"):
        load_teacher(bare, {**kwargs, "hidden_size": 32}, backbone="dit")


def test_tiny_lit_student_distils_from_tiny_dit_teacher(tmp_path):
    """One distillation step: only the student gets gradients, the teacher stays frozen and unchanged."""
    dit = _perturbed_dit()
    path = tmp_path / "dit.pt"
    torch.save(dit.state_dict(), path)
    teacher = load_teacher(path, dict(size="S", num_heads=4, **TINY), backbone="dit")
    student = backbones.build("lit", size="S", init_from=str(path), **TINY)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    loss = hybrid_distillation_loss(student(x, t, y), teacher_output(teacher, x, t, y), 4).mean()
    loss.backward()
    assert loss > 0 and student.blocks[0].attn.q.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
