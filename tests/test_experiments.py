"""conf/experiment/: each paper's main setting composes with the published recipe, and its CPU-sized variant (same
recipe, smaller model/images/batch/steps) trains end to end through ``diffusion.trainer.train`` on fake data in the
real on-disk formats (tests/fakedata.py), writing a checkpoint whose identity carries the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fakedata import fake_celeba, fake_cifar10, fake_latent_store, fake_official_dit, tiny_vae
from hydra import compose, initialize_config_dir

from diffusion.config import CONF_DIR, ConfigError, to_plain, validate

EXPERIMENTS = ("dit_xl2_imagenet256", "dico_xl_imagenet256", "dimr_xl2r_imagenet256", "lit_xl2_imagenet256_distill",
               "drwkv_cifar10", "drwkv_celeba64")

# What each full (GPU) config must hold: the published recipe (sources in the YAML comments).
PAPER = {
    "dit_xl2_imagenet256": dict(
        backbone={"name": "dit", "size": "XL", "patch_size": 2}, dataset="imagenet_latents", random_flip=True,
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        train=dict(steps=7_000_000, batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=None, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.1, precision="fp32"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.5)),
    "dico_xl_imagenet256": dict(
        backbone={"name": "dico", "size": "XL"}, dataset="imagenet_latents", random_flip=True,
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        train=dict(steps=3_750_000, batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=None, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.1, precision="fp32"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.4)),
    "dimr_xl2r_imagenet256": dict(
        backbone={"name": "dimr", "size": "XL/2R"}, dataset="imagenet_latents", random_flip=True,
        diffusion={"noise_schedule": "scaled_linear", "learn_sigma": False, "diffusion_steps": 1000},
        train=dict(steps=1_000_000, batch_size=1024, lr=2e-4, weight_decay=0.03, grad_clip=None, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.1, precision="auto"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.4)),
    "lit_xl2_imagenet256_distill": dict(
        backbone={"name": "lit", "size": "XL", "patch_size": 2}, dataset="imagenet_latents", random_flip=True,
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        train=dict(steps=1_400_000, batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=None, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.1, precision="fp32"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.5),
        distill=dict(lambda_eps=0.5, lambda_var=0.05)),
    "drwkv_cifar10": dict(
        backbone={"name": "rwkv", "size": "S", "patch_size": 2, "drop_path_rate": 0.1},
        dataset="cifar10", image_size=32, random_flip=True, unconditional=True,
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        train=dict(steps=390_000, batch_size=128, lr=1e-4, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.0, precision="fp32"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.0, clip_denoised=False)),
    "drwkv_celeba64": dict(
        backbone={"name": "rwkv", "size": "S", "patch_size": 2, "drop_path_rate": 0.1},
        dataset="celeba64", image_size=64, random_flip=True,
        crop="resize",
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        train=dict(steps=1_271_000, batch_size=128, lr=1e-4, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999,
                   ema_warmup=False, class_dropout_prob=0.0, precision="fp32"),
        sample=dict(sampler="ddpm", steps=250, cfg_scale=1.0, clip_denoised=False)),
}

CPU_SIZE = {"dit": "cpu", "dico": "cpu", "lit": "cpu", "rwkv": "cpu", "dimr": "cpu/2R"}
# The only keys a CPU variant may change: what must shrink (plus logging cadence); the recipe stays the paper's.
SHRINKING = {"backbone.size", "dataset.image_size", "train.steps", "train.batch_size", "train.log_every",
             "train.ckpt_every", "sample.per_class", "sample.steps"}


def experiment_arg(name: str) -> str:
    """``experiment=<name>`` when conf/train.yaml lists an experiment group in its defaults, else ``+experiment=``."""
    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and any(str(k).split()[-1] == "experiment" for k in d) for d in defaults)
    return f"experiment={name}" if listed else f"+experiment={name}"


def compose_experiment(name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[experiment_arg(name), *overrides])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fake CIFAR-10, CelebA and a latent store of a fake 2-class ImageNet (16 px -> 4x8x8 latents through a tiny
    VAE), plus a tiny DiT saved bare like the released DiT-XL-2-256x256.pt, matching the latents."""
    base = tmp_path_factory.mktemp("experiments")
    vae = tiny_vae(base / "vae")
    return {
        "cifar10": fake_cifar10(base / "cifar"),
        "celeba64": fake_celeba(base / "celeba", n=8),
        "imagenet_latents": fake_latent_store(base / "latents", vae, image_size=16),
        "dit": fake_official_dit(base / "DiT-cpu-2-16x16.pt", size="cpu", input_size=8, num_classes=2),
    }


