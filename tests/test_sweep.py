"""bench.sweep: one atomic CSV row per point, resume, failures recorded, multi-backbone selection."""

import csv

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import sweep
from bench.schema import RUN_COLUMNS
from diffusion.trainer import load_checkpoint

TINY_POINTS = {
    "dit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 2},
            {"size": "S", "patch_size": 4, "depth": 1, "hidden_size": 32, "num_heads": 2}],
    "lit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 3}],  # 32 % 3: fails
}


def sweep_config(tmp_path, overrides=()):
    base = [f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}",
            f"cache_dir={tmp_path / 'cache'}", "dataset=digits", "sweep.image_size=8", "sweep.num_samples=80",
            "sweep.train.steps=2", "sweep.train.batch_size=8", "sweep.train.ckpt_every=1", "eval.steps=2",
            "progress=false", "threads=2"]
    with initialize_config_dir(config_dir=str(sweep.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=base + list(overrides))
    cfg.sweep.points = OmegaConf.create(TINY_POINTS)
    return cfg


def rows(tmp_path):
    with open(tmp_path / "results" / "digits" / "runs.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RUN_COLUMNS
        return list(reader)


def test_sweep_writes_rows_records_failures_and_resumes(tmp_path, capsys):
    cfg = sweep_config(tmp_path, ["backbones=[dit,lit]"])
    sweep.run_sweep(cfg)
    out = rows(tmp_path)
    assert [r["status"] for r in out] == ["ok", "ok", "failed"]
    ok = out[0]
    assert ok["backbone"] == "dit" and ok["patch"] == "2" and ok["width"] == "32" and ok["depth"] == "1"
    assert ok["metric_name"] == "fd_digits_classifier" and float(ok["metric_value"]) > 0
    assert 0 <= float(ok["classifier_accuracy"]) <= 1
    assert float(ok["train_compute_gmacs"]) == pytest.approx(float(ok["gmacs"]) * 3 * 8 * 2)
    assert int(ok["params"]) > 0 and float(ok["train_img_per_s"]) > 0 and float(ok["sample_img_per_s"]) > 0
    assert "divisible" in out[2]["error"]
    assert "dit" in capsys.readouterr().out  # summary table

    # a rerun skips finished points (their run dirs are not touched) and retries the failed one in place
    mtime = (tmp_path / "runs" / "digits" / out[0]["point_id"] / "checkpoints" / "last.pt").stat().st_mtime
    sweep.run_sweep(cfg)
    again = rows(tmp_path)
    assert [r["point_id"] for r in again] == [r["point_id"] for r in out]  # no duplicates
    assert (tmp_path / "runs" / "digits" / out[0]["point_id"] / "checkpoints" / "last.pt").stat().st_mtime == mtime


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path, ["backbone=dit", "sweep.train.steps=3"])
    calls = []
    real_score = None

    class Boom(Exception):
        pass

    def failing_make_scorer(cfg):
        nonlocal real_score
        real_score = make_scorer(cfg)

        class S:
            def score(self, samples, labels):
                calls.append(len(samples))
                raise KeyboardInterrupt  # killed during evaluation, after training finished
        return S()

    make_scorer = sweep.make_scorer
    monkeypatch.setattr(sweep, "make_scorer", failing_make_scorer)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "results" / "digits" / "runs.csv").exists()  # no half row
    pid = sweep.point_id("dit", TINY_POINTS["dit"][0], cfg)
    assert load_checkpoint(tmp_path / "runs" / "digits" / pid)["step"] == 3
    monkeypatch.setattr(sweep, "make_scorer", make_scorer)
    sweep.run_sweep(cfg)
    assert [r["status"] for r in rows(tmp_path)] == ["ok", "ok"]
    assert load_checkpoint(tmp_path / "runs" / "digits" / pid)["step"] == 3  # not retrained


def test_unknown_backbone_and_missing_grid_entry_are_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="available backbones"):
        sweep.grid_points(sweep_config(tmp_path, ["backbones=[nope]"]))
    with pytest.raises(ValueError, match="has no points for backbone 'dico'"):
        sweep.grid_points(sweep_config(tmp_path, ["backbone=dico"]))


def test_upsert_replaces_rows_atomically(tmp_path):
    path = tmp_path / "runs.csv"
    sweep.upsert_row(path, {"point_id": "a", "status": "failed", "error": "x, with comma"})
    sweep.upsert_row(path, {"point_id": "b", "status": "ok"})
    sweep.upsert_row(path, {"point_id": "a", "status": "ok"})
    got = sweep.read_rows(path)
    assert [(r["point_id"], r["status"]) for r in got] == [("b", "ok"), ("a", "ok")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(KeyError, match="not in bench.schema"):
        sweep.upsert_row(path, {"point_id": "c", "bogus": 1})
