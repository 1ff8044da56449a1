"""Files that appear whole or not at all: written to a temporary file beside the target, fsynced, renamed.

``AtomicFile`` is a context manager: bytes go to ``.NAME.XXXX.part`` in the target's directory (the
same filesystem, so ``os.replace`` is an atomic rename), hashed (sha256) as they are written. ``commit``
flushes, fsyncs the file, renames it onto the target and fsyncs the directory (the rename survives a
power cut). Leaving the ``with`` block without a commit, on an exception, removes the temporary file. A
``kill -9`` can leave a ``.part`` file behind, never a partial file under the target's name; the next
commit to the same target removes such leftovers once they are older than ``STALE_PART_SECONDS``.

The file gets the mode a plain ``open()`` would give it (0666 less the umask), not ``mkstemp``'s 0600:
who may read an export is decided by the directory and the umask, as for any other file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

#: The suffix of the temporary files (a ``kill -9`` may leave one; it is never the target's name).
PART_SUFFIX = ".part"
#: A temporary file of the same target this old was left by a killed writer (no export runs this long).
STALE_PART_SECONDS = 6 * 3600


class AtomicFile:
    """A binary file written beside ``path`` and renamed onto it by ``commit`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=PART_SUFFIX)
        self.temporary = Path(temporary)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~process_umask())
        self._file = os.fdopen(fd, "wb")
        self._sha256 = hashlib.sha256()
        self.size = 0
        self.committed = False

    def write(self, data: bytes) -> None:
        """Append ``data`` (and hash it)."""
        self._file.write(data)
        self._sha256.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        """The hex sha256 of everything written so far."""
        return self._sha256.hexdigest()

    def commit(self) -> str:
        """Flush, fsync, rename onto the target and fsync the directory; returns the sha256."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temporary, self.path)
        self.committed = True
        fsync_directory(self.path.parent)
        remove_stale_parts(self.path)
        return self.sha256

    def discard(self) -> None:
        """Close and remove the temporary file (nothing appears under the target's name)."""
        if not self._file.closed:
            self._file.close()
        if not self.committed:
            self.temporary.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.discard()


def remove_stale_parts(path: Path, older_than: float = STALE_PART_SECONDS) -> int:
    """Remove ``path``'s temporary files left by killed writers (older than ``older_than`` seconds)."""
    import time

    removed = 0
    for part in path.parent.glob(f".{glob_escape(path.name)}.*{PART_SUFFIX}"):
        try:
            if time.time() - part.stat().st_mtime > older_than:
                part.unlink()
                removed += 1
        except OSError:
            pass  # another process took care of it
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    import glob

    return glob.escape(name)


def write_atomically(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename; returns its sha256."""
    with AtomicFile(path) as target:
        target.write(data)
        return target.commit()


def process_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere 0o022 is assumed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
