"""Runs are never silently reused, overwritten, mis-resumed or lost; bad input gives a clear error."""

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_DIT, train_config

from diffusion.config import ConfigError, compose
from diffusion.run import (
    RecipeMismatchError,
    RunExistsError,
    claim_new_run_dir,
    read_log,
    steady_throughput,
)
from diffusion.trainer import Interrupted, load_checkpoint, resume_config, train
from runio.files import DiskFullError, atomic_torch_save, atomic_write_text, load_file

REPO = Path(__file__).resolve().parents[1]


def test_resume_with_changed_recipe_is_refused_naming_the_settings(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    with pytest.raises(RecipeMismatchError, match=r"train\.lr: 0\.001 -> 0\.0005.*allow_changes=\[train\.lr\]"):
        train(train_config(tmp_path, TINY_DIT + ["train.steps=4", "train.lr=5e-4", f"resume={tmp_path}"]))
    with pytest.raises(RecipeMismatchError, match="seed"):
        train(train_config(tmp_path, TINY_DIT + ["train.steps=4", "seed=3", f"resume={tmp_path}"]))
    with pytest.raises(RecipeMismatchError, match="diffusion.noise_schedule"):
        train(train_config(tmp_path, TINY_DIT + ["train.steps=4", "diffusion.noise_schedule=cosine",
                                                 f"resume={tmp_path}"]))
    assert load_checkpoint(tmp_path)["step"] == 2  # nothing trained under the wrong recipe


def test_allowed_change_applies_and_is_recorded(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    train(train_config(tmp_path, TINY_DIT + ["train.steps=4", "train.lr=5e-4", "allow_changes=[train.lr]",
                                             f"resume={tmp_path}"]))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4
    assert [g["lr"] for g in ckpt["opt"]["param_groups"]] == [5e-4, 5e-4]  # the new rate really applies
    history = ckpt["config"]["history"]
    assert [h["start_step"] for h in history] == [0, 2]
    assert history[1]["changes"] == {"train.lr": [1e-3, 5e-4]}
    assert "train.lr" in (tmp_path / "history.yaml").read_text()


def test_resume_dir_alone_restores_the_runs_own_config(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2", "train.lr=2e-3"]))
    cfg = resume_config(tmp_path, ["train.steps=3"])
    assert cfg.backbone.depth == 2 and cfg.train.lr == 2e-3 and cfg.dataset.name == "digits"
    summary = train(cfg)
    assert summary["steps"] == 3 and load_checkpoint(tmp_path)["config"]["history"][1]["changes"] == {}


def test_fresh_run_never_replaces_an_existing_run(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run; continue it with resume="):
        train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_concurrent_default_run_dirs_are_distinct(tmp_path):
    a = claim_new_run_dir(None, tmp_path, "dit-20261202-101500-abcdef")
    b = claim_new_run_dir(None, tmp_path, "dit-20261202-101500-abcdef")
    assert a != b and a.is_dir() and b.is_dir()


def test_torn_log_row_is_dropped_and_resume_keeps_working(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2", "train.ckpt_every=2"]))
    log = tmp_path / "log.csv"
    log.write_text(log.read_text() + "3,0.5,0.4")  # a killed write: partial row, no newline
    train(train_config(tmp_path, TINY_DIT + ["train.steps=4", f"resume={tmp_path}"]))
    rows = read_log(log)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] not in ("", "None") for r in rows)
    train(train_config(tmp_path, TINY_DIT + ["train.steps=5", f"resume={tmp_path}"]))  # and again
    assert [int(r["step"]) for r in read_log(log)] == [1, 2, 3, 4, 5]


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".last.pt.{dead}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".last.pt.{os.getpid()}.def456.tmp"  # a writer that is still running: kept
    live.write_bytes(b"y")
    atomic_torch_save({"a": torch.ones(1)}, target)
    assert not stale.exists() and live.exists() and target.exists()


def test_disk_full_and_empty_files_are_named_in_plain_words(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_write_text(target, "old")

    def full(f):
        raise OSError(28, "No space left on device")

    from runio import files

    with pytest.raises(DiskFullError, match="disk full while writing .*last.pt.*left unchanged"):
        files.atomic_write(target, full)
    assert target.read_text() == "old" and not list(tmp_path.glob(".*tmp"))

    def torn_zip(obj, f):  # what torch.save raises when its zip writer cannot write
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4352")

    monkeypatch.setattr(files.torch, "save", torn_zip)
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1024, 1024))
    with pytest.raises(DiskFullError, match="disk full"):
        files.atomic_torch_save({"a": 1}, target)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"empty \(0 bytes\)"):
        load_file(empty)


def test_divergence_before_the_first_checkpoint_says_so_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    cfg = train_config(run_dir, ["backbone=dit", "backbone.name=test_diverging", "backbone.depth=1",
                                 "backbone.hidden_size=32", "backbone.num_heads=2", "train.ckpt_every=10",
                                 "train.steps=20"])

    with pytest.raises(Exception, match="no checkpoint had been written yet"):
        train(cfg)
    assert not run_dir.exists()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    def press_ctrl_c(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=f"interrupted at step 2; .*resume={tmp_path}"):
        train(train_config(tmp_path, TINY_DIT + ["train.steps=6", "train.ckpt_every=5"]), on_step=press_ctrl_c)
    assert load_checkpoint(tmp_path)["step"] == 2
    train(train_config(tmp_path, TINY_DIT + ["train.steps=3", f"resume={tmp_path}"]))
    assert load_checkpoint(tmp_path)["step"] == 3


def test_init_from_matching_nothing_is_an_error(tmp_path):
    src = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.ones(3)}, src)
    with pytest.raises(ValueError, match="no tensor of the checkpoint matches"):
        train(train_config(tmp_path / "run", TINY_DIT + [f"init_from={src}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size=0 is out of range"),
    ("train.batch_size=-4", "train.batch_size=-4 is out of range"),
    ("train.steps=-1", "train.steps=-1 is out of range"),
    ("backbone.patch_size=0", "backbone.patch_size=0 must be a positive integer"),
    ("train.lr=abc", "could not be converted to Float; full_key: train.lr"),
    ("train.precision=fp64", r"expected one of \[auto, fp32, bf16\]"),
    ("sample.sampler=euler", r"expected one of \[ddpm, ddim\]"),
    ("sample.cfg_scale=nan", "sample.cfg_scale=nan is out of range"),
    ("+train.unknown_key=1", "Key 'unknown_key' not in 'TrainConfig'"),
    ("backbone.size=Q", "not a preset of dit; choose one of"),
    ("+backbone.input_size=3", "data shape comes from dataset"),
])
def test_bad_config_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("train", ["dataset=digits", override])


