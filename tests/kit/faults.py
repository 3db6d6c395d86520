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


@contextlib.contextmanager
def loop_ext4(path: Path, size_mb: int = 32, inodes: int = 4096) -> Iterator[Path]:
    """A small ext4 file system in a file beside ``path``, loop-mounted at ``path``.

    No reserved blocks (``-m 0``): root sees the same full disk as anyone.
    Unmounted, and its loop device freed, whatever happens.
    """
    image = path.with_name(path.name + ".ext4")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), str(image)]
    subprocess.run(mkfs, check=True, capture_output=True)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        unmount(path)
        image.unlink()


def fill_inodes(fs: Path) -> Path:
    """Use up every free inode of the file system at ``fs`` with empty files; their folder."""
    folder = fs / "inode-filler"
    folder.mkdir()
    n = 0
    while True:
        try:
            os.close(os.open(folder / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return folder
        n += 1


def free_inodes(fs: Path) -> int:
    return os.statvfs(fs).f_favail


def remount_when_possible(path: Path, mode: str, timeout: float = 20.0) -> None:
    """``remount(path, mode)``, tried again while a write in progress makes it busy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            remount(path, mode)
            return
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# An LD_PRELOAD shim that fails file system calls on chosen paths with EIO. It reads
# its control file (``$FAULT_CONTROL``: "PROBABILITY SUBSTRING") at most every 50 ms:
# a call whose path (for a descriptor, what /proc/self/fd says) contains SUBSTRING
# fails with that probability. No file, no faults. It unsets LD_PRELOAD when loaded,
# so the handlers a daemon starts (exec'd) run without it.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char *control;
static double prob;
static char match[512];
static long long checked_at = -1000;
static __thread unsigned long long seed;

__attribute__((constructor)) static void init(void) {
    control = getenv("FAULT_CONTROL");
    if (control) control = strdup(control);
    unsetenv("LD_PRELOAD");
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void refresh(void) {
    long long t = now_ms();
    if (t - checked_at < 50) return;
    checked_at = t;
    double p = 0;
    char buf[600] = {0};
    if (control) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, control, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = syscall(SYS_read, fd, buf, sizeof buf - 1);
            syscall(SYS_close, fd);
            if (n > 0) {
                char *space = strchr(buf, ' ');
                if (space) {
                    *space = 0;
                    p = atof(buf);
                    char *nl = strchr(space + 1, '\n');
                    if (nl) *nl = 0;
                    snprintf(match, sizeof match, "%s", space + 1);
                }
            }
        }
    }
    prob = p;
}

static int roll(void) {
    if (!seed)
        seed = (unsigned long long)now_ms() * 2654435761ULL
               ^ (unsigned long long)syscall(SYS_gettid);
    seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
    return (double)(seed % 1000000) / 1000000.0 < prob;
}

static int hit_path(const char *path) {
    refresh();
    if (prob <= 0 || !path || !match[0] || !strstr(path, match)) return 0;
    if (!roll()) return 0;
    errno = EIO;
    return 1;
}

static int hit_fd(int fd) {
    refresh();
    if (prob <= 0 || fd < 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = syscall(SYS_readlinkat, AT_FDCWD, link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return hit_path(path);
}

#define OPEN_BODY(name, ...) \
    mode_t mode = 0; \
    if (flags & (O_CREAT | O_TMPFILE)) { \
        va_list ap; va_start(ap, flags); mode = va_arg(ap, int); va_end(ap); \
    } \
    if (hit_path(path)) return -1;

int open(const char *path, int flags, ...) {
    REAL(open, int, const char *, int, ...);
    OPEN_BODY(open);
    return real_open(path, flags, mode);
}
int open64(const char *path, int flags, ...) {
    REAL(open64, int, const char *, int, ...);
    OPEN_BODY(open64);
    return real_open64(path, flags, mode);
}
int openat(int dir, const char *path, int flags, ...) {
    REAL(openat, int, int, const char *, int, ...);
    OPEN_BODY(openat);
    return real_openat(dir, path, flags, mode);
}
int openat64(int dir, const char *path, int flags, ...) {
    REAL(openat64, int, int, const char *, int, ...);
    OPEN_BODY(openat64);
    return real_openat64(dir, path, flags, mode);
}
ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write, ssize_t, int, const void *, size_t);
    if (hit_fd(fd)) return -1;
    return real_write(fd, buf, n);
}
int fsync(int fd) {
    REAL(fsync, int, int);
    if (hit_fd(fd)) return -1;
    return real_fsync(fd);
}
int fdatasync(int fd) {
    REAL(fdatasync, int, int);
    if (hit_fd(fd)) return -1;
    return real_fdatasync(fd);
}
int syncfs(int fd) {
    REAL(syncfs, int, int);
    if (hit_fd(fd)) return -1;
    return real_syncfs(fd);
}
int close(int fd) {
    REAL(close, int, int);
    int fail = hit_fd(fd);
    int r = real_close(fd);  /* as Linux does: the descriptor is gone either way */
    if (fail) { errno = EIO; return -1; }
    return r;
}
int rename(const char *a, const char *b) {
    REAL(rename, int, const char *, const char *);
    if (hit_path(a) || hit_path(b)) return -1;
    return real_rename(a, b);
}
int renameat(int da, const char *a, int db, const char *b) {
    REAL(renameat, int, int, const char *, int, const char *);
    if (hit_path(a) || hit_path(b)) return -1;
    return real_renameat(da, a, db, b);
}
int renameat2(int da, const char *a, int db, const char *b, unsigned flags) {
    REAL(renameat2, int, int, const char *, int, const char *, unsigned);
    if (hit_path(a) || hit_path(b)) return -1;
    return real_renameat2(da, a, db, b, flags);
}
int unlink(const char *path) {
    REAL(unlink, int, const char *);
    if (hit_path(path)) return -1;
    return real_unlink(path);
}
int unlinkat(int dir, const char *path, int flags) {
    REAL(unlinkat, int, int, const char *, int);
    if (hit_path(path)) return -1;
    return real_unlinkat(dir, path, flags);
}
int mkdir(const char *path, mode_t mode) {
    REAL(mkdir, int, const char *, mode_t);
    if (hit_path(path)) return -1;
    return real_mkdir(path, mode);
}
int utimensat(int dir, const char *path, const struct timespec t[2], int flags) {
    REAL(utimensat, int, int, const char *, const struct timespec *, int);
    if (path ? hit_path(path) : hit_fd(dir)) return -1;
    return real_utimensat(dir, path, t, flags);
}
int futimens(int fd, const struct timespec t[2]) {
    REAL(futimens, int, int, const struct timespec *);
    if (hit_fd(fd)) return -1;
    return real_futimens(fd, t);
}
"""

SHIM_CALLS = [
    "open",
    "openat",
    "write",
    "fsync",
    "fdatasync",
    "syncfs",
    "close",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "utimensat",
    "futimens",
]


def eio_shim(directory: Path) -> Path:
    """Compile :data:`SHIM_C` with gcc into ``directory``; the shared object's path."""
    source = directory / "eio-shim.c"
    source.write_text(SHIM_C)
    lib = directory / "eio-shim.so"
    cc = ["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-o", str(lib), str(source), "-ldl"]
    subprocess.run(cc, check=True, capture_output=True, text=True)
    return lib


def set_faults(control: Path, probability: float, where: str) -> None:
    """Tell the shim: fail calls on paths containing ``where`` with ``probability``."""
    tmp = control.with_name(control.name + ".new")
    tmp.write_text(f"{probability} {where}\n")
    os.replace(tmp, control)
    time.sleep(0.1)  # every process has read it (the shim looks every 50 ms)
