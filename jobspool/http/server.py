"""``jobspool serve``: the front under uvicorn, with TLS, limits and the systemd protocols.

- **TLS** from ``http.cert`` and ``http.key`` (TLS 1.2 or newer). Without
  them ``serve`` refuses to start unless ``--insecure-behind-proxy`` is given
  and ``http.trusted_proxies`` names the TLS-terminating proxy: then only a
  request that proxy marks ``X-Forwarded-Proto: https`` is served, and
  everything else gets 403 (uvicorn's proxy-headers middleware, trusting
  exactly those addresses).
- **Limits**: ``http.max_concurrency`` open connections (uvicorn answers 503
  beyond it); ``http.keep_alive`` for an idle connection; ``http.timeout`` for
  a request's headers to arrive (uvicorn has no such deadline of its own: a
  client trickling its headers would hold a connection for ever) and again
  for its body (in the application); headers at most 16 KiB (h11).
- **systemd**: ``READY=1`` once listening, ``WATCHDOG=1`` from the event
  loop, ``STOPPING=1``; SIGHUP reloads the configuration, the users file is
  re-read whenever it changes, and the certificate is loaded anew (for the
  next connections). SIGTERM stops gracefully: requests under way may finish.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from jobspool import config, logs, notify
from jobspool.config import Config, Http
from jobspool.errors import BadRequest, ConfigError, Denied, JobspoolError, TryLater
from jobspool.http.app import Front
from jobspool.http.console import Console
from jobspool.spool import Spool

if TYPE_CHECKING:
    from types import FrameType

_RESTART_ONLY = (
    "host", "port", "trusted_proxies", "max_concurrency", "keep_alive", "timeout", "plain",
)  # fmt: skip


def tls_context(http: Http) -> ssl.SSLContext | None:
    """The server's TLS context, or None without cert and key; ConfigError if unusable."""
    if http.cert is None or http.key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    load_certificate(ctx, http)
    return ctx


