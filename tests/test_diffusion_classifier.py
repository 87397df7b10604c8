"""Diffusion-classifier accuracy (bench.diffusion_classifier): stubs whose epsilon error is known by construction,
(t, eps) pairing across classes, determinism, the timestep schedule, a tiny real backbone, the fixed subset."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import backbones
from bench.diffusion_classifier import (
    diffusion_classifier_accuracy,
    diffusion_classifier_errors,
    fixed_subset,
    trial_timesteps,
)
from diffusion import create_diffusion

NUM_CLASSES, C, H = 4, 2, 4
COSINE_100 = {"noise_schedule": "cosine", "diffusion_steps": 100}


class Sched(str, enum.Enum):
    cosine = "cosine"


@dataclasses.dataclass
class Section:  # a structured config section like the run's ``diffusion`` (enum-valued schedule)
    noise_schedule: Sched = Sched.cosine
    learn_sigma: bool = True
    diffusion_steps: int = 100


def _templates(seed: int = 0) -> torch.Tensor:
    return torch.rand((NUM_CLASSES, C, H, H), generator=torch.Generator().manual_seed(seed)) * 2 - 1


class TemplateStub(nn.Module):
    """Backbone interface; class y 'believes' the clean image is ``templates[source[y]]`` and returns the epsilon
    that this x_0 implies for x_t (exact when it is the true x_0), plus ``offsets[y]``. Its learned-variance half is
    a large class-dependent constant: scoring it would change the ranking. Records every (x_t, t, y) it sees."""

    def __init__(self, templates: torch.Tensor, diffusion_cfg: dict, source: list[int] | None = None,
                 offsets: list[float] | None = None, learn_sigma: bool = True):
        super().__init__()
        self.in_channels, self.input_size, self.num_classes = templates.shape[1], templates.shape[-1], len(templates)
        self.learn_sigma = learn_sigma
        d = create_diffusion("", **diffusion_cfg)
        self.register_buffer("templates", templates)
        self.register_buffer("sa", torch.as_tensor(d.sqrt_alphas_cumprod, dtype=torch.float64))
        self.register_buffer("s1m", torch.as_tensor(d.sqrt_one_minus_alphas_cumprod, dtype=torch.float64))
        self.source = torch.as_tensor(source if source is not None else range(len(templates)))
        self.offsets = torch.as_tensor(offsets if offsets is not None else [0.0] * len(templates))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), y.clone()))
        assert not self.training
        x0 = self.templates[self.source[y]]
        sa, s1m = (v[t].view(-1, 1, 1, 1) for v in (self.sa, self.s1m))
        eps = ((x.double() - sa * x0.double()) / s1m).float() + self.offsets[y].view(-1, 1, 1, 1)
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, 1e3 * (self.num_classes - y).float().view(-1, 1, 1, 1).expand_as(eps)], 1)


def _data(per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    templates = _templates()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return templates, templates[labels], labels


def _tiny_dit(seed: int = 0) -> nn.Module:
    model = backbones.build("dit", size="S", depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                            num_classes=10)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # DiT's adaLN-zero init outputs zeros for every class: give it class-dependent weights
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------- (a) known errors
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_exact_epsilon_for_the_true_class_gives_accuracy_one(learn_sigma):
    templates, images, labels = _data()
    stub = TemplateStub(templates, COSINE_100, learn_sigma=learn_sigma)
    res = diffusion_classifier_accuracy(stub, COSINE_100, images, labels, trials=8, seed=0, batch_size=20)
    assert res["accuracy"] == 1.0
    assert torch.equal(res["predictions"], labels)
    assert res["per_class"] == [1.0] * NUM_CLASSES
    true_err = res["errors"][torch.arange(len(labels)), labels]
    assert true_err.max() < 1e-6  # the epsilon half only: the variance half is ~1e6 per pixel
    assert (res["errors"] + torch.eye(NUM_CLASSES)[labels] * 1e9).min() > 1e-3  # every wrong class pays
    assert (res["num_images"], res["trials"], res["num_classes"]) == (len(labels), 8, NUM_CLASSES)
    assert res["network_evals"] == len(labels) * NUM_CLASSES * 8 == sum(len(y) for _, _, y in stub.calls)


def test_permuted_classes_give_accuracy_zero():
    templates, images, labels = _data()
    source = [2, 0, 3, 1]  # class y believes the image is of class source[y]: a derangement
    stub = TemplateStub(templates, COSINE_100, source=source)
    res = diffusion_classifier_accuracy(stub, COSINE_100, images, labels, trials=8, seed=1)
    assert res["accuracy"] == 0.0
    inverse = torch.argsort(torch.tensor(source))
    assert torch.equal(res["predictions"], inverse[labels])  # the class whose belief is the truth
    assert res["per_class"] == [0.0] * NUM_CLASSES


def test_constant_error_ordering_gives_the_argmin():
    templates, _, _ = _data()
    offsets = [0.9, 0.3, 0.5, 0.7]  # error of class c = offsets[c]^2 whatever the image, t or eps
    stub = TemplateStub(templates, COSINE_100, source=[0] * NUM_CLASSES, offsets=offsets)
    images, labels = templates[[0] * 8], torch.arange(8) % NUM_CLASSES
    res = diffusion_classifier_accuracy(stub, COSINE_100, images, labels, trials=6, seed=0)
    want = torch.tensor(offsets, dtype=torch.float64) ** 2
    assert torch.allclose(res["errors"], want.expand(8, -1), atol=1e-4)
    assert torch.equal(res["predictions"], torch.full((8,), 1))
    assert res["accuracy"] == 0.25 and res["per_class"] == [0.0, 1.0, 0.0, 0.0]


def test_diffusion_config_forms_agree_and_the_schedule_matters():
    templates, images, labels = _data(per_class=1)
    stub = TemplateStub(templates, COSINE_100)

    forms = [COSINE_100, OmegaConf.structured(Section), create_diffusion("", noise_schedule="cosine",
                                                                         diffusion_steps=100)]
    errs = [diffusion_classifier_errors(stub, f, images, trials=5, seed=3)["errors"] for f in forms]
    assert all(torch.equal(errs[0], e) for e in errs[1:])
    assert errs[0][torch.arange(NUM_CLASSES), labels].max() < 1e-6
    linear = {"noise_schedule": "linear", "diffusion_steps": 100}  # not the stub's alphas: no exact epsilon
    wrong = diffusion_classifier_errors(stub, linear, images, trials=5, seed=3)["errors"]
    assert wrong[torch.arange(NUM_CLASSES), labels].max() > 1e-3
    with pytest.raises(ValueError, match="unspaced"):
        diffusion_classifier_errors(stub, create_diffusion("10", diffusion_steps=100), images, trials=2)


# ---------------------------------------------------------------------------------------------- (b) pairing
def test_t_and_eps_are_shared_by_every_class_of_an_image():
    templates, images, labels = _data(per_class=2)
    images = images + 0.01 * torch.arange(len(images)).view(-1, 1, 1, 1)  # distinct images
    stub = TemplateStub(templates, COSINE_100)
    trials = 7
    diffusion_classifier_accuracy(stub, COSINE_100, images, labels, trials=trials, seed=0, batch_size=9)
    seen: dict[tuple, list[int]] = {}
    for x, t, y in stub.calls:
        for i in range(len(y)):
            seen.setdefault((int(t[i]), x[i].numpy().tobytes()), []).append(int(y[i]))
    assert len(seen) == len(images) * trials  # one noisy input per (image, trial) ...
    assert all(sorted(ys) == list(range(NUM_CLASSES)) for ys in seen.values())  # ... scored once by every class
    # ... and the noise of trial k is the same for every image: identical images give identical noisy inputs
    stub.calls.clear()
    diffusion_classifier_accuracy(stub, COSINE_100, images[[0] * 5], labels[[0] * 5], trials=trials, seed=0)
    inputs = {(int(t[i]), x[i].numpy().tobytes()) for x, t, _ in stub.calls for i in range(len(t))}
    assert len(inputs) == trials


# ---------------------------------------------------------------------------------------------- (c) determinism
def test_same_seed_same_result_whatever_the_batch_size():
    model = _tiny_dit()
    images = torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * 2 - 1
    labels = torch.arange(8)
    kw = dict(trials=4, seed=11)
    a = diffusion_classifier_accuracy(model, None, images, labels, batch_size=64, **kw)
    b = diffusion_classifier_accuracy(model, None, images, labels, batch_size=64, **kw)
    assert torch.equal(a["errors"], b["errors"]) and torch.equal(a["predictions"], b["predictions"])
    c = diffusion_classifier_accuracy(model, None, images, labels, batch_size=13, **kw)  # chunks split images
    assert torch.allclose(a["errors"], c["errors"], rtol=1e-5) and torch.equal(a["predictions"], c["predictions"])
    d = diffusion_classifier_accuracy(model, None, images, labels, batch_size=64, trials=4, seed=12)
    assert not torch.allclose(a["errors"], d["errors"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------- (d) timesteps
def test_timesteps_are_evenly_spaced_midpoints():
    templates, images, labels = _data(per_class=1)
    stub = TemplateStub(templates, COSINE_100)
    trials = 7
    res = diffusion_classifier_accuracy(stub, COSINE_100, images, labels, trials=trials, seed=0)
    want = [math.floor((k + 0.5) * 100 / trials) for k in range(trials)]
    assert res["timesteps"].tolist() == want == [7, 21, 35, 50, 64, 78, 92]
    seen = Counter(int(v) for _, t, _ in stub.calls for v in t)
    assert seen == {t: len(images) * NUM_CLASSES for t in want}
    assert trial_timesteps(1000, 250).tolist() == list(range(2, 1000, 4))  # the paper's DiT protocol
    assert trial_timesteps(100, 100).tolist() == list(range(100))
    with pytest.raises(ValueError, match="trials"):
        trial_timesteps(100, 0)


# ---------------------------------------------------------------------------------------------- (e) real backbone
def test_tiny_real_backbone_runs_without_the_null_class_in_eval_mode():
    model = _tiny_dit()
    model.train()
    seen_y, modes = [], []

    def record(module, args):
        seen_y.append(args[2].clone())
        modes.append(module.training)

    model.register_forward_pre_hook(record)
    images = torch.rand((20, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(20) % 10
    res = diffusion_classifier_accuracy(model, {"noise_schedule": "linear", "diffusion_steps": 1000}, images, labels,
                                        trials=5, seed=0, batch_size=128)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["predictions"].shape == (20,) and res["predictions"].dtype == torch.long
    assert res["errors"].shape == (20, 10) and torch.isfinite(res["errors"]).all()
    assert len(res["per_class"]) == 10 and all(0.0 <= a <= 1.0 for a in res["per_class"])
    assert res["accuracy"] == pytest.approx((res["predictions"] == labels).double().mean().item())
    assert res["network_evals"] == 20 * 10 * 5 == sum(len(y) for y in seen_y)
    assert torch.cat(seen_y).max() < model.num_classes and not any(modes)
    assert model.training  # restored
    assert (res["errors"].std(1) > 1e-4).all()  # the class really changes the prediction


def test_bad_labels_are_refused():
    model = _tiny_dit()
    images = torch.zeros((2, 1, 8, 8))
    with pytest.raises(ValueError, match="null class"):
        diffusion_classifier_accuracy(model, None, images, torch.tensor([0, 10]), trials=1)
    with pytest.raises(ValueError, match="integer class labels"):
        diffusion_classifier_accuracy(model, None, images, torch.tensor([0.0, 1.0]), trials=1)


# ---------------------------------------------------------------------------------------------- (f) fixed subset
def test_fixed_subset_is_balanced_nested_and_deterministic():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    idx = fixed_subset(labels, 50, seed=0)
    assert idx.dtype == torch.long and len(set(idx.tolist())) == 50 and torch.equal(idx, idx.sort().values)
    assert Counter(labels[idx].tolist()) == {c: 5 for c in range(10)}
    assert torch.equal(idx, fixed_subset(labels.numpy(), 50, seed=0))
    assert not torch.equal(idx, fixed_subset(labels, 50, seed=1))
    assert set(idx.tolist()) <= set(fixed_subset(labels, 73, seed=0).tolist())
    counts = Counter(labels[fixed_subset(labels, 73, seed=0)].tolist())
    assert max(counts.values()) - min(counts.values()) <= 1
    short = torch.tensor([0] * 20 + [1] * 2 + [2] * 20)  # class 1 has 2 images: it gives both, the others fill in
    assert Counter(short[fixed_subset(short, 12, seed=0)].tolist()) == {0: 5, 1: 2, 2: 5}
    assert len(fixed_subset(labels, 300, seed=0)) == 300
    with pytest.raises(ValueError):
        fixed_subset(labels, 301)
