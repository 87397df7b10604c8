"""Official checkpoints of DiCo, DiMR and Diffusion-RWKV: key names, checkpoint wrapping, strict loading.

The official key names below are written out by hand from the official model definitions (module attribute names
and ``nn.Sequential`` indices), read at:

* shallowdream204/DiCo @ b596b056 ``dico_models.py`` (``DiCo``, ``DiCoBlock``, ``LabelEmbedder_3``, ``FinalLayer``);
  releases: bare state_dicts or DiT-style training checkpoints ``{"model", "ema", "opt", "args"}`` (``download.py``
  ``find_model`` takes ``["ema"]`` when present; ``train_accelerate.py`` saves that dict, ``args`` a Namespace).
* qihao067/DiMR @ fa141ae4 ``libs/core/blocks.py`` (``MRModel``/``Stage``/``TransformerBlock``/``ConvNeXtBlock``/
  ``MLPBlock``), ``libs/core/sigmoid/module.py`` (time-dependent ``LayerNorm``/``TDRMSNorm``: four tensors
  ``param0, param1, nodecay_weight, nodecay_bias`` per parameter); releases: bare ``MRModel`` state_dicts
  (``eval.py`` ``load_state_dict(torch.load(nnet_path))``; ``utils.TrainState.save`` writes ``nnet_ema.pth``).
* feizc/Diffusion-RWKV @ d1b43f21 ``models_drwkv.py`` (``DiffRWKVModel``, ``Block``, ``VRWKV_SpatialMix``,
  ``VRWKV_ChannelMix``); release: the training checkpoint ``{"model", "ema", "opt", "args"}`` (``train.py``;
  ``sample.py`` loads ``["ema"]``).

Checked once outside this repository (the official files run on CPU with stand-ins for timm's ``trunc_normal_``,
mmcv's ``BaseModule``, einops' ``rearrange`` and, for Diffusion-RWKV, our paper-formula Bi-WKV in place of the CUDA
op): these templates give exactly the official state_dict keys of DiCo-XL (673), DiMR-XL/2R (1018) and DRWKV-L/2 at
64x64x3 unconditional (791), and after the mapping our forward equals the official one to float32 round-off
(max relative difference about 1e-6 for DiCo, DiMR (every branch) and DRWKV, conditional and unconditional).
"""

import argparse
import warnings

import pytest
import torch

from backbones import build, dico, dimr, rwkv
from backbones.dit import read_official_state_dict

TD = ("param0", "param1", "nodecay_weight", "nodecay_bias")  # official TimeDependentParameter tensors
WB = ("weight", "bias")


# ------------------------------------------------------------------------------------------------------------------
# Official key names, from the official code
# ------------------------------------------------------------------------------------------------------------------
def official_dico_keys(depths) -> set[str]:
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias",
            "down1_2.body.0.weight", "down2_3.body.0.weight", "up3_2.body.0.weight", "up2_1.body.0.weight",
            *(f"{m}.{p}" for m in ("reduce_chan_level2", "reduce_chan_level1", "final_layer.out_proj",
                                   "final_layer.adaLN_modulation.1") for p in WB),
            *(f"y_embedder.embedding_table_{i}.weight" for i in range(3)),
            *(f"t_embedder_{i}.mlp.{j}.{p}" for i in (1, 2, 3) for j in (0, 2) for p in WB)}
    levels = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
    for level, n in zip(levels, depths):
        for b in range(n):
            keys |= {f"{level}.{b}.{m}.{p}" for m in ("conv1", "conv2", "conv3", "conv4", "conv5", "ca.1",
                                                       "adaLN_modulation.1") for p in WB}
    return keys


