"""Faults made real for one test: a small file system, filled to its last page, remounted
read-only, and a kernel setting changed. Each is undone when the test ends, whatever
happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)]
    subprocess.run(mount, check=True, capture_output=True)
    try:
        yield path
    finally:
        unmount(path)


def unmount(path: Path) -> None:
    """Unmount ``path``; if something still holds it, detach it lazily rather than leak it."""
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def remount(path: Path, mode: str) -> None:
    """``mount -o remount,ro`` (or ``rw``) of the file system mounted at ``path``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


PAGE = 4096


def fill(fs: Path, leave_pages: int = 0) -> Path:
    """Fill the file system at ``fs`` to the last page, then free ``leave_pages`` pages.

    The filler is written a page at a time with ``os.write``, so when the disk
    is full its size is a whole number of pages, and truncating it frees exactly
    what is asked for.
    """
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        page = b"\0" * PAGE
        while True:
            try:
                written = os.write(fd, page)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            if written < PAGE:
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave_pages * PAGE))
    finally:
        os.close(fd)
    return filler


def free_pages(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize // PAGE


@contextlib.contextmanager
def sysctl(name: str, value: str) -> Iterator[str]:
    """Set ``/proc/sys/NAME`` for the block, then put the old value back; yields the old one."""
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield old
    finally:
        path.write_text(old)
