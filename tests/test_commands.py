"""Every command the README and the module docstrings show runs as written (plus tiny overrides), and every
entry point's --help works.

Commands run in a scratch folder, in order, so that ``runs/<dataset>/latest`` written by a training command is
what the following resume and sample commands use. Tiny overrides keep each command to seconds; Fashion-MNIST is
a small idx copy made here (``dataset.root=``), so the test needs neither the Debian package nor the network.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["diffusion.train", "diffusion.sample", "diffusion.extract_latents", "bench.sweep", "bench.demo",
                "bench.plots", "bench.tokens", "bench.fid", "bench.official", "bench.report",
                "bench.stitch", "bench.throughput"]

TINY_TRAIN = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "sample.per_class=1", "sample.steps=2",
              "progress=false", "threads=1"]
TINY_BENCH = ["train.steps=2", "train.batch_size=8", "eval.num_samples=20", "eval.steps=2", "progress=false",
              "threads=1"]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith((".venv/bin/python -m", "python -m")):
                commands.append(line)
    return commands


def docstring_commands() -> list[str]:
    commands = []
    for path in sorted([*REPO.glob("diffusion/*.py"), *REPO.glob("bench/*.py")]):
        doc = path.read_text().split('"""')
        if len(doc) < 2:
            continue
        lines = doc[1].splitlines()
        for i, line in enumerate(lines):
            line = line.split("  #")[0].strip()
            if not line.startswith("python -m"):
                continue
            while line.endswith("\\") and i + 1 < len(lines):  # a continued command (`\\` in the source)
                i += 1
                line = line.rstrip("\\").strip() + " " + lines[i].split("  #")[0].strip()
            commands.append(line)
    return commands


def fake_fashion_mnist(root: Path, n: int = 64) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", n)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, count) + labels.tobytes())


def replace_values(args: list[str], values: dict[str, str]) -> list[str]:
    """``key=value`` overrides and ``--flag value`` options of ``args`` with the values of ``values`` (keys as
    written: ``dataset.root`` or ``--checkpoint``); keys not present are appended."""
    out, seen, i = [], set(), 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        if key in values and "=" in a and not a.startswith("-"):
            out.append(f"{key}={values[key]}")
            seen.add(key)
        elif a in values and a.startswith("--"):
            out += [a, values[a]]
            seen.add(a)
            i += 1
        else:
            out.append(a)
        i += 1
    for key, value in values.items():
        if key not in seen:
            out += [key, value] if key.startswith("--") else [f"{key}={value}"]
    return out


