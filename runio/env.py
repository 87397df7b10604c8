"""Where a run executes and what produced it: device choice, git provenance, peak memory of a block."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def _read_git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=_REPO, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:
        return "unknown"


# Read once, when the code is loaded: a sweep that runs for hours records the commit it started from, not
# whatever was committed (or edited) in the checkout while it ran.
_GIT_COMMIT_AT_IMPORT = _read_git_commit()


def git_commit() -> str:
    """Short commit of the code that runs, with ``-dirty`` when tracked files differed from it when this process
    loaded it ("unknown" outside a git checkout)."""
    return _GIT_COMMIT_AT_IMPORT


def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), so that resident-set growth counts every
    page the measured block touches, even in a process that trained before (a sweep)."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:  # not glibc: growth may then read low after earlier work
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """``train.heap_cache``: make glibc keep freed memory for reuse instead of handing it back to the OS. By default
    every block above the mmap threshold (128 KiB at start, raised up to 32 MiB as such blocks are freed: most
    activations of a training step lie above it) is its own mmap, unmapped when freed, so each step page-faults its
    activations in again; and the top of the heap is trimmed on every large free. Here: no mmap for allocations
    (they come from the heap) and no automatic trim. Process-wide and irreversible; the numbers are unchanged.
    False where the C library is not glibc (nothing changed)."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def heap_cache_available() -> bool:
    return _glibc() is not None


class PeakMemory:
    """Peak memory of a block: on CUDA the allocator's ``max_memory_allocated``; on the CPU (which has no
    allocator statistics) the peak growth of the process's resident set above its level at entry, sampled every
    20 ms from /proc/self/statm. Enter it after the dataset and model are in memory so that it measures the
    training step (activations, gradients, optimizer state), not the data."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_freed_memory()  # else memory freed by earlier work is reused unseen and the growth reads low
        self._base = self._rss_mb()
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb()) - self._base
