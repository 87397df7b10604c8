"""Checkpoint and file I/O shared by every package: safe loading and atomic writing.

Loading always uses ``torch.load(..., weights_only=True)``: a downloaded file cannot execute code. Writing always
goes to a temporary file in the target folder followed by a rename, so a crash never leaves a torn file. The
temporary file's name carries the writer's process id; the next write of the same target removes the
temporaries of writers that are no longer alive (a killed process cannot clean up after itself).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class DiskFullError(OSError):
    """No space left on the device while writing a file; nothing was replaced."""


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
    if file.stat().st_size == 0:
        raise RuntimeError(f"cannot load {what} {file}: the file is empty (0 bytes), so its write was interrupted "
                           f"or the disk was full; delete it and rerun (or restore it from a copy)")
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
    if not isinstance(state, Mapping):
        raise RuntimeError(f"{what} {name} holds a {type(state).__name__}, not a state_dict")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.<pid>.*.tmp`` files beside ``path`` left by writers that are no longer running."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if not parts or not parts[0].isdigit() or _pid_alive(int(parts[0])):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write of its C++ zip writer only as "enforce fail at inline_container.cc"
    return (isinstance(err, RuntimeError) and "inline_container" in str(err)
            and shutil.disk_usage(folder).free < 64 * 2**20)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    A failure leaves ``path`` as it was and removes the temporary; a full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e, path.parent):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path} ({free:.0f} MB free on its "
                                f"filesystem); {path.name} was left unchanged. Free some space (old runs under "
                                f"runs/, .cache/) and rerun: the run resumes from its last checkpoint") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)
