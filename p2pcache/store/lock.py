"""One node per data root: an exclusive lock, held for as long as the node runs.

Why: two node processes given the same `--data` (a copied systemd unit, a DaemonSet and a hand-started node on
one hostPath) destroy each other's work. Found in review: the second one's start-up took the first one's fresh
partial download (no state saved yet) for a crash's leftover and deleted it, then downloaded the same blob into
a new file at the same path; the first one, its hash right, renamed that half-written file into the store, which
then served a wrong blob as complete to every client, also after restarts. The lock is `flock` on the data
directory itself (a file in it can be deleted by a clean-up under a running node, and a second node then locked
a new file of the same name: found in review); the kernel drops it when the process dies, so a crashed node never
leaves a stale lock behind. `ROOT/lock` holds the owner's pid for the message the second node prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DataRootInUse", "lock_data_root"]

LOCK_NAME = "lock"


class DataRootInUse(Exception):
    """Another process holds the data root's lock."""


def lock_data_root(root: Path) -> int:
    """Take the data root's lock and write our pid in `ROOT/lock`; the lock lasts as long as the returned
    descriptor is open. DataRootInUse if another process holds it; OSError if the directory cannot be opened."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            owner = (root / LOCK_NAME).read_text("ascii", "replace").strip()[:32]
        except OSError:
            owner = ""
        raise DataRootInUse(f"another p2pcache node is using {root}" + (f" (pid {owner})" if owner else "")) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        (root / LOCK_NAME).write_text(f"{os.getpid()}\n", "ascii")
    except OSError:
        pass  # only the message's pid: the lock is the directory's
    return fd
