"""journald's native protocol: one datagram per entry, with its fields.

Under systemd, stderr is a stream into the journal and ``$JOURNAL_STREAM``
names it (``DEVICE:INODE``); a service that finds its stderr there may
"upgrade" to the native protocol (``systemd.exec(5)``), which keeps what a
stream loses: the priority of each entry and fields of its own
(``JOBSPOOL_JOB=order-1.xml``), so that ``journalctl -p warning`` and
``journalctl JOBSPOOL_JOB=...`` work. The protocol is ``KEY=value`` lines
sent to ``/run/systemd/journal/socket``; a value with a newline goes as
``KEY``, a newline, its length as 64-bit little endian, the value and a
newline. An entry too large for a datagram goes in a sealed memfd whose
descriptor is passed instead, as ``sd_journal_sendv()`` does. A few lines of
the stdlib instead of the C extension ``systemd-python``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import re
import socket
import struct
import sys
import threading

SOCKET = "/run/systemd/journal/socket"
_FIELD = re.compile(r"[^A-Z0-9_]")


def stderr_is_journal() -> bool:
    """Does ``$JOURNAL_STREAM`` (``DEVICE:INODE``) name the file behind our stderr?"""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # stderr closed, or replaced by an object without a file
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def field_name(key: str, prefix: str = "") -> str:
    """A journal field name for ``key``: upper case, A-Z 0-9 _, not starting with _, <= 64."""
    name = _FIELD.sub("_", (prefix + key).upper()).lstrip("_") or "FIELD"
    if name[0].isdigit():
        name = "F" + name
    return name[:64]


def encode(fields: list[tuple[str, str]]) -> bytes:
    """One entry in the native protocol; values with newlines in the binary-safe form."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A sender of entries to journald; thread-safe (each entry is one datagram)."""

    def __init__(self, path: str = SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, entry: bytes) -> None:
        """Send one encoded entry; OSError when journald cannot be reached."""
        sock = self._socket()
        try:
            sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(sock, entry)

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Large entries (a traceback) should fit one datagram when the system lets them.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
                self._sock = sock
            return self._sock

    def _send_large(self, sock: socket.socket, entry: bytes) -> None:
        import fcntl

        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            sock.sendmsg([], [rights], 0, self.path)
        finally:
            os.close(fd)
