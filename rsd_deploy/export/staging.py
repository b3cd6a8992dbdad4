"""Staged, atomic publishing: artifacts wait in a hidden folder until every check passed.

A failed check or an interrupt leaves the output folder as it was: nothing half-written,
no mix of two exports (see :class:`Staging`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import RSDError
from ..io import DirLock


class Staging:
    """A hidden folder inside ``out`` where artifacts wait for their checks.

    Entering locks ``out`` (a second ``what`` into it is refused while this one runs)
    and removes staging folders that killed exports left there. :meth:`publish`
    moves every staged file to ``out`` (same file system, so each move is an atomic
    rename). Leaving removes the staging folder and, when nothing was published,
    ``out`` itself if this export created it and it is still empty: only what this
    export made is ever removed. ``owned``: the names this kind of export writes; one an
    earlier export left that this one does not produce is removed on publishing.
    """

    def __init__(self, out: Path, owned: Iterable[str], what: str = "fuse-export") -> None:
        self.out = out
        self.owned = tuple(owned)
        self.what = what
        self.prefix = f".{what}-"  #: staging folders' names start with it (".fuse-export-")
        self.published: list[str] = []
        self.removed: list[str] = []
        self.stale: list[str] = []  #: staging folders of killed exports, removed

    def __enter__(self) -> "Staging":
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RSDError(f"cannot write to {self.out}: {e.strerror or e}") from None
        self._lock = DirLock(self.out, self.what).__enter__()
        try:
            for old in self.out.glob(f"{self.prefix}*"):
                shutil.rmtree(old, ignore_errors=True)
                self.stale.append(old.name)
            self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.out))
        except OSError as e:
            self._release()
            raise RSDError(f"cannot write to {self.out}: {e.strerror or e}") from None
        return self

    def _release(self) -> None:
        if self.created and not self.published:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty: never another export's or a user's files
        self._lock.__exit__()

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()
        if isinstance(exc, RSDError) and not self.published:
            raise RSDError(f"{exc} (nothing was written)") from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def publish(self, last: str) -> None:
        """Move the staged files into ``out``, ``last`` last.

        ``last`` (the report) of an earlier export is removed first, so a folder that
        holds it always holds one complete export, even after a kill half-way through.
        """
        names = sorted(p.name for p in self.path.iterdir() if p.is_file())
        names = [n for n in names if n != last] + ([last] if last in names else [])
        (self.out / last).unlink(missing_ok=True)
        for name in self.owned:
            if name not in names and (self.out / name).exists():
                (self.out / name).unlink()
                self.removed.append(name)
        umask = os.umask(0)
        os.umask(umask)
        for name in names:
            # Temporary files are created private (0600); artifacts get the usual mode.
            os.chmod(self.path / name, 0o666 & ~umask)
            os.replace(self.path / name, self.out / name)
            self.published.append(name)