def official_dimr_keys(n_transformer: int, n_convnext: int) -> set[str]:
    """Two-branch MRModel (released 2R layout): stage 0 Transformer with class token, stage 1 ConvNeXt + cascade."""
    keys = set()
    for s, n in ((0, n_transformer), (1, n_convnext)):
        pre = f"stages.{s}."
        keys |= {pre + "input_layer.1.weight", pre + "input_layer.1.bias",
                 pre + "input_layer.3.position_embeddings.weight",
                 *(f"{pre}output_layer.0.{p}.{t}" for p in WB for t in TD),
                 *(f"{pre}output_layer.2.{p}" for p in WB),
                 *(f"{pre}skip_denses.{j}.{p}" for j in range(n // 2) for p in WB)}
        if s == 0:
            keys.add(pre + "class_embeds.weight")
        else:
            keys |= {*(f"{pre}upsample.{i}.{p}.{t}" for i in (0, 2) for p in WB for t in TD),
                     *(f"{pre}upsample.1.kernel.{p}" for p in WB)}
        for b in range(n):
            blk = f"{pre}blocks.{b}."
            keys |= {*(f"{blk}block2.norm.scale.{t}" for t in TD),
                     *(f"{blk}block2.w{i}.{p}" for i in range(3) for p in WB)}
            if s == 0:
                keys |= {*(f"{blk}block1.norm.scale.{t}" for t in TD), blk + "block1.query_key_value.weight",
                         blk + "block1.dense.weight", blk + "block1.dense.bias"}
            else:
                keys |= {blk + "block1.1.weight", blk + "block1.1.bias"}
    return keys


def official_drwkv_keys(depth: int, conditional: bool) -> set[str]:
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            *(f"time_embed.mlp.{j}.{p}" for j in (0, 2) for p in WB),
            *(f"{m}.{p}" for m in ("norm_f", "final_layer.linear", "final_layer.adaLN_modulation.1") for p in WB)}
    if conditional:
        keys.add("label_emb.embedding_table.weight")
    half = depth // 2
    blocks = [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]
    for i, blk in enumerate(blocks):
        keys |= {*(f"{blk}.{m}.{p}" for m in ("ln1", "ln2", "adaLN_modulation.1") for p in WB),
                 *(f"{blk}.att.{n}" for n in ("spatial_decay", "spatial_first", "spatial_mix_k", "spatial_mix_v",
                                              "spatial_mix_r", "key.weight", "value.weight", "receptance.weight",
                                              "output.weight")),
                 *(f"{blk}.ffn.{n}" for n in ("spatial_mix_k", "spatial_mix_r", "key.weight", "receptance.weight",
                                              "value.weight"))}
        if i == 0:
            keys |= {f"{blk}.ln0.{p}" for p in WB}
        if blk.startswith("out_blocks"):
            keys |= {f"{blk}.skip_linear.{p}" for p in WB}
    return keys


# ------------------------------------------------------------------------------------------------------------------
# Small models and official-format files
# ------------------------------------------------------------------------------------------------------------------
DICO_KW = dict(size="cpu", hidden_size=16, depth=(1, 2, 1, 1, 2), input_size=8, num_classes=10)
DIMR_KW = dict(size="cpu/2R", input_size=8, in_channels=4, num_classes=10, learn_sigma=False)  # 3 + 3 blocks


def rwkv_kw(num_classes: int, wkv_variant: str = "official") -> dict:
    return dict(size="cpu", hidden_size=32, depth=5, patch_size=2, input_size=8, in_channels=3,
                num_classes=num_classes, wkv_variant=wkv_variant)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise on every tensor, so the zero-initialised adaLN / output layers are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format))
    return model.eval()


def training_checkpoint(ema_state: dict, model_state: dict) -> dict:
    """The DiT-style training checkpoint of DiCo's train_accelerate.py and Diffusion-RWKV's train.py."""
    return {"model": model_state, "ema": ema_state, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="X", image_size=64, num_classes=-1, latent_space=False, resume=None)}


def assert_same_outputs(a, b, x, t, y):
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Released configurations: official key sets and shapes (meta device: no memory, no init cost)
# ------------------------------------------------------------------------------------------------------------------
def meta_build(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs)


