"""Throughput and utilisation of every backbone: the real trainer step, sampling, peak memory, the matmul rate.

    python -m bench.throughput                                    # every backbone, S presets, 32x32x4, batch 32, fp32
    python -m bench.throughput --backbones dit --switches all     # + one row per speed switch (train.compile, ...)
    python -m bench.throughput --backbones dit --compare-bare     # trainer step vs a bare step, interleaved rounds

Options: --backbones, --sizes (preset per backbone; "S" also picks DiMR's "S/2R"), --patch, --resolution,
--channels, --num-classes, --batch, --precision (fp32 | bf16), --switches (names or "all"), --device, --threads,
--warmup, --repeats, --matmul-sizes, --compare-bare, --rounds, --out (default results/throughput),
--memory-fraction.

Training img/s is the trainer's own step: a Run built by ``diffusion.trainer.build_run`` (the configured
backbone, EMA, AdamW, diffusion) on an in-memory synthetic dataset of the given shape, each step
``diffusion.trainer.train_step`` (batch, t, noise and label dropout drawn from the step seed, forward through the
backbone's ``training_losses``, backward, gradient norm, AdamW, EMA). Sampling img/s is one network evaluation of
the EMA model in eval mode under ``no_grad`` (bf16 rows under bf16 autocast), without CFG and with CFG
(``forward_with_cfg`` on the doubled batch; img/s counts the images, not the doubled rows). Times are medians of
``--repeats`` steps after ``--warmup`` steps, CUDA-synchronised. Peak memory is ``bench.tokens``' measure of one
extra training step, its gradients freed first: the largest extra memory above what exists before it (activations,
gradients, temporaries; CUDA ``max_memory_allocated`` minus ``memory_allocated``, on the CPU live tensor bytes from
the profiler's allocation events); ``state_mem_mb`` is what persists across steps (weights, EMA, optimizer state), so
the step's total is their sum. On out-of-memory the batch is halved and the row measured again; ``batch`` is the
one used (the note says so). On the CPU the process's address space is capped at its size plus
``--memory-fraction`` (0.9) of the memory available at start, so that a step too large fails to allocate (and backs
off) instead of waking the kernel's out-of-memory killer.

Utilisation = achieved multiply-accumulate rate / the device's matmul rate measured in the same run (the best
median of square ``--matmul-sizes`` matmuls in the row's precision; DiT-S/2's GEMMs at batch 32 are 8192 x 384
x 1536, about a 1700^3 square):

    train_util       = 3 x gmacs x train_img_per_s / matmul_gmac_per_s   (backward = 2 x forward, DiT's convention)
    sample_util      = gmacs x sample_img_per_s / matmul_gmac_per_s
    sample_cfg_util  = 2 x gmacs x sample_cfg_img_per_s / matmul_gmac_per_s

with ``gmacs`` the forward GMACs of one image from ``bench.flops`` (batch 1, one evaluation). Only the counted
multiply-accumulates enter: elementwise work, norms, scans (Bi-WKV) and depthwise convolutions' low arithmetic
intensity all show up as lower utilisation.

``--switches`` adds one row per speed switch (``train.<switch>=true``, ``bf16`` = ``train.precision=bf16``) after
the plain row of each backbone, with ``train_speedup`` = its training img/s over the plain row's; a switch the
device cannot run gets a row with status ``not on this device: <reason>``. ``heap_cache`` changes the process for
good (glibc's malloc policy), so its rows come after every other row of the run. ``--compare-bare`` times the trainer
step against a bare step of a copy of the same model (fixed x, t, noise, labels; the diffusion loss, backward and a
default AdamW step; no EMA, no data, no norm) in interleaved rounds (alternating which goes first) and prints
each round's ratio; rows go to ``<out>/<device>-trainer-vs-bare.csv``.

Rows are upserted into ``<out>/<device>.csv`` (atomically, after every row), keyed by backbone, size, patch,
resolution, channels, batch asked, precision and switches, so runs of subsets add up; the plot is
``<out>/<device>.png`` / ``.svg``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import backbones
from bench.flops import build_for_counting, forward_gmacs
from bench.tokens import device_tag, step_peak_memory_mb
from diffusion.config import SwitchUnavailable, backbone_schema, compose
from diffusion.data import ImageDataset
from diffusion.trainer import Run, build_run, train_step
from runio.files import atomic_write

COLUMNS = ["device", "device_name", "backbone", "size", "patch", "resolution", "channels", "batch", "batch_asked",
           "precision", "switches", "params", "gmacs", "train_ms", "train_img_per_s", "train_util", "train_speedup",
           "sample_img_per_s", "sample_cfg_img_per_s", "sample_util", "sample_cfg_util", "peak_mem_mb",
           "state_mem_mb", "mem_method", "matmul_gmac_per_s", "warmup", "repeats", "threads", "torch_version",
           "status", "note"]
KEY = ("backbone", "size", "patch", "resolution", "channels", "batch_asked", "precision", "switches")
BARE_COLUMNS = ["device", "device_name", "backbone", "size", "patch", "resolution", "channels", "batch", "precision",
                "round", "first", "trainer_ms", "bare_ms", "ratio", "trainer_util", "bare_util", "gmacs",
                "matmul_gmac_per_s", "threads", "torch_version"]
# train.<name>=true; "bf16" is train.precision=bf16
SWITCHES = ("bf16", "compile", "channels_last", "fused_adamw", "tf32", "flash_attn", "grad_checkpoint", "heap_cache")
# Switches that change the whole process for good (glibc's malloc policy): their rows come after every other row
PROCESS_WIDE = ("heap_cache",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The official DiT recipe (lr 1e-4, no weight decay, EMA 0.9999 without warm-up, no clipping); speed only
RECIPE = ["train.lr=1e-4", "train.weight_decay=0", "train.ema_decay=0.9999", "train.ema_warmup=false"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, synchronised on CUDA before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


def matmul_rate(device: torch.device, precision: str, sizes: list[int], repeats: int = 3) -> float:
    """GMAC/s of square n x n matmuls in ``precision``: the best of the per-size medians (one warm-up each)."""
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = (torch.randn(n, n, generator=g).to(device, DTYPES[precision]) for _ in range(2))
        seconds = median_time(lambda: torch.mm(a, b), device, warmup=1, repeats=repeats)
        best = max(best, n**3 / seconds / 1e9)
    return best


def resolve_size(name: str, size: str) -> str | None:
    """The preset ``size`` of backbone ``name``, or its first preset ``size/...`` (DiMR: S -> S/2R); None if none."""
    presets = list(getattr(backbones.get(name), "presets", None) or [])
    if not presets or size in presets:
        return size
    return next((p for p in presets if p.startswith(size + "/")), None)


def synthetic_dataset(batch: int, channels: int, resolution: int, num_classes: int) -> ImageDataset:
    """One batch of N(0, 1) latents and uniform labels: every step reads the same images in a new order."""
    g = torch.Generator().manual_seed(0)
    return ImageDataset("synthetic", torch.randn(batch, channels, resolution, resolution, generator=g),
                        torch.randint(0, num_classes, (batch,), generator=g), num_classes,
                        [str(i) for i in range(num_classes)])


def run_overrides(name: str, size: str, patch: int | None, batch: int, precision: str, switch: str,
                  args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The trainer config of one row (conf/train.yaml + these overrides)."""
    out = [f"backbone={name}", f"backbone.size={size}", f"run_dir={run_dir}", "progress=false",
           "dataset=digits",  # replaced by the synthetic dataset (build_run's dataset=)
           f"train.batch_size={batch}", "train.steps=1000000", "sample.per_class=0", f"device={args.device}",
           f"train.precision={'bf16' if switch == 'bf16' else precision}", *RECIPE]
    if patch is not None:
        out.append(f"backbone.patch_size={patch}")
    if args.threads:
        out.append(f"threads={args.threads}")
    if switch not in ("none", "bf16"):
        out.append(f"train.{switch}=true")
    if switch == "flash_attn" and precision == "fp32":
        out[out.index("train.precision=fp32")] = "train.precision=bf16"  # flash-attn has no fp32 kernel
    return out


