"""The shared trainer: exact resume, divergence handling, checkpoints, logs, samples, sampler CLI."""

import csv

import pytest
import torch
from helpers import TINY_DIT, train_config  # helpers also registers the test_diverging backbone

import backbones
from backbones.dit import DiT
from diffusion import sample as sample_cli
from diffusion.trainer import DivergenceError, build_from_checkpoint, load_checkpoint, train


def read_log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train(train_config(full, TINY_DIT + ["train.steps=6", "train.ckpt_every=3"]))

    part = tmp_path / "part"

    def crash_after_4(step, metrics):
        if step == 4:
            raise Interrupt  # killed after step 4: the last checkpoint is step 3

    with pytest.raises(Interrupt):
        train(train_config(part, TINY_DIT + ["train.steps=6", "train.ckpt_every=3"]), on_step=crash_after_4)
    assert load_checkpoint(part)["step"] == 3
    train(train_config(part, TINY_DIT + ["train.steps=6", "train.ckpt_every=3", f"resume={part}"]))

    log_full, log_part = read_log(full), read_log(part)
    assert [r["step"] for r in log_part] == [str(i) for i in range(1, 7)]  # no duplicated step 4
    assert [r["loss"] for r in log_part] == [r["loss"] for r in log_full]
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_checkpoint_contents_and_rebuild(tmp_path):
    summary = train(train_config(tmp_path, TINY_DIT + ["sample.per_class=1", "sample.steps=5"]))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(ckpt) == {"model", "ema", "opt", "step", "config"}
    assert {"key", "identity", "history", "backbone_name", "backbone_kwargs"} <= set(ckpt["config"])
    assert ckpt["step"] == 4 and ckpt["config"]["backbone_name"] == "dit"
    model = build_from_checkpoint(ckpt)
    assert isinstance(model, DiT) and model.input_size == 8 and model.in_channels == 1
    assert (tmp_path / "config.yaml").read_text().count("backbone:") == 1
    assert summary["steps"] == 4 and summary["final_loss"] == pytest.approx(float(read_log(tmp_path)[-1]["loss"]),
                                                                           rel=1e-5)
    import numpy as np
    arr = np.load(tmp_path / "samples.npz")
    assert arr["arr_0"].shape == (10, 8, 8, 1) and arr["arr_0"].dtype == np.uint8
    assert list(arr["labels"]) == list(range(10))
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "history.yaml").exists()


def test_ema_update_and_warmup_decay():
    from diffusion.trainer import ema_decay_at, update_ema

    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999, warmup=True) == 0.999 and ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, model, 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * before + 0.25 * model.weight.detach())




def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = train_config(tmp_path, ["backbone=dit", "backbone.name=test_diverging", "backbone.depth=1",
                                  "backbone.hidden_size=32", "backbone.num_heads=2"])
    with pytest.raises(DivergenceError, match="at step 3"):
        train(cfg)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary leftovers


def test_resume_with_other_backbone_config_is_refused(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    with pytest.raises(ValueError, match=r"backbone.depth: 2 -> 3"):
        train(train_config(tmp_path, ["backbone=dit", "backbone.depth=3", "backbone.hidden_size=64",
                                      "backbone.num_heads=4", f"resume={tmp_path}"]))


def test_sample_cli_ddpm_and_ddim_with_cfg(tmp_path, capsys):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    for sampler in ("ddpm", "ddim"):
        out = tmp_path / f"s-{sampler}"
        assert sample_cli.main([str(tmp_path), "--sampler", sampler, "--steps", "4", "--cfg-scale", "1.5",
                                "--per-class", "2", "--classes", "3", "7", "--out", str(out)]) == 0
        import numpy as np
        arr = np.load(out.with_suffix(".npz"))
        assert arr["arr_0"].shape == (4, 8, 8, 1) and list(arr["labels"]) == [3, 7, 3, 7]
        assert out.with_suffix(".png").exists()
    assert sample_cli.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sampling_is_deterministic_for_a_seed(tmp_path):
    from diffusion.sampling import sample_images

    torch.manual_seed(0)
    model = backbones.build("dit", size="S", depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                            num_classes=10)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.02)
    labels = torch.tensor([0, 1, 2])
    a = sample_images(model, labels, steps=5, cfg_scale=2.0, seed=3)
    b = sample_images(model, labels, steps=5, cfg_scale=2.0, seed=3)
    c = sample_images(model, labels, steps=5, cfg_scale=2.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()