@pytest.mark.parametrize("file", sorted(dico.OFFICIAL_CHECKPOINTS))
def test_dico_released_configs_have_official_keys(file):
    kw = dico.OFFICIAL_CHECKPOINTS[file]
    state = dico.to_official_state_dict(meta_build("dico", **kw).state_dict())
    depths = dico.DICO_PRESETS[kw["size"]]["depth"]
    assert set(state) == official_dico_keys(depths)
    C = dico.DICO_PRESETS[kw["size"]]["hidden_size"]
    assert state["y_embedder.embedding_table_2.weight"].shape == (1001, 4 * C)
    assert state["final_layer.out_proj.weight"].shape == (8, 2 * C, 3, 3)  # learned sigma, head at 2C, 3x3 conv
    if kw["size"] == "XL":  # README 701.2M; the official DiCo_XL() has 701,151,368 parameters
        assert sum(v.numel() for v in state.values()) == 701_151_368


@pytest.mark.parametrize("file, n_tr, n_cnx, params", [("DiMR-XL_2R_800epochs.pth", 39, 21, 505_046_408),
                                                       ("DiMR-G_2R_800epochs.pth", 57, 29, None)])
def test_dimr_released_configs_have_official_keys_and_shapes(file, n_tr, n_cnx, params):
    state = dimr.to_official_state_dict(meta_build("dimr", **dimr.OFFICIAL_CHECKPOINTS[file]).state_dict())
    assert set(state) == official_dimr_keys(n_tr, n_cnx)
    D = 960 if "XL" in file else 1152
    expect = {
        "stages.0.input_layer.1.weight": (D, 4, 2, 2),                     # patchify 2 at 256 (latent 32 -> 16)
        "stages.0.input_layer.3.position_embeddings.weight": (16 * 16, D),  # Embedding(max_h * max_w, dim)
        "stages.0.class_embeds.weight": (1001, D),                          # official num_classes=1001
        "stages.0.blocks.0.block1.query_key_value.weight": (3 * D, D),      # no bias
        "stages.0.blocks.0.block2.w0.weight": (2 * D, D),
        "stages.0.output_layer.2.weight": (4, D, 3, 3),                     # epsilon only
        "stages.1.input_layer.3.position_embeddings.weight": (32 * 32, D // 2),
        "stages.1.upsample.1.kernel.weight": (4 * (D // 2), D * (n_tr + 1)),  # every block output, concatenated
        "stages.1.upsample.0.weight.param0": (D * (n_tr + 1),),
        "stages.1.blocks.0.block1.1.weight": (D // 2, 1, 7, 7),
        "stages.1.output_layer.2.weight": (4, D // 2, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expect} == expect
    if params is not None:  # README 505M; the official MRModel(XL/2R config) has 505,046,408 parameters
        assert sum(v.numel() for v in state.values()) == params


def test_drwkv_released_file_is_l2_celeba64_unconditional():
    """feizc/Diffusion-RWKV#1: the only released file (named l-2-uncond.pt) has pos_embed (1, 1024, 768),
    patch_embed (768, 3, 2, 2), final_layer.linear (24, 768) and no label table; as DRWKV-M/2 it has unexpected
    in_blocks.12+ / out_blocks.12+ keys (18 of each: L/2, depth 37)."""
    kw = rwkv.official_build_kwargs("l-2-uncond.pt")
    assert {k: kw[k] for k in rwkv.OFFICIAL_CHECKPOINTS["l-2-uncond.pt"]} == dict(
        size="L", patch_size=2, input_size=64, in_channels=3, num_classes=0, learn_sigma=True)
    model = meta_build("rwkv", **rwkv.OFFICIAL_CHECKPOINTS["l-2-uncond.pt"])
    state = rwkv.to_official_state_dict(model.state_dict())
    assert set(state) == official_drwkv_keys(37, conditional=False)
    shapes = {k: tuple(state[k].shape) for k in ("pos_embed", "patch_embed.proj.weight", "final_layer.linear.weight")}
    assert shapes == {"pos_embed": (1, 1024, 768), "patch_embed.proj.weight": (768, 3, 2, 2),
                      "final_layer.linear.weight": (24, 768)}
    assert state["in_blocks.0.att.spatial_mix_k"].shape == (1, 1, 768) and "in_blocks.17.ln1.weight" in state
    assert sum(v.numel() for v in state.values()) == 439_163_928  # official drwkv_l_2(img_size=64, channels=3)


def test_drwkv_official_build_uses_the_official_kernel_arithmetic():
    assert rwkv.official_build_kwargs()["wkv_variant"] == "official"
    assert meta_build("rwkv", **rwkv.official_build_kwargs()).wkv_variant == "official"
    with pytest.raises(KeyError, match="unknown official"):
        rwkv.official_build_kwargs("DRWKV-H-2-256.pt")


# ------------------------------------------------------------------------------------------------------------------
# Round trips: our small model -> official names and wrapping -> file -> loader -> same outputs
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [True, False])
def test_dico_official_file_loads_strictly(tmp_path, wrapped):
    torch.manual_seed(0)
    source = perturbed(build("dico", **DICO_KW), seed=1)
    official = dico.to_official_state_dict(source.state_dict())
    assert set(official) == official_dico_keys(DICO_KW["depth"])
    decoy = dico.to_official_state_dict(perturbed(build("dico", **DICO_KW), seed=2).state_dict())
    path = tmp_path / "DiCo-S-400K-256x256.pt"
    torch.save(training_checkpoint(official, decoy) if wrapped else official, path)

    torch.manual_seed(3)
    target = build("dico", **DICO_KW).eval()
    loaded = dico.load_official_checkpoint(target, path)
    assert set(loaded) == set(source.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 9, 10])
    assert_same_outputs(target, source, x, t, y)  # the EMA weights, not the decoy "model"
    fresh = build("dico", **DICO_KW).eval()
    fresh.load_state_dict(dico.from_official_state_dict(official), strict=True)
    assert_same_outputs(fresh, source, x, t, y)


def test_dimr_official_file_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = perturbed(build("dimr", **DIMR_KW), seed=1)
    official = dimr.to_official_state_dict(source.state_dict())
    assert set(official) == official_dimr_keys(3, 3)
    assert official["stages.1.input_layer.3.position_embeddings.weight"].shape == (64, 32)  # (H*W, D): 2-D
    path = tmp_path / "nnet_ema.pth"
    torch.save(official, path)  # released DiMR files are bare MRModel state_dicts

    torch.manual_seed(3)
    target = build("dimr", **DIMR_KW).eval()
    dimr.load_official_checkpoint(target, path)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 411, 999]), torch.tensor([1, 9, 10])
    assert_same_outputs(target, source, x, t, y)
    with torch.no_grad():
        for a, b in zip(target.forward_all(x, t, y), source.forward_all(x, t, y)):  # every branch's head
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    fresh = build("dimr", **DIMR_KW).eval()
    fresh.load_state_dict(dimr.from_official_state_dict(official), strict=True)
    assert_same_outputs(fresh, source, x, t, y)
    back = dimr.to_official_state_dict(dimr.from_official_state_dict(official))
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_drwkv_official_file_loads_strictly(tmp_path, num_classes):
    torch.manual_seed(0)
    source = perturbed(build("rwkv", **rwkv_kw(num_classes)), seed=1)
    official = rwkv.to_official_state_dict(source.state_dict())
    assert set(official) == official_drwkv_keys(5, conditional=num_classes > 0)
    decoy = perturbed(build("rwkv", **rwkv_kw(num_classes)), seed=2).state_dict()
    path = tmp_path / "l-2-uncond.pt"
    torch.save(training_checkpoint(official, decoy), path)

    torch.manual_seed(3)
    target = build("rwkv", **rwkv_kw(num_classes)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built with wkv_variant="official": nothing to warn about
        rwkv.load_official_checkpoint(target, path)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    y = torch.tensor([2, 10]) if num_classes else None  # unconditional: no label input (official labels=None)
    assert_same_outputs(target, source, x, t, y)
    fresh = build("rwkv", **rwkv_kw(num_classes)).eval()
    fresh.load_state_dict(rwkv.from_official_state_dict(official), strict=True)
    assert_same_outputs(fresh, source, x, t, y)


def test_drwkv_paper_formula_model_gets_a_warning():
    official = rwkv.to_official_state_dict(build("rwkv", **rwkv_kw(0)).state_dict())
    with pytest.warns(UserWarning, match="wkv_variant='official'"):
        rwkv.load_official_checkpoint(build("rwkv", **rwkv_kw(0, wkv_variant="paper")), official)


def test_training_checkpoint_needs_the_namespace_allowlist(tmp_path):
    """A plain weights-only load refuses the official training checkpoints (``args`` is an argparse.Namespace);
    the official-checkpoint reader allowlists exactly that class and takes the EMA weights."""
    ema, model = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    path = tmp_path / "ckpt.pt"
    torch.save(training_checkpoint(ema, model), path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    state, _ = read_official_state_dict(path)
    assert torch.equal(state["w"], torch.ones(2))
    state, _ = read_official_state_dict(path, prefer_ema=False)
    assert torch.equal(state["w"], torch.zeros(2))


class _Payload:
    """Unpickling this would run ``os.mkdir(sentinel)``."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        import os

        return os.mkdir, (self.sentinel,)


@pytest.mark.parametrize("where", ["args", "inside_namespace"])
def test_namespace_allowlist_opens_nothing_else(tmp_path, where):
    sentinel = tmp_path / "sentinel"
    ckpt = training_checkpoint({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    ckpt["args"] = _Payload(sentinel) if where == "args" else argparse.Namespace(model="X", extra=_Payload(sentinel))
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="cannot load"):
        read_official_state_dict(path)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------------------------------
# Mismatches fail loudly
# ------------------------------------------------------------------------------------------------------------------
def test_dimr_mapping_rejects_unknown_keys_and_learned_sigma():
    official = dimr.to_official_state_dict(build("dimr", **DIMR_KW).state_dict())
    with pytest.raises(KeyError, match="nothing maps it"):
        dimr.from_official_state_dict({**official, "stages.0.text_conditioning.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="nothing maps it"):
        dimr.from_official_state_dict({"nnet.stages.0.input_layer.1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="learn_sigma=False"):
        dimr.load_official_checkpoint(build("dimr", **{**DIMR_KW, "learn_sigma": True}), official)
    smaller = {k: v for k, v in official.items() if not k.startswith("stages.1.blocks.2.")}
    with pytest.raises(RuntimeError, match="does not match DiMR"):
        dimr.load_official_checkpoint(build("dimr", **DIMR_KW), smaller)


def test_drwkv_conditioning_mismatch_is_named():
    uncond = rwkv.to_official_state_dict(build("rwkv", **rwkv_kw(0)).state_dict())
    with pytest.raises(ValueError, match="unconditional.*num_classes=0"):
        rwkv.load_official_checkpoint(build("rwkv", **rwkv_kw(10)), uncond)
    cond = rwkv.to_official_state_dict(build("rwkv", **rwkv_kw(10)).state_dict())
    with pytest.raises(ValueError, match="class-conditional"):
        rwkv.load_official_checkpoint(build("rwkv", **rwkv_kw(0)), cond)


def test_dico_wrong_config_is_refused():
    official = dico.to_official_state_dict(build("dico", **DICO_KW).state_dict())
    with pytest.raises(RuntimeError, match="does not match DiCo"):
        dico.load_official_checkpoint(build("dico", **{**DICO_KW, "depth": (1, 1, 1, 1, 2)}), official)
    with pytest.raises(TypeError, match="expected a DiCo"):
        dico.load_official_checkpoint(build("dimr", **DIMR_KW), official)