def state_memory_mb(run: Run) -> float:
    """Weights, EMA and optimizer state: what persists across steps (gradients are the step's, see peak)."""
    tensors = [*run.model.parameters(), *run.ema.parameters(),
               *(v for s in run.opt.state.values() for v in s.values() if torch.is_tensor(v))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20


def sample_rates(model: torch.nn.Module, batch: int, precision: str, device: torch.device, warmup: int,
                 repeats: int) -> tuple[float, float]:
    """(img/s without CFG, img/s with CFG) of one network evaluation of ``model`` in eval mode."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, model.num_classes)])  # the null label
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            plain = median_time(lambda: model(x, t, y), device, warmup, repeats)
            cfg = median_time(lambda: model.forward_with_cfg(x2, t2, y2, 4.0), device, warmup, repeats)
    finally:
        model.train(was_training)
    return batch / plain, batch / cfg


def measure_row(name: str, size: str, patch: int | None, batch: int, switch: str, args: argparse.Namespace,
                device: torch.device, rates: dict[str, float]) -> dict[str, Any]:
    """Build the run, time the trainer step and sampling, measure memory; raises on out-of-memory."""
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        cfg = compose("train", run_overrides(name, size, patch, batch, args.precision, switch, args,
                                             Path(tmp) / "run"))
        precision = str(getattr(cfg.train.precision, "value", cfg.train.precision))
        dataset = synthetic_dataset(batch, args.channels, args.resolution, args.num_classes)
        run = build_run(cfg, dataset=dataset)
        try:
            run.model.train()
            step_s = median_time(lambda: train_step(run), device, args.warmup, args.repeats)
            run.opt.zero_grad(set_to_none=True)  # gradients count in the step (train_step frees them anyway)
            state_mb = state_memory_mb(run)
            peak_mb, method = step_peak_memory_mb(lambda: train_step(run), device)
            sample, sample_cfg = sample_rates(run.ema, batch, precision, device, args.warmup, args.repeats)
            params = sum(p.numel() for p in run.model.parameters())
            counting = build_for_counting(name, **run.kwargs)
            gmacs = forward_gmacs(counting, args.resolution, args.channels)
        finally:
            run = None  # free it before the next row (the closures above hold the name)
            _release(device)
    if precision not in rates:
        rates[precision] = matmul_rate(device, precision, args.matmul_sizes)
    rate, img_s = rates[precision], batch / step_s
    return dict(batch=batch, precision=precision, params=params, gmacs=gmacs, train_ms=1e3 * step_s,
                train_img_per_s=img_s, train_util=3 * gmacs * img_s / rate, sample_img_per_s=sample,
                sample_cfg_img_per_s=sample_cfg, sample_util=gmacs * sample / rate,
                sample_cfg_util=2 * gmacs * sample_cfg / rate, peak_mem_mb=peak_mb, state_mem_mb=state_mb,
                mem_method=method, matmul_gmac_per_s=rate, status="ok")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError; see limit_cpu_memory)."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def limit_cpu_memory(fraction: float = 0.9) -> int | None:
    """Cap this process's address space at its current size plus ``fraction`` of the memory available now, so
    that a CPU step that does not fit fails with an allocation error (and the batch is halved) instead of the
    kernel's out-of-memory killer ending the benchmark, or another process. Returns the limit in bytes."""
    import resource

    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + int(fraction * available)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return limit
    except (OSError, StopIteration, ValueError):  # not Linux: no cap
        return None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_with_backoff(name: str, size: str, patch: int | None, switch: str, args: argparse.Namespace,
                         device: torch.device, rates: dict[str, float]) -> dict[str, Any]:
    """measure_row at --batch, halving the batch after each out-of-memory until it fits (or 1 does not)."""
    batch, notes = args.batch, []
    while True:
        try:
            row = measure_row(name, size, patch, batch, switch, args, device, rates)
            row["note"] = "; ".join(notes)
            return row
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            _release(device)
            first = (str(err).splitlines() or [type(err).__name__])[0][:100]
            if batch == 1:
                return dict(batch=batch, status=f"failed: out of memory at batch 1 ({first})", note="; ".join(notes))
            notes.append(f"out of memory at batch {batch}, halved")
            batch //= 2


def measure_switch(name: str, size: str, patch: int | None, switch: str, args: argparse.Namespace,
                   device: torch.device, rates: dict[str, float]) -> dict[str, Any]:
    try:
        return measure_with_backoff(name, size, patch, switch, args, device, rates)
    except SwitchUnavailable as err:  # TF32, flash-attn without CUDA
        return dict(status=f"not on this device: {err}")
    except Exception as err:  # one failing backbone or switch must not lose the others' rows
        return dict(status=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


# ----------------------------------------------------------------------------------------------------------------
# Trainer step vs bare step
# ----------------------------------------------------------------------------------------------------------------
class BareStep:
    """A bare training step of a copy of ``run.model`` (same weights): fixed x, t, noise, labels; the diffusion
    loss, backward and a default AdamW step. What a hand-written loop does, without EMA, data or logging."""

    def __init__(self, run: Run, lr: float = 1e-4):
        import copy

        self.model = copy.deepcopy(run.model).train()
        self.diffusion, self.device = run.diffusion, run.device
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0)
        g = torch.Generator().manual_seed(2)
        B, shape = run.cfg.train.batch_size, run.dataset.input_shape()
        self.x = torch.randn(B, *shape, generator=g).to(run.device)
        self.noise = torch.randn(B, *shape, generator=g).to(run.device)
        self.t = torch.randint(0, run.diffusion.num_timesteps, (B,), generator=g).to(run.device)
        self.y = torch.randint(0, run.model.num_classes, (B,), generator=g).to(run.device)
        self.bf16 = run.identity["train"]["precision"] == "bf16"

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model.training_losses(self.diffusion, self.x, self.t, self.y, self.noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def compare_bare(name: str, size: str, patch: int | None, args: argparse.Namespace, device: torch.device,
                 tag: tuple[str, str], rates: dict[str, float]) -> list[dict[str, Any]]:
    """Interleaved rounds of one trainer step and one bare step (the order alternates); one row per round."""
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        cfg = compose("train", run_overrides(name, size, patch, args.batch, args.precision, "none", args,
                                             Path(tmp) / "run"))
        run = build_run(cfg, dataset=synthetic_dataset(args.batch, args.channels, args.resolution,
                                                       args.num_classes))
        run.model.train()
        bare = BareStep(run)
        for _ in range(max(args.warmup, 1)):
            train_step(run)
            bare()
        gmacs = forward_gmacs(build_for_counting(name, **run.kwargs), args.resolution, args.channels)
        precision = run.identity["train"]["precision"]
        if precision not in rates:
            rates[precision] = matmul_rate(device, precision, args.matmul_sizes)
        rate, rows = rates[precision], []
        for r in range(args.rounds):
            order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
            seconds = {which: timed((lambda: train_step(run)) if which == "trainer" else bare, device)
                       for which in order}
            util = {k: 3 * gmacs * args.batch / s / rate for k, s in seconds.items()}
            rows.append(dict(device=tag[0], device_name=tag[1], backbone=name, size=size, patch=patch,
                             resolution=args.resolution, channels=args.channels, batch=args.batch,
                             precision=precision, round=r + 1, first=order[0], trainer_ms=1e3 * seconds["trainer"],
                             bare_ms=1e3 * seconds["bare"], ratio=seconds["trainer"] / seconds["bare"],
                             trainer_util=util["trainer"], bare_util=util["bare"], gmacs=gmacs,
                             matmul_gmac_per_s=rate, threads=torch.get_num_threads(),
                             torch_version=torch.__version__))
            print(f"{name} {size}: round {r + 1} ({order[0]} first): trainer {1e3 * seconds['trainer']:.0f} ms, "
                  f"bare {1e3 * seconds['bare']:.0f} ms, ratio {rows[-1]['ratio']:.3f}", flush=True)
        run = bare = None
        _release(device)
    ratios = [r["ratio"] for r in rows]
    print(f"{name} {size}: trainer / bare step time, median of {len(ratios)} rounds: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); utilisation trainer "
          f"{statistics.median(r['trainer_util'] for r in rows):.3f}, bare "
          f"{statistics.median(r['bare_util'] for r in rows):.3f}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# CSV and plot
# ----------------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r.get(c)) for c in columns})

    atomic_write(path, write, binary=False)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: dict) -> tuple:
    return tuple(str(_cell(row.get(k))) for k in KEY)


def upsert(existing: list[dict], row: dict) -> list[dict]:
    """``existing`` with ``row`` replacing the row of the same key (in place) or appended."""
    key = row_key(row)
    out = [row if row_key(r) == key else r for r in existing]
    return out if any(row_key(r) == key for r in existing) else [*out, row]


def plot(csv_path: Path) -> list[Path]:
    """Utilisation (training, sampling, sampling with CFG) and img/s of the plain rows per backbone, and the
    training speed-up of every switch row: ``<device>.png`` and ``.svg`` beside the CSV."""
    from bench.plots import _save, plt

    rows = [r for r in read_rows(csv_path) if r["status"] == "ok"]
    plain = [r for r in rows if r["switches"] == "none"]
    if not plain:
        return []
    switched = [r for r in rows if r["switches"] != "none" and r.get("train_speedup")]
    labels = [f"{r['backbone']} {r['size']}" + (f"/{r['patch']}" if r["patch"] else "") +
              (f"\n{r['precision']} b{r['batch']}" if len({(p['precision'], p['batch']) for p in plain}) > 1 else "")
              for r in plain]
    ncols = 3 if switched else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.8), squeeze=False)
    x = range(len(plain))
    ax = axes[0][0]
    for i, (col, text) in enumerate((("train_util", "training"), ("sample_util", "sampling"),
                                     ("sample_cfg_util", "sampling, CFG"))):
        ax.bar([k + (i - 1) * 0.27 for k in x], [float(r[col]) for r in plain], width=0.27, label=text)
    ax.set_ylabel("utilisation (achieved MAC rate / matmul rate)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax = axes[0][1]
    for i, (col, text) in enumerate((("train_img_per_s", "training"), ("sample_img_per_s", "sampling"),
                                     ("sample_cfg_img_per_s", "sampling, CFG"))):
        ax.bar([k + (i - 1) * 0.27 for k in x], [float(r[col]) for r in plain], width=0.27, label=text)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    for ax in axes[0][:2]:
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    if switched:
        ax = axes[0][2]
        names = [f"{r['backbone']} {r['switches']}" for r in switched]
        ax.barh(range(len(switched)), [float(r["train_speedup"]) for r in switched])
        ax.set_yticks(range(len(switched)), names, fontsize=8)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("training img/s relative to the plain row")
        ax.grid(True, axis="x", alpha=0.3)
    first = plain[0]
    fig.suptitle(f"throughput on {first['device']} ({first['device_name']}), {first['threads']} threads, "
                 f"{first['resolution']}x{first['resolution']}x{first['channels']}, torch {first['torch_version']}",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, csv_path.parent, csv_path.stem)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backbones", nargs="+", default=None, help="registered backbones (default: all)")
    p.add_argument("--sizes", nargs="+", default=["S"], help="size presets, each for every backbone (default S)")
    p.add_argument("--patch", type=int, default=2, help="patch size where the backbone has one (default 2)")
    p.add_argument("--resolution", type=int, default=32, help="input side (default 32: a 256px SD-VAE latent)")
    p.add_argument("--channels", type=int, default=4, help="input channels (default 4)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="global batch; halved on out-of-memory (default 32)")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--switches", nargs="+", default=[], metavar="SWITCH",
                   help=f"one extra row per switch: {', '.join(SWITCHES)}, or all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps, median reported (default 3)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 1536, 2048])
    p.add_argument("--compare-bare", action="store_true", help="trainer step vs bare step instead of the table")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds of --compare-bare (default 6)")
    p.add_argument("--out", type=Path, default=Path("results/throughput"), help="CSV and plot folder")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="CPU: cap the address space at its size + this fraction of the available memory (0: no cap)")
    args = p.parse_args(argv)
    if min(args.batch, args.repeats, args.rounds, args.resolution, args.channels, args.num_classes) < 1 \
            or args.warmup < 0 or min(args.matmul_sizes) < 1:
        p.error("--batch, --repeats, --rounds, --resolution, --channels, --num-classes and --matmul-sizes must be "
                ">= 1, --warmup >= 0")
    if "all" in args.switches:
        args.switches = list(SWITCHES)
    unknown = sorted(set(args.switches) - set(SWITCHES))
    if unknown:
        p.error(f"unknown switch(es) {unknown}; choose from {', '.join(SWITCHES)} or all")
    names = args.backbones or [n for n in backbones.available() if not n.startswith("test_")]
    unknown = sorted(set(names) - set(backbones.available()))
    if unknown:
        p.error(f"unknown backbone(s) {unknown}; registered: {', '.join(backbones.available())}")
    args.backbones = names
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tag = device_tag(device)
    if device.type == "cpu" and args.memory_fraction > 0:
        limit = limit_cpu_memory(args.memory_fraction)
        if limit:
            print(f"address space capped at {limit / 2**30:.1f} GiB (out-of-memory halves the batch)")
    rates: dict[str, float] = {}
    for precision in {args.precision, *(["bf16"] if "bf16" in args.switches else [])}:
        rates[precision] = matmul_rate(device, precision, args.matmul_sizes)
        print(f"device {tag[1]} ({tag[0]}), {torch.get_num_threads()} threads: {precision} matmul "
              f"{rates[precision]:.1f} GMAC/s (best of {args.matmul_sizes})", flush=True)
    points = []
    for name in args.backbones:
        for size in args.sizes:
            resolved = resolve_size(name, size)
            # a patch size where the backbone has one (DiCo's optional patch_size defaults to none: kept so)
            patch = args.patch if backbone_schema(name).get("patch_size", (None, None))[1] is not None else None
            points.append((name, size, resolved, patch))

    if args.compare_bare:
        rows = []
        for name, size, resolved, patch in points:
            if resolved is not None:
                rows += compare_bare(name, resolved, patch, args, device, tag, rates)
        path = args.out / f"{tag[0]}-trainer-vs-bare.csv"
        write_rows(path, rows, BARE_COLUMNS)
        print(f"wrote {path}")
        return rows

    csv_path = args.out / f"{tag[0]}.csv"
    table = read_rows(csv_path)
    rows: list[dict] = []
    plain_img_s: dict[tuple, float] = {}
    first = ["none", *(s for s in args.switches if s not in PROCESS_WIDE)]
    last = [s for s in args.switches if s in PROCESS_WIDE]
    for name, size, resolved, patch, switch in [(*p, s) for p in points for s in first] + [
            (*p, s) for s in last for p in points]:
        row = dict(device=tag[0], device_name=tag[1], backbone=name, size=resolved or size,
                   patch=patch if patch is not None else "", resolution=args.resolution, channels=args.channels,
                   batch_asked=args.batch, batch=args.batch, precision=args.precision, switches=switch,
                   warmup=args.warmup, repeats=args.repeats, threads=torch.get_num_threads(),
                   torch_version=torch.__version__)
        if switch == "bf16":
            row["precision"] = "bf16"
        if resolved is None:
            row["status"] = f"skipped: {name} has no preset {size}"
        else:
            row.update(measure_switch(name, resolved, patch, switch, args, device, rates))
            if switch == "flash_attn" and row["status"] == "ok":
                row["note"] = "; ".join(filter(None, [row.get("note"), "bf16 autocast (flash-attn needs it)"]))
        if row["status"] == "ok":
            if switch == "none":
                plain_img_s[name, size] = row["train_img_per_s"]
            elif plain_img_s.get((name, size)):
                row["train_speedup"] = row["train_img_per_s"] / plain_img_s[name, size]
                if row["train_speedup"] < 1:
                    row["note"] = "; ".join(filter(None, [row.get("note"), "slower than without it here"]))
        rows.append(row)
        table = upsert(table, row)
        write_rows(csv_path, table, COLUMNS)
        print(describe(row), flush=True)
    print(f"wrote {csv_path}")
    try:
        print("".join(f"wrote {p}\n" for p in plot(csv_path)), end="")
    except Exception as err:  # the CSV is the result; a failed plot must not hide it
        print(f"no plot: {type(err).__name__}: {err}")
    return rows


def describe(row: dict) -> str:
    head = f"{row['backbone']:>5s} {row['size']}" + (f"/{row['patch']}" if row["patch"] != "" else "") + \
        f" {row['switches']:<15s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    speedup = f" ({row['train_speedup']:.2f}x)" if row.get("train_speedup") else ""
    return (f"{head} batch {row['batch']:>3d}: train {row['train_img_per_s']:8.2f} img/s{speedup} util "
            f"{row['train_util']:.3f} | sample {row['sample_img_per_s']:8.2f} / cfg {row['sample_cfg_img_per_s']:8.2f}"
            f" img/s util {row['sample_util']:.3f} / {row['sample_cfg_util']:.3f} | peak {row['peak_mem_mb']:.0f} MB"
            + (f" | {row['note']}" if row.get("note") else ""))


if __name__ == "__main__":
    main()
