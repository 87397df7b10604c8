"""Token-mixer scaling: forward+backward time and peak memory of ONE token mixer against the number of tokens.

    python -m bench.tokens                                   # T = 256 ... 16384, every mixer, width 384
    python -m bench.tokens --tokens 256 1024 --mixers bi_wkv softmax_attention --threads 1

Options: --tokens, --width, --batch, --repeats, --warmup, --mixers, --budget (seconds per mixer), --threads,
--device, --out (CSV folder, default results/tokens), --plots-out (default results/plots).

Every mixer registered with ``backbones.register_token_mixer`` (softmax attention of DiT through SDPA, Bi-WKV of
Diffusion-RWKV, LiT's linear attention, DiCo's conv mixer, ...) is built for a grid_h x grid_w token grid
(grid_h = the largest divisor of T not above sqrt(T): sqrt(T) x sqrt(T) for square T) at the given width, and
timed on x of shape (batch, T, width) requiring grad: one step = module(x) then backward of a fixed random
cotangent. Time = median wall time of ``--repeats`` steps after ``--warmup`` steps (CUDA synchronised).

Peak memory = the largest extra memory of one step above what exists before it (parameters, x, cotangent):
CUDA ``max_memory_allocated`` minus ``memory_allocated``; on CPU the same quantity, live tensor bytes from the
PyTorch profiler's allocation events (``profile_memory=True``: the running sum of allocations and frees; not RSS,
which would add allocator slack and library pages, and not tracemalloc, which does not see tensor storage). It is
measured on one extra, separate step.

A per-mixer time budget (``--budget`` seconds) bounds the run: before each point the step time is extrapolated
from the previous points (measured log-log slope, T^2 when unknown); repeats are reduced to fit, and a point that
cannot fit even once is written as ``skipped`` with the reason, never silently dropped. Results go to
``<out>/<device>.csv`` (rewritten atomically after every point) and ``<out>/<device>.png`` / ``.svg``.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from backbones import token_mixers
from runio.files import atomic_write

COLUMNS = ["device", "device_name", "mixer", "tokens", "grid_h", "grid_w", "width", "batch", "warmup", "repeats",
           "time_ms_median", "time_ms_min", "time_ms_max", "peak_mem_mb", "mem_method", "status", "threads",
           "torch_version"]
REFERENCE_MIXER, LINEAR_MIXER = "softmax_attention", "bi_wkv"


def grid_for(tokens: int) -> tuple[int, int]:
    """Most square factorisation grid_h x grid_w = tokens with grid_h <= grid_w."""
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def device_tag(device: torch.device) -> tuple[str, str]:
    """(file tag, human-readable name) of the device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return device.type, name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Point:
    """One (mixer, T) measurement: module, input and cotangent on the device."""

    def __init__(self, factory, tokens: int, width: int, batch: int, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.grid = grid_for(tokens)
        self.device = device
        self.module = factory(width, *self.grid).to(device).train()
        self.x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
        self.gy = torch.randn(batch, tokens, width, device=device)

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        self.module(self.x).backward(self.gy)
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def peak_memory_mb(self) -> tuple[float, str]:
        return step_peak_memory_mb(self.step, self.device)


def step_peak_memory_mb(step: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(MB, method): the largest extra memory of one call of ``step`` above what exists before it (see the module
    docstring); bench.throughput measures its training step with it too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda_max_memory_allocated"
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        # Every allocation and free of the CPU allocator during the step, in time order: the running sum is the
        # live tensor bytes above the step's start (what the profiler's memory timeline reports, without the
        # dataflow analysis that took minutes and raised MemoryError on the many small ops of a selective scan).
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20, "torch_profiler_live_tensor_bytes"
    except Exception as err:  # semi-private profiler API: record why instead of failing the whole benchmark
        return float("nan"), f"unavailable ({type(err).__name__})"


def predict_step_s(history: list[tuple[int, float]], tokens: int) -> float | None:
    """Extrapolate the step time to ``tokens`` from measured (tokens, seconds) points (log-log slope in [1, 2])."""
    if not history:
        return None
    t1, s1 = history[-1]
    slope = 2.0
    if len(history) >= 2:
        t0, s0 = history[-2]
        slope = min(2.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0)))
    return s1 * (tokens / t1) ** slope


