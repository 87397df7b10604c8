"""Checkpoint and file I/O shared by every package: safe loading and atomic writing.

Loading always uses ``torch.load(..., weights_only=True)``: a downloaded file cannot execute code. Writing always
goes to a temporary file in the target folder followed by a rename, so a crash never leaves a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A .pt path, or a run directory of ``diffusion.train`` (its ``checkpoints/last.pt``)."""
    path = Path(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def load_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` of a checkpoint file or run directory, on the CPU, weights only."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} not found; pass a run directory or .pt file written by "
                                f"diffusion.train, or an official weights file (downloaded by hand)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torn, foreign or pickled-code file
        raise RuntimeError(f"cannot load {what} {file}: {e}") from e


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], prefer_ema: bool = True,
                    what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state_dict, name, config) from a bare state_dict file (official DiT weights), one of our checkpoints
    ``{"model", "ema", "config", ...}`` (EMA preferred), a run directory, or an in-memory state_dict.
    DDP/compile prefixes are stripped; ``config`` is our checkpoint's config ({} otherwise)."""
    if isinstance(source, Mapping):
        state, name = dict(source), "<state_dict>"
    else:
        state, name = load_file(source, what), os.fspath(checkpoint_file(source))
    config: dict = {}
    if isinstance(state.get("model"), Mapping):
        config = dict(state.get("config") or {})
        state = state["ema"] if prefer_ema and isinstance(state.get("ema"), Mapping) else state["model"]
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out, name, config


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)
