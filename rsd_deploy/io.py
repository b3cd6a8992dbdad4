"""Atomic file writing and safe loading: no half-written artifact, no unpickling."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RSDError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths``, renamed to them in order only when the block succeeds.

    Every file is complete before the first rename, so a failure while writing them
    changes nothing; each rename is atomic, so put the file that commits the others last.
    """
    paths = [Path(p) for p in paths]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(_temporary(p)) for p in paths]
        yield tmps
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; artifacts get the usual mode
        for tmp, path in zip(tmps, paths, strict=True):
            os.chmod(tmp, mode)
            os.replace(tmp, path)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A new empty file ``.NAME.XXXXXXXX.tmp`` beside ``path``, removed on exit unless renamed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RSDError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


class DirLock:
    """An exclusive lock on an existing folder for one writer (``what``); a second one is refused.

    The lock is ``flock`` on the folder itself: no lock file to leave behind, and the
    kernel releases it when its process dies, so a killed writer never blocks the next.
    Only the holder may treat leftovers of earlier writers (:func:`remove_stale_temps`)
    as dead: a live writer's temporary files look the same.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what, self.fd = Path(path), what, -1

    def __enter__(self) -> "DirLock":
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise RSDError(f"cannot open {self.path}: {e.strerror or e}") from None
        if fcntl is not None:  # not on Windows: no lock there
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise RSDError(f"another {self.what} is writing to {self.path}; wait for it to end") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove the temporary files that killed writers of ``names`` left in ``folder``.

    :func:`atomic_path` writes ``.NAME.XXXXXXXX.tmp`` beside ``NAME``; a process killed
    before its rename leaves it behind. Call this only while holding the folder's
    :class:`DirLock`. Returns the names removed.
    """
    folder = Path(folder)
    stems = tuple(f"{name.lstrip('.')}." for name in names)
    removed = []
    for p in folder.glob(".*.tmp") if folder.is_dir() else []:
        if p.name.lstrip(".").startswith(stems) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every file here is written in; a list or object of plain
    values (a per-epoch record, a shape) stays on one line, so long histories stay compact."""
    return _json(obj, 0) + "\n"


def _json(obj: Any, level: int) -> str:
    values = obj.values() if isinstance(obj, dict) else obj
    if not isinstance(obj, (dict, list)) or not any(isinstance(v, (dict, list)) for v in values):
        return json.dumps(obj)
    pad = "  " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(str(k))}: {_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    return "[\n" + ",\n".join(pad + _json(v, level + 1) for v in obj) + "\n" + "  " * level + "]"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RSDError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RSDError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex: what records of provenance compare."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    with atomic_path(path) as tmp:
        write_tensors(tmp, tensors, metadata)


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as safetensors to ``path`` itself (inside :func:`atomic_paths`)."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is an :class:`RSDError`."""
    path = Path(path)
    if not path.is_file():
        raise RSDError(f"weights file {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RSDError(f"{path} is not a readable safetensors file ({e})") from None
