"""Free space of the data dir: telling a full disk from other failures, and a reserve file.

A full disk shows up in three shapes: ``OSError`` with ``ENOSPC``/``EDQUOT`` from a file
write, SQLite's ``SQLITE_FULL`` ("database or disk is full"), and, when the WAL index
(``-shm``) or WAL itself cannot grow, ``SQLITE_IOERR`` ("disk I/O error"). The last one is
ambiguous, so it counts as a full disk only while free space is actually below the floor.
:func:`raise_if_full` turns all of them into :class:`StorageFull` (HTTP 507
``storage-full``), never a 500.

Deleting needs space too: SQLite appends the changed pages to its WAL before it can free
anything. :class:`Reserve` keeps a preallocated file (``data_dir/.lipcert-reserve``) that is
given up when a write hits a full disk, so a DELETE (and start-up, which creates the WAL
files) still has room; it is rebuilt once free space allows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13
_SQLITE_IOERR = 10


class StorageFull(Exception):
    """No room left in the data dir (``detail`` says how much is free)."""

    code = "storage-full"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return int(st.f_bavail) * int(st.f_frsize)


def is_disk_full(exc: BaseException, path: str | os.PathLike[str], floor: int = 0) -> bool:
    """Whether ``exc`` means "no space": ENOSPC/EDQUOT, SQLITE_FULL, or an SQLite I/O error
    while fewer than ``floor`` (at least one page, 64 KiB) bytes are free at ``path``."""
    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error):
        code = int(getattr(exc, "sqlite_errorcode", -1)) & 0xFF
        if code == _SQLITE_FULL or "disk is full" in str(exc):
            return True
        if code == _SQLITE_IOERR or "disk I/O error" in str(exc):
            with contextlib.suppress(OSError):
                return free_bytes(path) < max(floor, 64 * 1024)
    return False


def full_detail(path: str | os.PathLike[str]) -> str:
    try:
        free = f"{free_bytes(path) / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"the data dir is full ({free}): delete models or add space"


class Reserve:
    """A preallocated file of ``size`` bytes, released to let deletes through on a full disk."""

    NAME = ".lipcert-reserve"

    def __init__(self, data_dir: Path, size: int) -> None:
        self.path = data_dir / self.NAME
        self.size = max(0, int(size))

    def present(self) -> bool:
        return self.size == 0 or self.path.exists()

    def release(self) -> bool:
        """Delete the reserve file; True when there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def restore(self, keep_free: int) -> bool:
        """(Re)create the reserve when ``size + keep_free`` bytes are free; True when present."""
        if self.present():
            return True
        with contextlib.suppress(OSError):
            if free_bytes(self.path.parent) < self.size + keep_free:
                return False
        tmp = self.path.with_name(self.NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True


__all__ = ["Reserve", "StorageFull", "free_bytes", "full_detail", "is_disk_full"]