def run_mixer(name: str, factory, args, device: torch.device, tag: tuple[str, str], emit) -> None:
    history: list[tuple[int, float]] = []
    started = time.perf_counter()
    for tokens in sorted(args.tokens):
        row = dict(device=tag[0], device_name=tag[1], mixer=name, tokens=tokens, width=args.width, batch=args.batch,
                   warmup=args.warmup, repeats=0, threads=torch.get_num_threads(), torch_version=torch.__version__)
        row["grid_h"], row["grid_w"] = grid_for(tokens)
        left = args.budget - (time.perf_counter() - started)
        predicted = predict_step_s(history, tokens)
        repeats = args.repeats
        if predicted is not None:  # warm-up + repeats + memory step must fit in what is left of the budget
            repeats = min(args.repeats, int(left / predicted) - args.warmup - 1)
            if repeats < 1:
                emit({**row, "status": f"skipped: predicted {predicted:.1f} s per step, {max(left, 0):.1f} s of the "
                                       f"{args.budget:g} s budget left"})
                continue
        try:
            point = Point(factory, tokens, args.width, args.batch, device)
            for _ in range(args.warmup):
                point.timed_step()
            times = [point.timed_step() for _ in range(repeats)]
            mem, method = point.peak_memory_mb()
        except (torch.OutOfMemoryError, MemoryError) as err:
            emit({**row, "status": f"failed: out of memory ({str(err).splitlines()[0][:120]})"})
            break
        finally:
            point = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        median = statistics.median(times)
        history.append((tokens, median))
        emit({**row, "repeats": repeats, "time_ms_median": 1e3 * median, "time_ms_min": 1e3 * min(times),
              "time_ms_max": 1e3 * max(times), "peak_mem_mb": mem, "mem_method": method, "status": "ok"})


def write_csv_atomic(rows: list[dict], path: Path) -> None:
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.4f}" if isinstance(r.get(c), float) else r.get(c, "")) for c in COLUMNS})

    atomic_write(path, write, binary=False)


def summarize(rows: list[dict]) -> list[str]:
    """time(16384)/time(1024) per mixer, and softmax-attention time over Bi-WKV time per T."""
    times = {(r["mixer"], r["tokens"]): r["time_ms_median"] for r in rows if r["status"] == "ok"}
    lines = []
    for mixer in sorted({r["mixer"] for r in rows}):
        if (mixer, 1024) in times and (mixer, 16384) in times:
            ratio = times[mixer, 16384] / times[mixer, 1024]
            lines.append(f"{mixer:>20s}: time(16384)/time(1024) = {ratio:7.2f}  (16x the tokens: linear 16, "
                         f"quadratic 256)")
    for tokens in sorted({r["tokens"] for r in rows}):
        if (REFERENCE_MIXER, tokens) in times and (LINEAR_MIXER, tokens) in times:
            speedup = times[REFERENCE_MIXER, tokens] / times[LINEAR_MIXER, tokens]
            factor, verdict = (speedup, "faster") if speedup >= 1 else (1 / speedup, "slower")
            lines.append(f"T={tokens:>6d}: {LINEAR_MIXER} is {factor:6.2f}x {verdict} than {REFERENCE_MIXER} "
                         f"({times[LINEAR_MIXER, tokens]:.1f} ms vs {times[REFERENCE_MIXER, tokens]:.1f} ms)")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--mixers", nargs="+", default=None, help="subset of registered mixers (default: all)")
    p.add_argument("--budget", type=float, default=1200.0, help="seconds per mixer over all token counts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("results/tokens"), help="CSV folder")
    p.add_argument("--plots-out", type=Path, default=Path("results/plots"), help="plot folder (bench.plots)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.width < 1 or min(args.tokens) < 1:
        p.error("--repeats, --batch, --width and every --tokens value must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    available = token_mixers()
    names = args.mixers or sorted(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        p.error(f"unknown mixer(s) {unknown}; registered: {', '.join(sorted(available))}")

    tag = device_tag(device)
    csv_path = args.out / f"{tag[0]}.csv"
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        write_csv_atomic(rows, csv_path)
        if row["status"] == "ok":
            print(f"{row['mixer']:>20s} T={row['tokens']:>6d} ({row['grid_h']}x{row['grid_w']}): "
                  f"{row['time_ms_median']:10.1f} ms  peak {row['peak_mem_mb']:9.1f} MB", flush=True)
        else:
            print(f"{row['mixer']:>20s} T={row['tokens']:>6d}: {row['status']}", flush=True)

    print(f"device {tag[1]} ({tag[0]}), threads {torch.get_num_threads()}, width {args.width}, batch {args.batch}")
    for name in names:
        run_mixer(name, available[name], args, device, tag, emit)
    from bench.plots import plot_tokens

    figs, _ = plot_tokens(csv_path, args.plots_out)
    print("\n".join(summarize(rows)))
    print(f"wrote {csv_path}, {', '.join(map(str, figs))}")
    return rows


if __name__ == "__main__":
    main()