def test_cli_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusion.train", "dataset=digits", "train.batch_size=0",
                           f"run_dir={tmp_path / 'r'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.batch_size=0 is out of range")
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_steady_throughput_skips_warm_up_windows():
    rows = [{"img_per_s": ""}, {"img_per_s": "100"}, {"img_per_s": "300"}, {"img_per_s": "200"}]
    assert steady_throughput(rows) == 200
    assert math.isnan(steady_throughput([{"img_per_s": ""}]))  # no steady window yet


def test_trainer_logs_no_throughput_for_the_warm_up_window(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=6", "train.log_every=2"]))
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["img_per_s"] != "" for r in rows] == [False, False, False, True, False, True]
    assert {r["session"] for r in rows} == {"1"}


def test_peak_memory_measures_the_training_step_not_the_dataset(tmp_path, monkeypatch):
    """A 195 MiB in-memory dataset must not show up in the run's peak memory (it is loaded before the window)."""
    from diffusion import trainer
    from diffusion.data import ImageDataset

    n = 50_000
    big = ImageDataset("digits", torch.zeros(n, 1, 32, 32).uniform_(-1, 1), torch.arange(n) % 10, 10,
                       [str(i) for i in range(10)])
    assert big.images.nbytes > 190 * 2**20
    monkeypatch.setattr(trainer, "_load_data", lambda cfg: big)
    summary = train(train_config(tmp_path, TINY_DIT + ["train.steps=3", "train.batch_size=8"]))
    assert 0 <= summary["peak_mem_mb"] < 100, summary["peak_mem_mb"]
    assert load_checkpoint(tmp_path)["config"]["history"][0]["peak_mem_mb"] == summary["peak_mem_mb"]


def test_peak_memory_is_not_hidden_by_memory_freed_earlier_in_the_process(tmp_path):
    """In a sweep one process trains point after point: the second point's peak must not read low because the
    first one's freed pages are reused (the CPU measurement returns free heap pages to the OS first)."""
    overrides = TINY_DIT + ["backbone.hidden_size=128", "train.steps=4", "train.batch_size=128",
                            "dataset.image_size=16"]
    first = train(train_config(tmp_path / "a", overrides))["peak_mem_mb"]
    second = train(train_config(tmp_path / "b", overrides))["peak_mem_mb"]
    assert first > 50 and second > 0.75 * first, (first, second)


def test_git_commit_is_the_one_the_process_loaded_not_the_checkouts_current(monkeypatch):
    """A sweep records the commit of the code it runs: commits made while it runs must not change its rows."""
    import runio.env

    loaded = runio.env.git_commit()
    assert loaded == "unknown" or len(loaded.removesuffix("-dirty")) >= 4  # a short hash (may lag the checkout)

    def moved_on(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout="abc1234\n", stderr="")

    monkeypatch.setattr(runio.env.subprocess, "run", moved_on)  # the checkout is now at another commit
    assert runio.env._read_git_commit() == "abc1234-dirty"
    assert runio.env.git_commit() == loaded
