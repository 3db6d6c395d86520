"""Hostile input: the documents partners may send, and what they may try to reach.

- :class:`Listener`: a TCP listener on a loopback port that records every
  connection. A check that fetched a DTD or an entity over the network would
  show up here; the tests assert it saw none.
- :data:`HOSTILE`: the table of hostile documents every path is attacked with
  (``jobspool check``, ``jobspool submit``, the drop folder, an upload).
- :data:`MEMORY_BOUND_KB`: what one may add to a process's peak memory.
- :func:`surroundings`: the spool's parent and the file system around it, to
  show that nothing escaped the spool.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.kit.documents import order
from tests.kit.site import snapshot

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


MEMORY_BOUND_KB = 200 * 1024  # what a hostile document may add to a process's peak memory


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
