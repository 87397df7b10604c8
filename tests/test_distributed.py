"""torchrun + DDP on the CPU (gloo): results do not depend on the world size; resume across world sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.trainer import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset=digits", "backbone=dit", "backbone.depth=2", "backbone.hidden_size=32", "backbone.num_heads=2",
        "train.batch_size=16", "train.log_every=1", "train.ckpt_every=2", "sample.per_class=0", "progress=false",
        "threads=1"]


def launch(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train(nproc: int, run_dir: Path, extra: list[str], cwd: Path) -> dict:
    launch(nproc, ["-m", "diffusion.train", *TINY, f"run_dir={run_dir}", *extra], cwd)
    return load_checkpoint(run_dir)


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], atol=atol, rtol=0, msg=f"{key}.{name}")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    one = train(1, tmp_path / "one", ["train.steps=4"], tmp_path)
    two = train(2, tmp_path / "two", ["train.steps=4"], tmp_path)
    assert one["step"] == two["step"] == 4
    assert_same_weights(one, two)
    import backbones

    torch.manual_seed(0)  # the run's seeded initialisation: training must have moved the weights
    init = backbones.build("dit", **one["config"]["backbone_kwargs"]).state_dict()
    assert sum(not torch.equal(init[n], v) for n, v in one["model"].items()) > len(init) // 2
    rows = (tmp_path / "two" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 5 and not (tmp_path / "two.1").exists()  # rank 0 alone wrote one log


@pytest.mark.slow
def test_a_two_process_run_resumes_as_one_process_exactly(tmp_path):
    full = train(1, tmp_path / "full", ["train.steps=4"], tmp_path)
    train(2, tmp_path / "part", ["train.steps=2"], tmp_path)  # stopped at its step-2 checkpoint
    part = train(1, tmp_path / "part", ["train.steps=4", f"resume={tmp_path / 'part'}"], tmp_path)
    assert part["step"] == 4 and [h["start_step"] for h in part["config"]["history"]] == [0, 2]
    assert_same_weights(full, part)


@pytest.mark.slow
def test_global_batch_must_divide_across_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "diffusion.train", *TINY, "train.batch_size=15", f"run_dir={tmp_path / 'r'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "must be divisible by the 2 processes" in proc.stderr


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_distributed_sampling_equals_single_process(tmp_path, nproc):
    launch(1, [str(REPO / "tests" / "dist_sample_worker.py"), str(tmp_path / "one.pt")], tmp_path)
    launch(nproc, [str(REPO / "tests" / "dist_sample_worker.py"), str(tmp_path / "many.pt")], tmp_path)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    many = torch.load(tmp_path / "many.pt", weights_only=True)
    assert one.shape == (23, 1, 8, 8)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_point_sweep_through_the_submitit_local_executor(tmp_path):
    """The cluster launcher's plugin, offline: its local executor runs a two-job multirun into one CSV."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.sweep", "-m", "backbone=dit,lit", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", "dataset=digits", "dataset.image_size=8", "train.steps=2",
           "train.batch_size=8", "eval.num_samples=20", "eval.steps=2", "progress=false", "threads=1",
           f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
           "sweep.points={dit:[{size:cpu,patch_size:4,depth:1,hidden_size:32}],"
           "lit:[{size:cpu,patch_size:4,depth:1,hidden_size:32}]}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from bench.results_csv import read_rows

    rows = read_rows(tmp_path / "results" / "digits" / "runs.csv")
    assert sorted(r["backbone"] for r in rows) == ["dit", "lit"] and all(r["status"] == "ok" for r in rows)
    assert list((tmp_path / "runs").glob("hydra-multirun/*/.submitit"))  # it really went through submitit


def test_cluster_launcher_config_composes_offline():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", ["hydra/launcher=cluster", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == launcher.tasks_per_node == 8 and launcher.partition == "gpu"


@pytest.mark.slow
def test_sweep_under_torchrun_trains_with_ddp_and_rank_0_writes_the_rows(tmp_path):
    base = ["dataset=digits", "dataset.image_size=8", "train.steps=2", "train.batch_size=8", "eval.num_samples=20",
            "eval.steps=2", "progress=false", "threads=1", f"runs_root={tmp_path / 'runs'}",
            f"cache_dir={tmp_path / 'cache'}", "backbone=dit",
            "sweep.points={dit:[{size:cpu,patch_size:4,depth:1,hidden_size:32}]}"]
    launch(1, ["-m", "bench.sweep", *base, f"results_dir={tmp_path / 'one'}"], tmp_path)
    for p in (tmp_path / "runs").glob("digits/*"):  # train again, now with 2 processes
        subprocess.run(["rm", "-rf", str(p)], check=True)
    launch(2, ["-m", "bench.sweep", *base, f"results_dir={tmp_path / 'two'}"], tmp_path)
    from bench.results_csv import read_rows

    one = read_rows(tmp_path / "one" / "digits" / "runs.csv")
    two = read_rows(tmp_path / "two" / "digits" / "runs.csv")
    assert len(one) == len(two) == 1 and two[0]["status"] == "ok"
    assert two[0]["point_key"] == one[0]["point_key"]  # the world size is not part of the recipe
    assert float(two[0]["metric_value"]) == pytest.approx(float(one[0]["metric_value"]), rel=1e-4)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_step(tmp_path):
    launch(2, [str(REPO / "tests" / "dist_nan_worker.py"), str(tmp_path / "run"), str(tmp_path / "report")],
           tmp_path)
    for rank in (0, 1):
        text = (tmp_path / f"report.{rank}").read_text()
        assert text.startswith("diverged: non-finite loss") and "at step 3" in text, text
    assert load_checkpoint(tmp_path / "run")["step"] == 2  # the last good checkpoint is intact
