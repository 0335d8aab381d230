"""`RunLock`: one writer per run folder, a POSIX record lock that the kernel releases when its process ends."""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import re
import socket
import struct
import sys
from pathlib import Path


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (holds a run, locked, damaged files)."""


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# Lock files this process holds: POSIX locks belong to the process, so a second RunLock of a folder
# here is refused without opening the file (closing its descriptor would drop the first one's lock).
_HELD: dict[str, str] = {}


def _lock_pid(fd: int) -> int | None:
    """The kernel's pid of the holder of a conflicting lock on `fd` (Linux struct flock; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    layout = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    kind, _, _, _, pid = struct.unpack(layout, answer)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`RUN/run.lock`, an exclusive POSIX record lock (lockf), released by the kernel when the process
    ends (never stale); forked DataLoader workers do not hold it (flock locks were shared with them
    and outlived a killed run). The file names the holder for a refused writer. A POSIX lock drops
    when the process closes ANY descriptor of the file: only this class opens it, once (`_HELD`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "run.lock"
        self.fd: int | None = None
        self.key = ""

    def _in_use(self, holder: str) -> RunFolderError:
        return RunFolderError(f"{self.path.parent} is in use ({holder}); wait for it, or use another --save_path")

    def _holder(self, fd: int) -> str:
        """Who holds the lock: the name in the file, unless it is not the holder's (a holder that
        has locked but not yet written finds the text of the run before it)."""
        text = os.read(fd, 4096).decode(errors="replace").strip()
        pid = _lock_pid(fd)
        named = re.match(r"pid (\d+) on (\S+) ", text)
        if named and (int(named[1]) == pid if pid else named[2] != socket.gethostname() or _alive(int(named[1]))):
            return text
        if pid:
            return f"pid {pid}, which has not written its name yet"
        return "a process that has not written its name yet"

    def acquire(self) -> None:
        self.key = os.path.realpath(self.path)
        if self.key in _HELD:
            raise self._in_use(f"{_HELD[self.key]}, this process")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            # A holder that ended between our open and lock removed the file we locked: lock the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        name = f"pid {os.getpid()} on {socket.gethostname()} since {now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{name}\n".encode(), 0)
        self.fd, _HELD[self.key] = fd, name

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no writer can have it yet
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.key, None)
