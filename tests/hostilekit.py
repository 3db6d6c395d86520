"""What the hostile-input and fault-injection tests share.

- :class:`Listener`: a TCP listener on a loopback port that records every
  connection. A check that fetched a DTD or an entity over the network would
  show up here; the tests assert it saw none.
- :func:`measured`: run a command and learn its exit status, output, wall time
  and peak memory (``ru_maxrss`` of that one child, from ``wait4``).
- :func:`vm_hwm`: a running process's peak resident memory, from ``/proc``.
- :func:`tmpfs`, :func:`fill`, :func:`sysctl`: a small file system mounted for
  one test, filled to the last page, and a kernel setting changed for one
  test; each is undone when the test ends, whatever happened.
- :data:`HOSTILE`: the table of hostile documents every path is attacked with
  (``jobspool check``, ``jobspool submit``, the drop folder).
- :func:`surroundings`: the spool's parent and the file system around it, to
  show that nothing escaped the spool.

Everything else comes from ``tests.conftest`` and ``tests.daemonkit``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import snapshot
from tests.daemonkit import order

# --- a listener that records connections ------------------------------------------------


class Listener:
    """A TCP server on 127.0.0.1 that accepts, records and closes every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[tuple[str, bytes]] = []  # (peer, first bytes it sent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="listener", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(0.5)
                try:
                    first = conn.recv(512)
                except OSError:
                    first = b""
                self.connections.append((f"{peer[0]}:{peer[1]}", first))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def listening() -> Iterator[Listener]:
    listener = Listener()
    try:
        yield listener
    finally:
        listener.close()


# --- running a command and measuring it -------------------------------------------------


@dataclass
class Measured:
    """A finished command: what ``subprocess.run`` gives, plus its time and peak memory."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_kb: int

    def as_completed(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, self.stderr)


def measured(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout=60.0
) -> Measured:
    """Run ``argv`` to its end; its own ``ru_maxrss`` comes from ``wait4``, not from the
    cumulative figure ``getrusage(RUSAGE_CHILDREN)`` gives."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, cwd=cwd)  # fmt: skip
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"{argv} still running after {timeout:g}s")
            time.sleep(0.005)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        out.seek(0)
        err.seek(0)
        return Measured(
            proc.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            seconds,
            usage.ru_maxrss,
        )