def data_overrides(name: str, data: dict) -> list[str]:
    ds = PAPER[name]["dataset"]
    extra = [f"dataset.root={data[ds]}"]
    if name.startswith("lit"):
        extra.append(f"init_from={data['dit']}")  # the teacher follows init_from (distill.teacher: ${init_from})
    return extra


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_full_config_holds_the_published_recipe(name, monkeypatch):
    monkeypatch.delenv("DIT_XL2_256_CHECKPOINT", raising=False)
    extra = ["init_from=/ckpt/DiT-XL-2-256x256.pt"] if name.startswith("lit") else []
    cfg = to_plain(validate(compose_experiment(name, extra)))
    want = PAPER[name]
    assert {k: cfg["backbone"][k] for k in want["backbone"]} == want["backbone"]
    assert cfg["dataset"]["name"] == want["dataset"]
    assert cfg["dataset"]["random_flip"] is want["random_flip"]
    assert cfg["dataset"]["unconditional"] is want.get("unconditional", False)
    assert cfg["dataset"]["image_size"] == want.get("image_size")  # latents: null = the store's resolution
    assert cfg["dataset"]["crop"] == want.get("crop")
    assert cfg["diffusion"] == want["diffusion"]
    for section in ("train", "sample", "distill"):
        for key, value in want.get(section, {}).items():
            assert cfg[section][key] == pytest.approx(value) if isinstance(value, float) else \
                cfg[section][key] == value, f"{name}: {section}.{key} = {cfg[section][key]!r}, paper {value!r}"
    if name.startswith("lit"):
        assert cfg["init_from"] == cfg["distill"]["teacher"] == "/ckpt/DiT-XL-2-256x256.pt"
    else:
        assert cfg["init_from"] is None and cfg["distill"]["teacher"] is None