def load_certificate(ctx: ssl.SSLContext, http: Http) -> None:
    assert http.cert is not None and http.key is not None

    def no_passphrase() -> str:
        raise ConfigError(f"{http.key}: the key is encrypted; give the service an unencrypted key")

    try:
        ctx.load_cert_chain(http.cert, http.key, password=no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError(f"{http.cert}, {http.key}: cannot use them as certificate and key: "
                          f"{exc.reason or exc}") from None  # fmt: skip
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate or key: {exc}") from None


def prepare(config_path: str | None, behind_proxy: bool) -> tuple[Config, ssl.SSLContext | None]:
    """Everything ``serve`` checks before it listens (also ``serve --check``)."""
    cfg = config.load(config_path)
    http = cfg.http
    if http is None:
        raise ConfigError(f"{cfg.path}: no http: section; add one (see docs/http.rst)")
    ctx = tls_context(http)
    if ctx is not None and behind_proxy:
        raise BadRequest("--insecure-behind-proxy is for a configuration without cert: and key:")
    if ctx is None and not behind_proxy:
        raise ConfigError(
            f"{cfg.path}: http: needs cert: and key: (the certificate and its key); "
            "behind a reverse proxy that terminates TLS, set http.trusted_proxies and "
            "run 'jobspool serve --insecure-behind-proxy'"
        )
    if ctx is None and not http.trusted_proxies:
        raise ConfigError(f"{cfg.path}: --insecure-behind-proxy needs http.trusted_proxies: "
                          "the addresses of the proxy that terminates TLS")  # fmt: skip
    Spool.of(cfg).require()
    return cfg, ctx


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, or an error saying why not (busy: 75, denied: 77, else 78)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"http.listen {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        what = f"cannot listen on {host}:{port}: {exc.strerror}"
        if exc.errno == errno.EADDRINUSE:
            raise TryLater(f"{what} (another server has the port)") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise Denied(f"{what} (ports below 1024 need CAP_NET_BIND_SERVICE; under "
                         "systemd, SocketBindAllow= must name the port)") from None  # fmt: skip
        raise ConfigError(what) from None
    return sock


def header_deadline(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers take too long.

    uvicorn times out only idle keep-alive connections, and forgets even
    that as soon as a byte arrives. Here the next request's headers must be
    complete within ``timeout`` of the connection (or the previous answer).
    """

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in; the body has its own deadline

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not (
                self.transport.is_closing()
            ):
                self.transport.close()

    return Protocol


class Server(uvicorn.Server):
    """uvicorn's server, speaking systemd's notify protocol and reloading on SIGHUP."""

    def __init__(
        self,
        settings: uvicorn.Config,
        front: Front,
        cfg: Config,
        config_path: str | None,
        ctx: ssl.SSLContext | None,
        plain_sock: socket.socket | None = None,
    ) -> None:
        super().__init__(settings)
        self.front, self.cfg, self.config_path, self.ctx = front, cfg, config_path, ctx
        self.plain_sock = plain_sock
        self.plain: asyncio.Server | None = None
        self.log = logs.get()
        self._watchdog = notify.watchdog_interval()
        self._pinged = 0.0

    @property
    def where(self) -> str:
        http = self.cfg.http
        assert http is not None
        return f"{'https' if self.ctx else 'http'}://{_host(http.host)}:{http.port}"

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        http = self.cfg.http
        assert http is not None
        if self.plain_sock is not None and http.plain is not None:
            from jobspool.http import plain

            self.plain = await plain.serve(
                self.plain_sock, http.port, http.timeout, http.max_concurrency
            )
            self.log.info("refusing plain http", url=f"http://{_host(http.plain[0])}:"
                          f"{http.plain[1]}", answer="403 use https")  # fmt: skip
        self.log.info("listening", url=self.where, tls=self.ctx is not None,
                      trusted_proxies=list(http.trusted_proxies),
                      max_concurrency=http.max_concurrency)  # fmt: skip
        notify.notify("READY=1", f"STATUS=serving on {self.where}")

    async def on_tick(self, counter: int) -> bool:
        if self._watchdog is not None and time.monotonic() - self._pinged >= self._watchdog:
            notify.notify("WATCHDOG=1")  # from the event loop: a stuck loop gets no ping
            self._pinged = time.monotonic()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify.notify("STOPPING=1")
        if self.plain is not None:
            self.plain.close()
        self.log.info("stopping", waiting_for=len(self.server_state.connections))
        await super().shutdown(sockets)

    def reload(self) -> None:
        """SIGHUP: the configuration anew, the certificate anew; a broken one is refused."""
        notify.reloading()
        try:
            cfg = config.load(self.config_path)
            old, new = self.cfg.http, cfg.http
            if new is None:
                raise ConfigError(f"{cfg.path}: no http: section")
            assert old is not None
            if (self.ctx is None) != (new.cert is None):
                raise ConfigError("switching TLS on or off needs a restart")
            if self.ctx is not None:
                tls_context(new)  # fully usable before the running context is touched
                load_certificate(self.ctx, new)
            self.front.reload(cfg)
            restart = [k for k in _RESTART_ONLY if getattr(old, k) != getattr(new, k)]
            self.cfg = cfg._replace(http=new._replace(**{k: getattr(old, k) for k in restart}))
            if restart:
                self.log.warning("changed settings need a restart", settings=restart)
            self.log.info("configuration reloaded", config=str(cfg.path))
        except JobspoolError as exc:
            self.log.error("reload refused; serving with the previous configuration",
                           error=str(exc))  # fmt: skip
        finally:
            notify.notify("READY=1", f"STATUS=serving on {self.where}")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _ToStructlog(logging.Handler):
    """uvicorn's and asyncio's log records as structlog lines, like everything else."""

    def emit(self, record: logging.LogRecord) -> None:
        extra: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            extra["exc_info"] = record.exc_info
        logs.get().log(record.levelno, record.getMessage(), **extra)


def serve(config_path: str | None, behind_proxy: bool = False) -> int:
    """Run until SIGTERM; 0 after a graceful stop."""
    cfg, ctx = prepare(config_path, behind_proxy)
    http = cfg.http
    assert http is not None
    logs.setup()
    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(logging.WARNING)
    front = Front(cfg, Console().routes())
    users = front.site.auth.refresh()
    for warning in front.site.auth.warnings:
        front.log.warning("users file", problem=warning, users_file=str(http.users))
    if not users.users:
        front.log.warning("no users: every request is answered 401; add one with "
                          "'jobspool user add NAME'", users_file=str(http.users))  # fmt: skip
    sock = listen(http.host, http.port)
    plain_sock = listen(*http.plain) if http.plain is not None else None
    settings = uvicorn.Config(
        front,
        host=http.host,
        port=http.port,
        ssl_context_factory=(lambda _config, _default: ctx) if ctx is not None else None,
        proxy_headers=bool(http.trusted_proxies),
        forwarded_allow_ips=list(http.trusted_proxies),
        limit_concurrency=http.max_concurrency,
        timeout_keep_alive=max(1, math.ceil(http.keep_alive)),
        # Let uploads under way finish their body (http.timeout) and be queued.
        timeout_graceful_shutdown=math.ceil(http.timeout) + 5,
        http=header_deadline(http.timeout),
        lifespan="off",
        ws="none",
        access_log=False,  # Front writes one structured line per request
        log_config=None,
        server_header=False,
    )
    server = Server(settings, front, cfg, config_path, ctx, plain_sock)

    def stopped(signum: int, frame: FrameType | None) -> None:
        pass  # uvicorn sends SIGTERM again once it has stopped: exit 0 then, not by the signal

    signal.signal(signal.SIGTERM, stopped)
    server.run(sockets=[sock])
    return 0 if server.started else 1