def vm_hwm(pid: int) -> int:
    """The peak resident set size of a running process, in kB (``VmHWM`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


MEMORY_BOUND_KB = 200 * 1024  # what a hostile document may add to a process's peak memory


# --- mounts and kernel settings -----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)  # fmt: skip
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


# --- hostile documents -------------------------------------------------------------------


@dataclass
class Bait:
    """What a hostile document may try to reach: a secret file and a listener."""

    secret: Path  # a file outside the spool; its content must never show up anywhere
    marker: str  # the secret's content
    url: str  # the listener, http://127.0.0.1:PORT

    @classmethod
    def make(cls, directory: Path, url: str) -> Bait:
        marker = f"TOP-SECRET-{random.Random(4711).getrandbits(64):016x}"
        secret = directory / "secret.txt"
        secret.write_text(marker + "\n")
        return cls(secret, marker, url)


@dataclass(frozen=True)
class Hostile:
    """One hostile document, and words the first reason for rejecting it must contain."""

    id: str
    make: Callable[[Bait, int], bytes]  # (bait, max_size) -> the document
    reason: tuple[str, ...]  # one of these is in the first error (case-insensitive)
    note: str = field(default="", compare=False)

    def data(self, bait: Bait, max_size: int) -> bytes:
        return self.make(bait, max_size)


def _decl(encoding: str = "UTF-8") -> str:
    return f'<?xml version="1.0" encoding="{encoding}"?>\n'


def _billion_laughs() -> str:
    lines = ['<!ENTITY lol0 "lol">']
    lines += [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return "<!DOCTYPE lolz [\n " + "\n ".join(lines) + "\n]>\n<lolz>&lol9;</lolz>\n"


def _quadratic() -> str:
    # One 10 kB entity referenced 10,000 times: 100 MB if expanded.
    return (
        f'<!DOCTYPE order [<!ENTITY a "{"A" * 10_000}">]>\n'
        f'<order id="q"><sku>{"&a;" * 10_000}</sku><qty>1</qty></order>\n'
    )


def _xxe_file(b: Bait) -> str:
    return (
        f'<!DOCTYPE order [<!ENTITY s SYSTEM "{b.secret.as_uri()}">]>\n'
        '<order id="x"><sku>&s;</sku><qty>1</qty></order>\n'
    )


def _xxe_http(b: Bait) -> str:
    return (
        f'<!DOCTYPE order [<!ENTITY s SYSTEM "{b.url}/entity">]>\n'
        '<order id="x"><sku>&s;</sku><qty>1</qty></order>\n'
    )


def _parameter_entity_http(b: Bait) -> str:
    return f'<!DOCTYPE order [<!ENTITY % p SYSTEM "{b.url}/param.dtd"> %p;]>\n<order/>\n'


def _external_dtd(b: Bait) -> str:
    return f'<!DOCTYPE order SYSTEM "{b.url}/order.dtd">\n<order id="x"/>\n'


def _xinclude(b: Bait) -> str:
    return (
        '<order id="x" xmlns:xi="http://www.w3.org/2001/XInclude">\n'
        f'  <xi:include href="{b.secret.as_uri()}" parse="text"/>\n'
        f'  <xi:include href="{b.url}/xinclude.xml"/>\n'
        "  <sku>HAM-1</sku><qty>1</qty>\n</order>\n"
    )


def _utf32(text: str) -> bytes:
    # UTF-32 (with its BOM), which the DOCTYPE pre-check does not decode: the
    # parser's own defences (no resolver, entity limits, docinfo) must hold.
    return (_decl("UTF-32") + text).encode("utf-32")


def _utf16be_no_bom(text: str) -> bytes:
    return (_decl("UTF-16BE") + text).encode("utf-16-be")


def _garbage(b: Bait, limit: int) -> bytes:
    data = bytearray(random.Random(65).randbytes(8192))
    data[0:1] = b"\x8f"  # never a "<" by chance
    return bytes(data)


def _utf8(text: str) -> bytes:
    return (_decl() + text).encode()


VALID_ORDER = order("hostile-ok")

HOSTILE: list[Hostile] = [
    Hostile("billion-laughs", lambda b, n: _utf8(_billion_laughs()), ("DOCTYPE",)),
    Hostile(
        "billion-laughs-utf32",
        lambda b, n: _utf32(_billion_laughs()),
        ("DOCTYPE", "amplification"),
        note="past the DOCTYPE pre-check",
    ),
    Hostile("quadratic-blowup", lambda b, n: _utf8(_quadratic()), ("DOCTYPE",)),
    Hostile(
        "quadratic-blowup-utf16be",
        lambda b, n: _utf16be_no_bom(_quadratic()),
        ("DOCTYPE", "amplification", "encoding"),
        note="no BOM: past the DOCTYPE pre-check",
    ),
    Hostile("xxe-local-file", lambda b, n: _utf8(_xxe_file(b)), ("DOCTYPE",)),
    Hostile("xxe-local-file-utf32", lambda b, n: _utf32(_xxe_file(b)), ("DOCTYPE", "entity")),
    Hostile("xxe-http", lambda b, n: _utf8(_xxe_http(b)), ("DOCTYPE",)),
    Hostile("xxe-http-utf32", lambda b, n: _utf32(_xxe_http(b)), ("DOCTYPE", "entity")),
    Hostile(
        "parameter-entity-http-utf32",
        lambda b, n: _utf32(_parameter_entity_http(b)),
        ("DOCTYPE", "entity"),
    ),
    Hostile("external-dtd", lambda b, n: _utf8(_external_dtd(b)), ("DOCTYPE",)),
    Hostile("external-dtd-utf32", lambda b, n: _utf32(_external_dtd(b)), ("DOCTYPE",)),
    Hostile("xinclude", lambda b, n: _utf8(_xinclude(b)), ("include", "not expected")),
    Hostile(
        "nesting-10000", lambda b, n: b"<order>" * 10_000 + b"</order>" * 10_000, ("depth", "nest")
    ),
    Hostile(
        "over-max-size",
        lambda b, n: VALID_ORDER.replace(b"<sku>", b"<!--" + b"x" * n + b"--><sku>"),
        ("max_size",),
    ),
    Hostile("empty", lambda b, n: b"", ("empty",)),
    Hostile("bom-alone", lambda b, n: b"\xef\xbb\xbf", ("empty", "start tag")),
    Hostile("utf16-bom-with-doctype", lambda b, n: _xxe_file(b).encode("utf-16"), ("DOCTYPE",)),
    Hostile(
        "utf16-no-bom-with-doctype",
        lambda b, n: (_decl("UTF-16") + _xxe_http(b)).encode("utf-16-le"),
        ("DOCTYPE",),
    ),
    Hostile(
        "utf16-no-bom-undeclared",
        lambda b, n: VALID_ORDER.split(b"\n", 1)[1].decode().encode("utf-16-le"),
        ("0x0", "Char", "start tag"),
    ),
    Hostile(
        "invalid-utf8",
        lambda b, n: VALID_ORDER.replace(b"HAM-1", b"HAM-\xc3\x28\xff"),
        ("UTF-8", "encoding", "bytes"),
    ),
    Hostile("nul-bytes", lambda b, n: VALID_ORDER.replace(b"HAM-1", b"HAM\x00-1"), ("0x0", "Char")),
    Hostile("binary-garbage", _garbage, ("start tag", "document", "content", "Char", "encoding")),
    Hostile(
        "truncated",
        lambda b, n: VALID_ORDER[: len(VALID_ORDER) // 2],
        ("end of data", "Premature", "EndTag", "expected"),
    ),
]


def reason_ok(case: Hostile, text: str) -> bool:
    low = text.lower()
    return any(word.lower() in low for word in case.reason)


# --- what surrounds the spool ---------------------------------------------------------------


def surroundings(site_dir: Path) -> dict[str, object]:
    """The spool's parent directory in full, the names beside it, and those in ``/``.

    The configuration, the partner files and the spool are under ``site_dir``;
    a name that escaped the spool through ``..`` would land there or beside
    it, and an absolute one at the top of the file system.
    """
    out: dict[str, object] = {"site": snapshot(site_dir)}
    for above in [site_dir.parent, Path("/")]:
        out[str(above)] = sorted(os.listdir(above))
    return out
