"""
One process at a time per directory: an exclusive, non-blocking fcntl.flock on `<dir>/.lock`.
Two runs writing the same directory (two encodes of one encode_dir, two trainings of one out_dir)
would each leave the other's files half-written; with the lock the second one stops at once
with an error naming the holder.

    from support.dirlock import lock_dir
    with lock_dir(out_dir):              # DirInUseError if another live process holds it
        ...                              # write into out_dir
    lock = lock_dir(out_dir)             # or hold it until lock.release() / the process exits
    hold_dir(out_dir)                    # or for the rest of the process (train.py's out_dir)

The lock file is created if missing and never deleted (deleting it would let a third process
lock a fresh file while the second still holds the old one). The kernel drops the lock when the
holder exits, killed or not, so a stale lock never needs cleaning up. The holder writes its pid
and start time into the file; they only make the error message useful.
Tests: python -m pytest -q tests/test_data.py tests/test_common.py
"""

import fcntl
import os
import time
from contextlib import suppress

LOCK_NAME = ".lock"


class DirInUseError(RuntimeError):
    """Another live process holds the directory's lock."""


class DirLock:
    """The held lock of one directory; release() (or leaving the `with` block) gives it up."""

    def __init__(self, dir):
        self.dir, self.path = dir, os.path.join(dir, LOCK_NAME)
        os.makedirs(dir, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EWOULDBLOCK: someone holds it (EACCES on some systems)
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(self.fd)
            raise DirInUseError(f"{dir} is in use by another process ({holder}): wait for it or "
                                "use another directory") from None
        try:  # the holder's note only helps the error message: a full disk must not stop the run
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      .encode(), 0)
        except OSError:
            pass

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_dir(dir):
    """Lock dir (created if missing) for this process -> DirLock, also a context manager.
    Raises DirInUseError naming the holder's pid and start time if another process (or another
    DirLock of this process) holds it."""
    return DirLock(dir)


_HELD = {}  # (st_dev, st_ino) of a lock file -> the DirLock hold_dir keeps for the rest of the process


def hold_dir(dir):
    """lock_dir(dir) for the rest of this process -> the DirLock. Called again by the process that
    holds it (a script run twice in one process, as the tests do with runpy), it returns the held
    lock instead of refusing. The lock file is known by its inode (the directory may have been
    renamed; while the lock is open no other file can get that inode)."""
    with suppress(FileNotFoundError):
        st = os.stat(os.path.join(dir, LOCK_NAME))
        held = _HELD.get((st.st_dev, st.st_ino))
        if held is not None and held.fd is not None:
            return held
    lock = lock_dir(dir)
    st = os.fstat(lock.fd)
    _HELD[st.st_dev, st.st_ino] = lock
    return lock
