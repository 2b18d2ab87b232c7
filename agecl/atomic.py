"""Atomic file writes: a killed job leaves the old file or the new one, never half of one.

A write that fails because the disk is full (ENOSPC), the quota is spent (EDQUOT) or the file is
over the process's size limit (EFBIG, RLIMIT_FSIZE) raises `DiskFullError` naming the file and
the remedy; the temporary is removed, so nothing half-written is left. Commands print its message
and exit with `EXIT_DISK_FULL` (no traceback unless --debug); the same command run again once
there is room continues or redoes the work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterator

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# sysexits.h EX_TEMPFAIL: a temporary failure; the same command may succeed later.
EXIT_DISK_FULL = 75


class DiskFullError(OSError):
    """A write failed for lack of room; `filename` is the file, str() says what to do."""

    def __init__(self, code: int, path: Path | str, hint: str = "run the same command again", folder=None):
        super().__init__(code, os.strerror(code), str(path))
        self.hint = hint
        self.folder = Path(folder) if folder is not None else Path(path).parent

    def __reduce__(self):  # across worker processes, with its own arguments (not OSError's)
        return DiskFullError, (self.errno, self.filename, self.hint, self.folder)

    def __str__(self) -> str:
        limit = " (or raise the file-size limit, ulimit -f)" if self.errno == errno.EFBIG else ""
        return f"{self.filename}: cannot write: {self.strerror}. Free space in {self.folder}{limit} and {self.hint}"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_message(e: BaseException, folder: Path | str, hint: str = "run the same command again") -> str | None:
    """The one-line message for a command that stopped on `e`, if `e` is a write that ran out of
    room (None otherwise): the file (or else `folder`) and the remedy."""
    if isinstance(e, DiskFullError):
        return str(e)
    code = room_ran_out(e)
    if code is None:
        return None
    filename = getattr(e, "filename", None) or next(
        (x.filename for x in (e.__cause__, e.__context__) if getattr(x, "filename", None)), None)
    return str(DiskFullError(code, filename or folder, hint, folder=None if filename else folder))


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    The temporary name starts with '.' and ends with '.tmp' so that readers globbing for real
    files never see it; on an exception it is removed. A write that fails for lack of room comes
    out as DiskFullError naming `path` (`room_ran_out` decides).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save and numpy wrap or drop the errno
        code = room_ran_out(e, tmp)
        if code is not None:
            raise DiskFullError(code, path) from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def room_ran_out(e: BaseException, written: Path | None = None) -> int | None:
    """The errno (ENOSPC, EDQUOT, EFBIG) if `e` is a write that failed for lack of room, else None.

    Read from `e` or the exceptions behind it (torch.save raises a RuntimeError whose context is
    the OSError); failing that, from the state of the disk: numpy's tofile reports a short write
    without an errno, so a file `written` that reached the size limit, or a folder with no room
    left, decides it.
    """
    seen = 0
    while e is not None and seen < 8:
        if is_disk_full(e):
            return e.errno
        e, seen = e.__cause__ or e.__context__, seen + 1
    if written is None:
        return None
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    with contextlib.suppress(OSError):
        if limit != resource.RLIM_INFINITY and written.stat().st_size >= limit - _WRITE_SLACK:
            return errno.EFBIG
    with contextlib.suppress(OSError):
        st = os.statvfs(written.parent)
        if st.f_bavail * st.f_frsize < _WRITE_SLACK:
            return errno.ENOSPC
    return None


_WRITE_SLACK = 1 << 16  # bytes: a failed write leaves the file at most one buffer short of the limit


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path | str, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
