"""DiT: exact parameter counts, official state_dict layout and init, embeddings, CFG, checkpoint loading."""

import math

import numpy as np
import pytest
import torch
from helpers import SMOKE_KWARGS

from backbones import available, build
from backbones.dit import load_official_checkpoint
from backbones.layers import (
    LabelEmbedder,
    attention,
    count_parameters,
    drop_labels,
    get_2d_sincos_pos_embed,
    timestep_embedding,
)
from diffusion import create_diffusion

# Exact totals (frozen pos_embed included) of the official models at 32x32x4, 1000 classes (dit.md Table 4).
DIT_PARAMS = {
    ("S", 8): 33_148_160, ("S", 4): 32_945_024, ("S", 2): 32_963_360,
    ("B", 8): 130_881_536, ("B", 4): 130_475_648, ("B", 2): 130_512_416,
    ("L", 8): 458_594_816, ("L", 4): 458_053_760, ("L", 2): 458_102_816,
    ("XL", 8): 675_683_072, ("XL", 4): 675_074_432, ("XL", 2): 675_129_632,
}
DIT_WIDTH = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}


def closed_form_params(size: str, p: int, input_size: int = 32, c: int = 4, classes: int = 1000) -> int:
    n, d = DIT_WIDTH[size]
    tokens = (input_size // p) ** 2
    return (n * (18 * d * d + 15 * d) + p * p * c * d + d + 256 * d + d + d * d + d + (classes + 1) * d
            + tokens * d + d * p * p * 2 * c + p * p * 2 * c + 2 * d * d + 2 * d)


@pytest.mark.parametrize("size,patch", sorted(DIT_PARAMS))
def test_parameter_counts_match_official(size, patch):
    with torch.device("meta"):
        model = build("dit", size=size, patch_size=patch)
    assert count_parameters(model) == DIT_PARAMS[(size, patch)] == closed_form_params(size, patch)


def test_xl2_at_512_trainable_count():
    with torch.device("meta"):
        model = build("dit", size="XL", patch_size=2, input_size=64)
    assert count_parameters(model) == 676_014_368
    assert count_parameters(model, trainable_only=True) == 674_834_720


def test_registry_lists_dit_and_rejects_unknown_names():
    assert "dit" in available()
    with pytest.raises(KeyError, match="available backbones: .*dit"):
        build("no-such-backbone")
    with pytest.raises(ValueError, match="unknown size preset 'XXL'"):
        build("dit", size="XXL")


# Keys and shapes of the official small config (dit.md section 5).
OFFICIAL_SMALL_KEYS = {
    "pos_embed": (1, 16, 64), "x_embedder.proj.weight": (64, 4, 2, 2), "x_embedder.proj.bias": (64,),
    "t_embedder.mlp.0.weight": (64, 256), "t_embedder.mlp.0.bias": (64,), "t_embedder.mlp.2.weight": (64, 64),
    "t_embedder.mlp.2.bias": (64,), "y_embedder.embedding_table.weight": (11, 64),
    "final_layer.linear.weight": (32, 64), "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (128, 64), "final_layer.adaLN_modulation.1.bias": (128,),
}
for _i in range(2):
    OFFICIAL_SMALL_KEYS.update({
        f"blocks.{_i}.attn.qkv.weight": (192, 64), f"blocks.{_i}.attn.qkv.bias": (192,),
        f"blocks.{_i}.attn.proj.weight": (64, 64), f"blocks.{_i}.attn.proj.bias": (64,),
        f"blocks.{_i}.mlp.fc1.weight": (256, 64), f"blocks.{_i}.mlp.fc1.bias": (256,),
        f"blocks.{_i}.mlp.fc2.weight": (64, 256), f"blocks.{_i}.mlp.fc2.bias": (64,),
        f"blocks.{_i}.adaLN_modulation.1.weight": (384, 64), f"blocks.{_i}.adaLN_modulation.1.bias": (384,),
    })


def small_dit(**kw):
    args = dict(size="S", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
    args.update(kw)
    return build("dit", **args)


def test_state_dict_layout_is_official():
    model = small_dit()
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL_SMALL_KEYS
    assert count_parameters(model) == 183_200 and count_parameters(model, trainable_only=True) == 182_176


def test_fresh_model_outputs_exactly_zero_and_shape():
    torch.manual_seed(0)
    model = small_dit()
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert out.abs().max().item() == 0.0
    assert small_dit(learn_sigma=False)(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([0])).shape == \
        (1, 4, 8, 8)


def test_embeddings_check_values():
    emb = timestep_embedding(torch.tensor([0.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    pos = get_2d_sincos_pos_embed(64, 4)
    np.testing.assert_allclose(pos[1, :4], [0.8415, 0.5332, 0.311, 0.1769], atol=1e-4)
    np.testing.assert_allclose(pos[4, :4], [0, 0, 0, 0], atol=1e-12)


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def manual_attention_forward(attn, x):
    """Explicit softmax attention with the official qkv layout, as a reference for the SDPA path."""
    B, T, D = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4).double()
    q, k, v = qkv[0], qkv[1], qkv[2]
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // h), dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(B, T, D).float())


def test_attention_matches_float64_reference():
    torch.manual_seed(0)
    model = perturbed(small_dit())
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(attn(x), manual_attention_forward(attn, x), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    torch.testing.assert_close(attention(q, k, v), torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v,
                               atol=1e-6, rtol=1e-5)


def test_forward_with_cfg_guides_all_channels_or_three():
    torch.manual_seed(0)
    model = perturbed(small_dit()).eval()
    x = torch.randn(2, 4, 8, 8)
    x2 = torch.cat([x, torch.randn_like(x)])  # second half is ignored by design
    t = torch.tensor([10, 10, 10, 10])
    y = torch.tensor([1, 2, 10, 10])
    out = model.forward_with_cfg(x2, t, y, cfg_scale=4.0)
    cond, uncond = model(torch.cat([x, x]), t, y).split(2)
    expected_eps = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:2, :4], expected_eps)
    torch.testing.assert_close(out[2:, :4], expected_eps)
    torch.testing.assert_close(out[2:, 4:], uncond[:, 4:])
    out3 = model.forward_with_cfg(x2, t, y, cfg_scale=4.0, guided_channels=3)
    torch.testing.assert_close(out3[:2, :3], expected_eps[:, :3])
    torch.testing.assert_close(out3[:2, 3], cond[:, 3])  # DiT's published variant leaves channel 3 unguided


def test_official_checkpoint_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    source = perturbed(small_dit())
    path = tmp_path / "DiT-tiny.pt"
    torch.save(source.state_dict(), path)  # the official files are bare state_dicts
    target = small_dit()
    load_official_checkpoint(target, path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([3, 4])
    source.eval(), target.eval()
    torch.testing.assert_close(target(x, t, y), source(x, t, y), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="does not match DiT"):
        load_official_checkpoint(small_dit(depth=3), path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_checkpoint(target, tmp_path / "missing.pt")


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        small_dit(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="build the model with input_size=16"):
        small_dit()(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


# ------------------------------------------------------------------------------------------------------------------
# Label dropout belongs to the trainer; the loss hook every backbone inherits
# ------------------------------------------------------------------------------------------------------------------
def _accelerators() -> list[str]:
    devs = ["cuda"] if torch.cuda.is_available() else []
    return devs + (["mps"] if torch.backends.mps.is_available() else [])


def test_drop_labels_seeded_reproducible_device_independent_and_at_rate():
    n, null = 10_000, 10
    y = torch.arange(n) % null
    a = drop_labels(y, 0.1, null, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, drop_labels(y, 0.1, null, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, drop_labels(y, 0.1, null, generator=torch.Generator().manual_seed(4)))
    # The mask is the generator's CPU draw, whatever device the labels are on.
    mask = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.1
    assert torch.equal(a, torch.where(mask, null, y))
    for dev in _accelerators():
        out = drop_labels(y.to(dev), 0.1, null, generator=torch.Generator().manual_seed(3))
        assert out.device.type == dev and torch.equal(out.cpu(), a)
    for p in (0.1, 0.5):
        dropped = drop_labels(y, p, null, generator=torch.Generator().manual_seed(0)) == null
        assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma (<= 0.025)
    kept = drop_labels(y, 0.5, null, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept[kept != null], y[kept != null])  # survivors are untouched
    assert torch.equal(drop_labels(y, 0.0, null), y)
    assert torch.equal(drop_labels(y, 1.0, null), torch.full_like(y, null))
    force = torch.tensor([1, 0, 1, 0])
    assert drop_labels(torch.tensor([1, 2, 3, 4]), 0.0, null, force_drop_ids=force).tolist() == [null, 2, null, 4]


def test_label_embedder_keeps_null_row_and_forced_drops():
    emb = LabelEmbedder(10, 8, 0.1)
    assert emb.embedding_table.num_embeddings == 11 and LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10
    emb.train()
    y = torch.tensor([1, 2, 3])
    torch.testing.assert_close(emb(y), emb.embedding_table.weight[y], rtol=0, atol=0)
    forced = emb(y, force_drop_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(forced, emb.embedding_table.weight[torch.tensor([1, 10, 3])], rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in available() if not n.startswith("test_")])
def test_training_forward_never_drops_labels(name):
    """Same input and labels twice in training mode (class_dropout_prob 0.5): identical outputs, equal to eval."""
    kw = dict(SMOKE_KWARGS[name], input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.5)
    if name in ("rwkv", "dis"):
        kw["drop_path_rate"] = 0.0  # stochastic depth is the one intended randomness of a training forward
    torch.manual_seed(0)
    model = build(name, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-initialised heads: labels must reach the output
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, t, y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 1000, (16,), generator=g), torch.arange(16) % 10
    with torch.no_grad():
        model.eval()
        ref, null = model(x, t, y), model(x, t, torch.full_like(y, 10))
        # every sample depends on its label, so dropping any one of them would show
        assert ((ref - null).flatten(1).abs().amax(1) > 1e-4).all()
        model.train()
        first, second = model(x, t, y), model(x, t, y)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)


def test_default_training_losses_is_the_diffusion_loss():
    torch.manual_seed(0)
    model = perturbed(small_dit()).train()
    diffusion = create_diffusion()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([1, 2, 10])
    noise = torch.randn_like(x)
    terms = model.training_losses(diffusion, x, t, y, noise)
    ref = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
    assert set(terms) == {"loss", "mse", "vb", "model_output", "x_t"} == set(ref)
    for k in terms:
        torch.testing.assert_close(terms[k], ref[k], rtol=0, atol=0)
