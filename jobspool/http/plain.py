"""The plain-http listener (``http.plain_listen``): every request answered 403 "use https".

A client that tries ``http://`` gets a hint instead of a closed
connection: ``403 use https: https://HOST:PORT/PATH?QUERY``, where HOST is
the name the client asked for (its ``Host`` header, when it is a plain host
name or address) or else the address it connected to, and PORT the TLS
port. Nothing else happens on this port: no authentication is asked for
(credentials sent in clear are not looked at), no body is read, nothing
reaches the spool. After the answer the connection is closed; what the
client still sends meanwhile is discarded for a moment so that the answer
is not lost to a reset.

It is a few lines of asyncio around h11 (uvicorn's own HTTP/1.1 parser),
on the server's event loop, with the same limits: headers within
``http.timeout``, at most 16 KiB of them (h11), at most
``http.max_concurrency`` connections at once.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable

import h11

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+|\[[0-9A-Fa-f:.]+\]")
DRAIN_SECONDS = 2.0  # how long unread input is discarded before closing
DRAIN_BYTES = 1 << 20


def hint(host_header: bytes | None, local: str, port: int, target: bytes) -> bytes:
    """The answer's text: where the same request goes over https."""
    host = local if ":" not in local else f"[{local}]"
    if host_header:
        name = host_header.decode("latin-1").strip()
        if name.startswith("["):
            name = name.split("]", 1)[0] + "]"
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        if _HOST.fullmatch(name):
            host = name
    path = target.decode("latin-1")
    if not path.startswith("/") or any(c < " " or c > "~" for c in path):
        path = "/"
    return f"use https: https://{host}:{port}{path}\n".encode()


class Refuse(asyncio.Protocol):
    """One plain-http connection: read the request's head, answer 403, close."""

    def __init__(self, port: int, timeout: float, room: Callable[[int], bool]) -> None:
        self.port, self.timeout, self.room = port, timeout, room
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.counted = False  # holds one of max_connections
        self.drained = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.room(+1):
            transport.abort()
            return
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(self.timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.answered:
            self.drained += len(data)
            if self.drained > DRAIN_BYTES:
                self.transport.abort()
            return
        try:
            self.conn.receive_data(data)
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self.transport.abort()
            return
        if isinstance(event, h11.Request):
            self.answer(event)

    def answer(self, request: h11.Request) -> None:
        assert self.transport is not None
        headers = dict(request.headers)
        local = self.transport.get_extra_info("sockname")[0]
        body = hint(headers.get(b"host"), local, self.port, request.target)
        response = h11.Response(
            status_code=403,
            headers=[
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                ("Cache-Control", "no-store"),
            ],
        )
        self.transport.write(self.conn.send(response) + self.conn.send(h11.Data(data=body)))
        self.answered = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete; the client may still be sending
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self.transport.close)

    def eof_received(self) -> bool | None:
        if self.transport is not None and self.answered:
            self.transport.close()
        elif self.transport is not None:
            self.transport.abort()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.room(-1)


async def serve(
    sock: socket.socket, port: int, timeout: float, max_connections: int
) -> asyncio.Server:
    """Start refusing on the listening socket ``sock``; the TLS port is ``port``."""
    count = [0]

    def room(delta: int) -> bool:
        if delta > 0 and count[0] >= max_connections:
            return False
        count[0] += delta
        return True

    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Refuse(port, timeout, room), sock=sock)