def test_lit_without_a_dit_checkpoint_fails_at_composition(monkeypatch):
    """``???`` in an experiment file would be swallowed by the schema default (null) and the LiT recipe would
    silently start from scratch without a teacher; its ``${oc.env:...}`` default fails instead."""
    monkeypatch.delenv("DIT_XL2_256_CHECKPOINT", raising=False)
    with pytest.raises(ConfigError, match="DIT_XL2_256_CHECKPOINT.*(init_from|distill.teacher)"):
        validate(compose_experiment("lit_xl2_imagenet256_distill"))
    monkeypatch.setenv("DIT_XL2_256_CHECKPOINT", "/ckpt/from-env.pt")
    cfg = validate(compose_experiment("lit_xl2_imagenet256_distill"))
    assert cfg.init_from == cfg.distill.teacher == "/ckpt/from-env.pt"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cpu_variant_changes_only_what_must_shrink(name):
    extra = ["dataset.root=/data", "init_from=/ckpt/dit.pt"] if name.startswith("lit") else ["dataset.root=/data"]
    full = flat(to_plain(compose_experiment(name, extra)))
    cpu = flat(to_plain(compose_experiment(f"{name}_cpu", extra)))
    changed = {k for k in full.keys() | cpu.keys() if full.get(k) != cpu.get(k)}
    assert changed <= SHRINKING, f"{name}_cpu also changes {sorted(changed - SHRINKING)}"
    assert cpu["backbone.size"] == CPU_SIZE[cpu["backbone.name"]]
    assert cpu["train.steps"] <= 3 and cpu["sample.per_class"] == 1 and cpu["sample.steps"] == 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cpu_variant_trains_end_to_end_with_the_paper_recipe(name, data, tmp_path):
    from diffusion.trainer import train

    run_dir = tmp_path / "run"
    overrides = [*data_overrides(name, data), f"run_dir={run_dir}", "progress=false", "threads=1", "device=cpu"]
    cfg = compose_experiment(f"{name}_cpu", overrides)
    summary = train(cfg)
    assert summary["steps"] == cfg.train.steps

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    identity = ckpt["config"]["identity"]
    want = PAPER[name]
    assert ckpt["step"] == cfg.train.steps
    assert identity["diffusion"] == want["diffusion"]                 # schedule, learn_sigma, T: the paper's
    assert identity["dataset"]["name"] == want["dataset"] and identity["dataset"]["random_flip"] is True
    assert identity["backbone"]["name"] == want["backbone"]["name"]
    assert identity["backbone"]["size"] == CPU_SIZE[want["backbone"]["name"]]
    assert {k: identity["backbone"][k] for k in want["backbone"] if k not in ("name", "size")} == \
        {k: v for k, v in want["backbone"].items() if k not in ("name", "size")}  # patch size, drop path
    assert identity["backbone"]["learn_sigma"] is want["diffusion"]["learn_sigma"]
    for key in ("lr", "weight_decay", "grad_clip", "ema_decay", "ema_warmup", "class_dropout_prob"):
        if key in want["train"]:
            assert identity["train"][key] == want["train"][key], key
    if want["dataset"] == "imagenet_latents":
        assert identity["dataset"]["latents"]["flips"] is True
    if name.startswith("lit"):
        assert identity["init_from"] == str(data["dit"])
        assert identity["distill"] == {"teacher": str(data["dit"]), **want["distill"]}
    else:
        assert identity["init_from"] is None and identity["distill"] is None
    if "crop" in want:
        assert identity["dataset"]["crop"] == want["crop"]
    assert identity["dataset"].get("unconditional", False) is want.get("unconditional", False)

    samples = np.load(run_dir / "samples.npz")["arr_0"]
    classes = 1 if want.get("unconditional") else {"cifar10": 10, "celeba64": 1, "imagenet_latents": 2}[want["dataset"]]
    assert samples.shape[0] == classes and samples.shape[-1] == 3 and samples.dtype == np.uint8


def test_official_dit_state_dict_is_a_teacher_as_released(data):
    """distill.teacher= takes a bare DiT state_dict (the released DiT-XL-2-256x256.pt layout) without extra keywords:
    the architecture is read off its shapes and its (depth, width) preset."""
    import backbones
    from diffusion.distill import load_teacher, official_dit_kwargs

    state = torch.load(data["dit"], weights_only=True)
    kwargs = official_dit_kwargs(state)
    assert kwargs == dict(size="cpu", patch_size=2, input_size=8, in_channels=4, num_classes=2,
                          class_dropout_prob=0.1, learn_sigma=True)
    teacher = load_teacher(data["dit"])
    reference = backbones.build("dit", **kwargs)
    reference.load_state_dict(state)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    torch.testing.assert_close(teacher(x, t, y), reference.eval()(x, t, y))
    # XL/2 at 256 px: the released file's shapes
    with torch.device("meta"):  # shapes only
        xl = backbones.build("dit", size="XL", patch_size=2, input_size=32, in_channels=4, num_classes=1000)
    assert official_dit_kwargs(xl.state_dict()) == dict(size="XL", patch_size=2, input_size=32, in_channels=4,
                                               num_classes=1000, class_dropout_prob=0.1, learn_sigma=True)


def test_experiment_yamls_all_have_a_cpu_variant():
    names = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")}
    assert names == set(EXPERIMENTS) | {f"{n}_cpu" for n in EXPERIMENTS}
