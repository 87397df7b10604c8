"""bench.sweep: one row per point key, reuse only under the same key, resume, failures recorded, locks."""

import csv

import pytest
from omegaconf import OmegaConf

from bench import sweep
from bench.schema import RUN_COLUMNS
from diffusion.config import ConfigError, compose
from diffusion.trainer import load_checkpoint

TINY_POINTS = {
    "dit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 2},
            {"size": "S", "patch_size": 4, "depth": 1, "hidden_size": 32, "num_heads": 2}],
    "lit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 3}],  # 32 % 3: fails
}


def sweep_config(tmp_path, overrides=(), points=TINY_POINTS):
    base = [f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}",
            f"cache_dir={tmp_path / 'cache'}", "dataset=digits", "dataset.image_size=8", "eval.num_samples=80",
            "train.steps=2", "train.batch_size=8", "train.ckpt_every=1", "eval.steps=2", "progress=false",
            "threads=2"]
    cfg = compose("bench", base + list(overrides))
    cfg.sweep.points = OmegaConf.create(points)
    return cfg


def rows(tmp_path):
    with open(tmp_path / "results" / "digits" / "runs.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RUN_COLUMNS
        return list(reader)


def test_sweep_writes_rows_records_failures_and_reuses_only_same_key(tmp_path, capsys):
    cfg = sweep_config(tmp_path)
    sweep.run_sweep(cfg)
    out = rows(tmp_path)
    assert [r["status"] for r in out] == ["ok", "ok", "failed"]
    ok = out[0]
    assert ok["backbone"] == "dit" and ok["patch"] == "2" and ok["width"] == "32" and ok["depth"] == "1"
    assert ok["metric_name"] == "fd_digits_classifier" and float(ok["metric_value"]) > 0
    assert 0 <= float(ok["classifier_accuracy"]) <= 1
    assert float(ok["train_compute_gmacs"]) == pytest.approx(float(ok["gmacs"]) * 3 * 8 * 2)
    assert int(ok["params"]) > 0 and float(ok["sample_img_per_s"]) > 0
    assert ok["point_key"].startswith("dit-S-2-digits8-s2-") and ok["run_key"] and ok["recipe_key"]
    assert out[0]["recipe_key"] == out[1]["recipe_key"] != "" and out[0]["run_key"] != out[1]["run_key"]
    assert "divisible" in out[2]["error"]

    # a rerun reuses finished rows (announced), leaves their run dirs untouched, retries the failed point
    ckpt = tmp_path / "runs" / "digits" / sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]),
                                                           _digits())["train_key"] / "checkpoints" / "last.pt"
    mtime = ckpt.stat().st_mtime
    capsys.readouterr()
    sweep.run_sweep(cfg)
    assert "reusing row dit-S-2-digits8" in capsys.readouterr().out
    again = rows(tmp_path)
    assert [r["point_key"] for r in again] == [r["point_key"] for r in out]  # no duplicates
    assert ckpt.stat().st_mtime == mtime

    # a changed recipe is a new point: new rows, the old ones stay distinguishable
    sweep.run_sweep(sweep_config(tmp_path, ["train.lr=5e-4"], {"dit": TINY_POINTS["dit"][:1]}))
    after = rows(tmp_path)
    assert len(after) == 4 and after[-1]["lr"] == "0.0005" and after[-1]["point_key"] != out[0]["point_key"]

    # only the evaluation changed: a new row, but the trained checkpoint is reused (announced)
    capsys.readouterr()
    sweep.run_sweep(sweep_config(tmp_path, ["eval.cfg_scale=1.5"], {"dit": TINY_POINTS["dit"][:1]}))
    assert "reusing the trained checkpoint" in capsys.readouterr().out
    assert len(rows(tmp_path)) == 5 and ckpt.stat().st_mtime == mtime


def _digits():
    from diffusion.data import load_dataset

    return load_dataset("digits", "train", 8)


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path, ["backbone=dit", "train.steps=3"], {"dit": TINY_POINTS["dit"]})
    real = sweep.make_scorer

    def interrupted_scorer(cfg):
        class S:
            class_names = None

            def score(self, samples, labels):
                raise KeyboardInterrupt  # killed during evaluation, after training finished
        return S()

    monkeypatch.setattr(sweep, "make_scorer", interrupted_scorer)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "results" / "digits" / "runs.csv").exists()  # no half row
    keys = sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]), _digits())
    run_dir = tmp_path / "runs" / "digits" / keys["train_key"]
    assert load_checkpoint(run_dir)["step"] == 3
    monkeypatch.setattr(sweep, "make_scorer", real)
    sweep.run_sweep(cfg)
    assert [r["status"] for r in rows(tmp_path)] == ["ok", "ok"]
    assert load_checkpoint(run_dir)["step"] == 3 and len(load_checkpoint(run_dir)["config"]["history"]) == 1


def test_a_point_locked_by_another_sweep_is_skipped(tmp_path, capsys):
    cfg = sweep_config(tmp_path, ["backbone=dit"], {"dit": TINY_POINTS["dit"][:1]})
    keys = sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]), _digits())
    lock = tmp_path / "runs" / "digits" / (keys["train_key"] + ".lock")
    with sweep.point_lock(lock):
        sweep.run_sweep(cfg)
    assert "being trained by another sweep" in capsys.readouterr().out
    assert not (tmp_path / "results" / "digits" / "runs.csv").exists()


def test_unknown_backbone_and_missing_grid_entry_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="Could not find 'backbone/nope'"):
        sweep_config(tmp_path, ["backbone=nope"])
    with pytest.raises(ConfigError, match="has no points for backbone 'dico'"):
        sweep.selected_backbones(sweep_config(tmp_path, ["backbone=dico"]))