def tiny(command: str, fmnist: Path, scratch: Path, user: dict | None = None) -> list[str]:
    args = shlex.split(command)
    if args[0].startswith(".venv/"):
        args[0] = sys.executable
    elif args[0] == "python":
        args[0] = sys.executable
    module = args[2]
    multirun = "-m" in args[3:]
    extra: list[str] = []
    if module == "diffusion.train":
        extra = list(TINY_TRAIN)
        args = [a if a != "backbone.size=XL" else "backbone.size=cpu" for a in args]  # paper size -> CPU preset
        if any(a.startswith("resume=") for a in args):
            extra = [e for e in extra if not e.startswith("train.steps")] + ["train.steps=3"]
    elif module in ("bench.sweep", "bench.demo"):
        extra = TINY_BENCH + [f"results_dir={scratch / 'results'}", f"cache_dir={scratch / 'cache'}"]
        if not any(a.startswith("dataset=") for a in args):
            extra.append("dataset=digits")  # the metric classifier trains in seconds on digits
    elif module == "diffusion.sample":
        extra = ["--steps", "2", "--per-class", "1"]
    elif module == "diffusion.extract_latents":  # the user's ImageNet and VAE -> small stand-ins in their formats
        args = replace_values(args, {"dataset.root": str(user["imagenet"]), "vae": str(user["vae"]),
                                     "dataset.image_size": "16", "progress": "false", "device": "cpu"})
    elif module == "bench.official":  # the 675M-parameter release -> a DiT "cpu" file in its layout; random Inception
        args = replace_values(args, {"--size": "cpu", "--checkpoint": str(user["dit"]), "--vae": str(user["vae"]),
                                     "--reference": str(user["ref"]), "--image-size": "16", "--num-classes": "2",
                                     "--num-samples": "4", "--steps": "2", "--device": "cpu",
                                     "--inception-weights": str(user["inception"]),
                                     "--results-dir": str(scratch / "results")})
        extra = ["--no-progress"]
    elif module == "bench.stitch":
        extra = ["eval.num_samples=20", "eval.steps=2", "progress=false", "threads=1",
                 f"results_dir={scratch / 'results'}", f"cache_dir={scratch / 'cache'}"]
    elif module == "bench.tokens":
        extra = ["--tokens", "16", "--repeats", "1", "--out", str(scratch / "tokens"),
                 "--plots-out", str(scratch / "plots")]
    elif module == "bench.throughput":  # S presets at 32x32x4 -> the cpu presets at 8x8x1; no compile (minutes)
        args = replace_values(args, {"--switches": "grad_checkpoint"} if "--switches" in args else {})
        extra = ["--sizes", "cpu", "--resolution", "8", "--channels", "1", "--num-classes", "10", "--batch", "4",
                 "--warmup", "0", "--repeats", "1", "--rounds", "2", "--matmul-sizes", "32",
                 "--out", str(scratch / "throughput")]
    if any("fashion_mnist" in a for a in args) and module not in ("diffusion.sample",):
        extra.append(f"dataset.root={fmnist}")
    if multirun:
        extra = [e for e in extra if not e.startswith("threads")] + ["threads=1"]
    return args + extra


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    fmnist = root / "fmnist"
    fmnist.mkdir()
    fake_fashion_mnist(fmnist)
    return root, fmnist


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """Stand-ins, in the real formats, for what the README's GPU-scale commands read from the user's disk."""
    from fakedata import fake_imagenet, fake_official_dit, random_inception_weights, tiny_vae

    from bench.metrics import write_statistics

    base = tmp_path_factory.mktemp("user")
    return {"imagenet": fake_imagenet(base / "imagenet" / "train"), "vae": tiny_vae(base / "vae"),
            "dit": fake_official_dit(base / "DiT-cpu.pt", size="cpu", input_size=8, num_classes=2),
            "inception": random_inception_weights(base / "inception.pth"),
            "ref": write_statistics(base / "ref.npz", np.zeros(2048), np.eye(2048))}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_and_docstring_commands_run_as_written(scratch, user_files):
    root, fmnist = scratch
    commands = readme_commands()
    assert any("diffusion.train" in c for c in commands) and any("bench.sweep" in c for c in commands)
    failures = []
    for command in commands + docstring_commands():
        args = tiny(command, fmnist, root, user_files)
        proc = run(args, root)
        if proc.returncode != 0:
            failures.append(f"{command}\n  -> {' '.join(args)}\n  exit {proc.returncode}: {proc.stderr[-1500:]}")
    assert not failures, "\n".join(failures)


HELP_DRIVER = """
import contextlib, io, json, os, runpy, sys
results, root, modules = {}, sys.argv[1], sys.argv[2:]
for module in modules:
    folder = os.path.join(root, module)
    os.makedirs(folder)
    os.chdir(folder)
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException as error:
            code, _ = 1, print(repr(error), file=err)
    results[module] = dict(code=code, out=out.getvalue(), err=err.getvalue()[-2000:], written=os.listdir(folder))
print(json.dumps(results))
"""


def test_every_entry_point_has_help(tmp_path):
    """``python -m <entry point> --help`` of every entry point, run as __main__ one after the other in ONE fresh
    interpreter (one torch import instead of twelve): exit 0, at least three lines naming the command, nothing
    written to the working directory."""
    proc = run([sys.executable, "-c", HELP_DRIVER, str(tmp_path), *ENTRY_POINTS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(results) == ENTRY_POINTS
    for module, r in results.items():
        assert r["code"] == 0, (module, r["err"])
        assert len(r["out"].strip().splitlines()) >= 3, module
        assert module.split(".")[1] in r["out"] or module in r["out"], module
        assert not r["written"], (module, r["written"])  # --help writes nothing
