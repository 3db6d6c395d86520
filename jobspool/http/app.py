"""The HTTP front's application: five methods on the spool, every error mapped in one place.

Every request passes :class:`Front` first: plain http is refused (403),
then HTTP Basic authentication (401), then the method, which reads and
writes the spool only through the core the command line uses (``Spool``,
``intake``, ``fetch``) in a worker thread. Whatever a method raises becomes
its answer in :func:`error_response`, the one place where exceptions turn
into status codes, and every request leaves one access-log line.

A user sees only the interfaces granted to it (``http.grants``): an
interface or a job it may not use is answered exactly like one that does
not exist.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Message, Receive, Scope, Send

from jobspool import logs, names
from jobspool.config import Config, Http, Interface
from jobspool.durable import Staging, os_errors
from jobspool.errors import BadRequest, ConfigError, JobspoolError, Rejected, TryLater
from jobspool.http.auth import Authenticator, parse_basic
from jobspool.spool import INCOMING, QUEUE, Found, Place, Spool

if TYPE_CHECKING:
    from typing_extensions import Buffer

REALM = 'Basic realm="jobspool", charset="UTF-8"'
XML = "application/xml"
T = TypeVar("T")


class HttpError(Exception):
    """An answer decided by the HTTP layer itself: 401, 403, 408, 413."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


# --- the one mapping from exceptions to answers ----------------------------------

# The core's exceptions carry exit codes (jobspool.errors); this is their HTTP meaning.
# Denied (77) is 500, not 503: the service itself cannot reach the spool (its user,
# group or a read-only file system), and retrying will not help until an
# administrator acts. Its details go to the log, not to the client.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (HttpError, 0),  # carries its own status
    (Rejected, 400),  # 65: checked and rejected; it is in joberrors now
    (BadRequest, 400),  # 2: unknown job or interface, missing parameter, invalid name
    (ClientDisconnect, 400),  # the client went away while sending; nobody reads the answer
    (TryLater, 503),  # 75: no log yet, disk full, spool busy
    (JobspoolError, 500),  # 77 Denied, 78 ConfigError, 1 other OS errors
)


def status_of(exc: BaseException) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return exc.status if isinstance(exc, HttpError) else status
    return 500  # a bug


def error_response(exc: BaseException, spool_root: Path, request_id: str) -> Response:
    """The answer to a request that raised ``exc``: status, text/plain messages, headers."""
    status = status_of(exc)
    headers = dict(exc.headers) if isinstance(exc, HttpError) else {}
    if status == 500:
        # The server's own trouble (paths, users, errno texts) is for its administrator.
        lines = [f"internal error: see the server's log for request {request_id}"]
    else:
        lines = [str(exc)]
        if isinstance(exc, Rejected):
            lines += [str(e) for e in exc.errors]
    # Spool paths are shown relative to the spool, as 'jobspool status' shows them.
    text = "".join(line.replace(f"{spool_root}/", "") + "\n" for line in lines)
    if status == 503:
        headers.setdefault("Retry-After", "30")
    return PlainTextResponse(text, status_code=status, headers=headers)


# --- what a request works on ---------------------------------------------------------


class Stylesheet:
    """An XSLT an interface configures for ``xslt=NAME``, compiled once.

    It may read files next to it while it is compiled (``xsl:include``), but
    the transformation itself may read, write or fetch nothing: its input is
    a partner's document.
    """

    def __init__(self, path: Path, extension: str | None = None) -> None:
        from lxml import etree

        try:
            doc = etree.parse(str(path), etree.XMLParser(no_network=True, resolve_entities=False))
            self.xslt = etree.XSLT(doc, access_control=etree.XSLTAccessControl.DENY_ALL)
        except (OSError, etree.XMLSyntaxError, etree.XSLTParseError) as exc:
            raise ConfigError(f"{path}: not a usable XSLT stylesheet: {exc}") from None
        output = doc.getroot().find("{http://www.w3.org/1999/XSL/Transform}output")
        method = output.get("method", "xml") if output is not None else "xml"
        media = output.get("media-type") if output is not None else None
        self.media_type = media or {"text": "text/plain", "html": "text/html"}.get(method, XML)
        self.extension = extension or extension_of(self.media_type, method)
        self.path = path
        self._lock = threading.Lock()  # one transformation at a time per stylesheet

    def apply(self, data: bytes, job: str) -> bytes:
        from lxml import etree

        from jobspool.check import hardened_parser

        try:
            doc = etree.fromstring(data, hardened_parser())
        except etree.XMLSyntaxError as exc:
            raise BadRequest(
                f"cannot apply xslt to {job}: it is not well-formed XML ({exc})"
            ) from None
        with self._lock:
            try:
                result = self.xslt(doc)
            except etree.XSLTApplyError as exc:
                why = "; ".join(e.message for e in self.xslt.error_log) or str(exc)
                raise BadRequest(f"the xslt {self.path.stem} failed on {job}: {why}") from None
        # Serialised as its xsl:output says (method, encoding); lxml result trees are buffers.
        return bytes(memoryview(cast("Buffer", result)))


def extension_of(media_type: str, method: str) -> str:
    """The file name extension of a transformed download: from its media type or method."""
    import mimetypes

    if media_type == XML or media_type.endswith("+xml") or media_type == "text/xml":
        return "xml"
    guessed = mimetypes.guess_extension(media_type, strict=False)
    if guessed:
        return guessed.lstrip(".")
    return {"text": "txt", "html": "html"}.get(method, "xml")


def download_name(name: str, sheet: Stylesheet | None) -> str:
    """The file name a download is offered under: the job's, with the stylesheet's extension."""
    if sheet is None:
        return name
    stem = name[: -len(".xml")] if name.endswith(".xml") else name
    return f"{stem}.{sheet.extension}"


class Site:
    """What requests work on, built from one configuration and replaced whole on reload."""

    def __init__(self, cfg: Config, auth: Authenticator | None = None) -> None:
        if cfg.http is None:
            raise ConfigError(f"{cfg.path}: no http: section; add one (see docs/http.rst)")
        self.cfg = cfg
        self.http: Http = cfg.http
        self.spool = Spool.of(cfg)
        self.stylesheets = {
            (iface.name, name): Stylesheet(
                path, self.http.interface(iface.name).extensions.get(name)
            )
            for iface in cfg.interfaces.values()
            for name, path in iface.xslt.items()
        }
        same = auth is not None and (auth.path, auth.cache_seconds) == (
            self.http.users,
            self.http.auth_cache,
        )
        self.auth = (
            auth
            if same and auth is not None
            else Authenticator(self.http.users, self.http.auth_cache)
        )

    # --- grants ----------------------------------------------------------------

    def granted(self, user: str) -> tuple[str, ...]:
        """The interfaces ``user`` may use, in configuration order."""
        grants = self.http.granted(user)
        return tuple(i for i in self.cfg.interfaces if "*" in grants or i in grants)

    def interface(self, user: str, name: str) -> Interface:
        """A granted interface; anything else is answered as an unknown interface."""
        if name in self.granted(user):
            return self.cfg.interfaces[name]
        yours = ", ".join(self.granted(user)) or "none"
        raise BadRequest(f"unknown interface {name!r} (yours: {yours})")

    def job(self, user: str, name: str) -> tuple[Found, Interface]:
        """A job on a granted interface; anything else is answered as an unknown job."""
        names.check_name(name)
        found = self.spool.locate(name)
        if found is None:
            self.spool.require()  # no spool at all is the server's problem, not the client's
        else:
            iface = found.place.interface or Spool.interface_of_log(found.log_path)
            if iface is not None and iface in self.granted(user):
                return found, self.cfg.interfaces[iface]
        raise BadRequest(f"unknown job {name!r}")

    # --- the methods (run in a worker thread) ------------------------------------

    def status(self, user: str, name: str) -> str:
        return str(self.job(user, name)[0].place)

    def status_by_ref(self, user: str, ref: str) -> tuple[str, str]:
        """The newest job ``user`` uploaded with ``ref``, and its status."""
        from jobspool.http import refs

        for _ in range(3):  # it may move between being found and being located
            name = refs.find(self.spool, self.granted(user), user, ref)
            if name is None:
                self.spool.require()
                break
            found = self.spool.locate(name)
            if found is not None:
                return name, str(found.place)
        raise BadRequest(f"no job of yours has RefName {ref!r}")

    def log(self, user: str, name: str) -> bytes:
        """The job's log as a partner sees it: no server paths, output only if allowed."""
        from jobspool.http.partnerlog import partner_view

        _, iface = self.job(user, name)
        data = self.spool.read_log(name)
        return partner_view(data, self.spool.root, self.http.interface(iface.name).joblog_output)

    def queue(self, user: str, interface: str) -> list[str]:
        """The queue in processing order; with ``move_on_listing``, taken to bak by this."""
        from jobspool.fetch import take_listed

        iface = self.interface(user, interface)
        if iface.outbound and self.http.interface(iface.name).move_on_listing:
            return take_listed(self.cfg, iface.name, by=user)
        return self.spool.listing(iface.name).names

    def queue_state(self, user: str, interface: str) -> str:
        """``ok``, ``paused`` or ``blocked: WHY`` for a granted interface."""
        from jobspool.http.partnerlog import queue_state

        iface = self.interface(user, interface)
        self.spool.require(iface.name)
        try:
            blocked: str | None = self.spool.blocked_marker(iface.name).read_text()
        except FileNotFoundError:
            blocked = None
        except OSError as exc:
            with os_errors(f"cannot read the blocked marker of {iface.name}"):
                raise exc from None
        return queue_state(self.spool.is_paused(iface.name), blocked, self.spool.root)

    def upload_limit(self, user: str, interface: str | None) -> int:
        """The most an upload may send: its interface's max_size, or the largest granted one."""
        if interface is not None:
            return self.interface(user, interface).max_size
        granted = self.granted(user)
        if not granted:
            raise BadRequest("no interface accepts this document; name one with Interfacename=")
        return max(self.cfg.interfaces[i].max_size for i in granted)

    def upload(
        self, user: str, interface: str | None, body: Staging, head: bytes, ref: str | None
    ) -> str:
        """Queue an uploaded body, staged on disk as it arrived; ``head`` is its first bytes."""
        from jobspool.intake import accept_staged, interface_for

        try:
            if interface is None:
                # Only the user's interfaces are candidates: a document never reveals others.
                mine = {i: self.cfg.interfaces[i] for i in self.granted(user)}
                interface = interface_for(self.cfg._replace(interfaces=mine), head)
            iface = self.interface(user, interface)
            if body.size > iface.max_size:
                raise too_large(iface.max_size, iface.name)
            staged = body.finish()
        except BaseException:
            body.discard()
            raise
        name = new_name(iface.name)
        try:
            return accept_staged(self.cfg, iface.name, name, staged, via="upload", ref=ref, by=user)
        except Rejected as exc:
            count = f"{len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''}"
            raise Rejected(f"{name} rejected into joberrors ({count}; its log: "
                           f"/xml/joblog?Jobname={name}):", exc.errors) from None  # fmt: skip

    def download(
        self, user: str, name: str | None, interface: str | None, xslt: str | None
    ) -> tuple[str, bytes, str, str]:
        """A job's content (or the next of an interface's queue): name, body, media type, file name.

        An ``_out`` job still queued is moved to ``bak`` by this, its first
        download (``fetch.take``, which writes its log). The transformation
        runs before that move: a job it fails on stays queued.
        """
        from jobspool.fetch import take

        if name is not None:
            found: Found | None
            found, iface = self.job(user, name)
        else:
            found, iface = None, self.interface(user, interface or "")
        sheet = None
        if xslt is not None:
            sheet = self.stylesheets.get((iface.name, xslt))
            if sheet is None:
                known = ", ".join(sorted(iface.xslt)) or "none configured"
                raise BadRequest(f"unknown xslt {xslt!r} for {iface.name} (known: {known})")
        for _ in range(10):  # another client may take the same job meanwhile
            if found is None:
                queued = self.spool.queued(iface.name)
                if not queued:
                    # The same request succeeds once a job is queued: 503, not 400.
                    raise TryLater(f"no job queued on {iface.name}")
                head = queued[0][1]
                found = Found(
                    head, Place(QUEUE, iface.name), self.spool.dir(QUEUE, iface.name) / head
                )
            if found.place.state == INCOMING:
                raise TryLater(f"{found.name} is in {found.place}: not checked yet")
            try:
                data = found.path.read_bytes()
            except FileNotFoundError:
                found = self.job(user, name)[0] if name is not None else None
                continue
            except OSError as exc:
                with os_errors(f"cannot read {found.name}"):
                    raise exc from None
            body = sheet.apply(data, found.name) if sheet else data
            if found.place.state == QUEUE and iface.outbound:
                try:
                    _, taken = take(self.cfg, iface.name, found.name, by=user)
                except BadRequest:
                    if found.path.exists():
                        raise  # not a race: the core refuses for a reason of its own
                    found = self.job(user, name)[0] if name is not None else None
                    continue
                if taken != data:
                    body = sheet.apply(taken, found.name) if sheet else taken
            media = sheet.media_type if sheet else XML
            return found.name, body, media, download_name(found.name, sheet)
        raise TryLater("the job kept moving while it was downloaded; try again")


def new_name(interface: str) -> str:
    """A fresh job name for an upload: interface, time and 32 random bits."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{interface[:100]}-{stamp}-{secrets.token_hex(4)}.xml"


def too_large(limit: int, what: str) -> HttpError:
    return HttpError(413, f"the body is larger than max_size ({limit} bytes) of {what}",
                     {"Connection": "close"})  # fmt: skip


# --- the requests ----------------------------------------------------------------------


def params(
    request: Request, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, str]:
    """The query's parameters: each known, none twice, the required ones there."""
    allowed = (*required, *optional)
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in allowed:
            raise BadRequest(f"unknown parameter {key!r} (this method takes: {', '.join(allowed)})")
        if key in out:
            raise BadRequest(f"parameter {key} given twice")
        out[key] = value
    for key in required:
        if key not in out:
            raise BadRequest(f"missing parameter {key}")
    return out


def who(request: Request) -> tuple[Site, str]:
    """The Site this request works on and its authenticated user (set by :class:`Front`)."""
    return request.scope["jobspool.site"], request.scope["jobspool.user"]


async def off_loop(call: Callable[[], T]) -> T:
    """Run blocking spool work in a worker thread."""
    return await anyio.to_thread.run_sync(call)


async def jobqueue(request: Request) -> Response:
    p = params(request, ("Interfacename",))
    site, user = who(request)
    state = await off_loop(functools.partial(site.queue_state, user, p["Interfacename"]))
    jobs = await off_loop(functools.partial(site.queue, user, p["Interfacename"]))
    return PlainTextResponse(
        "".join(f"{name}\n" for name in jobs), headers={"X-Queue-Status": header_text(state)}
    )


async def queuestatus(request: Request) -> Response:
    p = params(request, ("Interfacename",))
    site, user = who(request)
    return PlainTextResponse(
        await off_loop(functools.partial(site.queue_state, user, p["Interfacename"]))
    )


def header_text(text: str) -> str:
    """Text fit for a header value: one line of printable ASCII (others become ``?``)."""
    line = " ".join(text.split())
    return "".join(c if " " <= c <= "~" else "?" for c in line)[:1000]


async def joblog(request: Request) -> Response:
    p = params(request, ("Jobname",))
    site, user = who(request)
    return Response(await off_loop(functools.partial(site.log, user, p["Jobname"])), media_type=XML)


async def jobstatus(request: Request) -> Response:
    p = params(request, (), ("Jobname", "RefName"))
    if "Jobname" in p and "RefName" in p:
        raise BadRequest("give either Jobname= or RefName= (your reference of an upload)")
    if not p:
        raise BadRequest("missing parameter Jobname (or RefName, your reference of an upload)")
    site, user = who(request)
    if "Jobname" in p:
        return PlainTextResponse(await off_loop(functools.partial(site.status, user, p["Jobname"])))
    name, status = await off_loop(functools.partial(site.status_by_ref, user, p["RefName"]))
    return PlainTextResponse(
        status, headers={"X-Jobname": name, "Content-Location": f"/xml/jobstatus?Jobname={name}"}
    )


async def job(request: Request) -> Response:
    p = params(request, (), ("Jobname", "Interfacename", "xslt"))
    if ("Jobname" in p) == ("Interfacename" in p):
        raise BadRequest("give either Jobname= or Interfacename= (the next job of its queue)")
    site, user = who(request)
    name, body, media, filename = await off_loop(
        functools.partial(
            site.download, user, p.get("Jobname"), p.get("Interfacename"), p.get("xslt")
        )
    )
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "X-Jobname": name}
    return Response(body, media_type=media, headers=headers)


_XML_TYPES = ("text/xml", "application/xml")


async def upload(request: Request) -> Response:
    p = params(request, (), ("Interfacename", "RefName"))
    ref = p.get("RefName")
    if ref is not None and (not 0 < len(ref) <= 200 or not ref.isprintable()):
        raise BadRequest("RefName must be 1-200 printable characters")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media and media not in _XML_TYPES and not media.endswith("+xml"):
        raise BadRequest(f"Content-Type must be text/xml or application/xml, not {media}")
    site, user = who(request)
    limit = site.upload_limit(user, p.get("Interfacename"))
    body = Staging(site.spool.tmp, "upload")  # streamed to disk, never held in memory
    try:
        head = await read_body(request, limit, site.http.timeout, p.get("Interfacename"), body)
        if not body.size:
            raise BadRequest("the body is empty: send the job as the request body")
    except BaseException:
        body.discard()
        raise
    upload = functools.partial(site.upload, user, p.get("Interfacename"), body, head, ref)
    name = await off_loop(upload)
    return PlainTextResponse(
        name, status_code=201, headers={"Location": f"/xml/job?Jobname={name}"}
    )


HEAD = 1 << 16  # an upload's first bytes, kept to find its root element


async def read_body(
    request: Request,
    limit: int,
    deadline: float,
    interface: str | None,
    body: Staging | None = None,
) -> bytes:
    """At most ``limit`` bytes of body, all within ``deadline`` seconds (413, 408).

    Into ``body`` on disk, returning the first bytes (an upload's root element
    is in there); without one, all of it (a console form: small).
    """
    what = interface or "any interface granted to you"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(length) > limit:
            raise too_large(limit, what)
    head, size = bytearray(), 0
    try:
        with anyio.fail_after(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit, what)
                if body is None or len(head) < HEAD:
                    head += chunk if body is None else chunk[: HEAD - len(head)]
                if body is not None:
                    body.write(chunk)
    except TimeoutError:
        raise HttpError(408, f"the body did not arrive within {deadline:g} seconds",
                        {"Connection": "close"}) from None  # fmt: skip
    return bytes(head)


def _routes() -> list[Route]:
    download = Route("/xml/job", job, methods=["GET"])
    # Starlette adds HEAD to every GET; a HEAD must not be an _out job's first download.
    assert download.methods is not None
    download.methods.discard("HEAD")
    return [
        Route("/xml/jobqueue", jobqueue, methods=["GET"]),
        Route("/xml/joblog", joblog, methods=["GET"]),
        Route("/xml/jobstatus", jobstatus, methods=["GET"]),
        Route("/xml/queuestatus", queuestatus, methods=["GET"]),
        Route("/xml/upload", upload, methods=["POST"]),
        download,
    ]


class Front:
    """The ASGI application: https only, authentication, the methods, errors, access log."""

    def __init__(self, cfg: Config, extra: Sequence[BaseRoute] = ()) -> None:
        self.site = Site(cfg)
        # extra: the operator console's routes (jobspool.http.console), behind the same front.
        self.router = Router([*_routes(), *extra], redirect_slashes=False)
        self.log = logs.get()

    def reload(self, cfg: Config) -> None:
        """Serve ``cfg`` from the next request on (requests under way finish with the old)."""
        self.site = Site(cfg, self.site.auth)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan and websockets off
            return
        site, started, rid = self.site, time.perf_counter(), secrets.token_hex(4)
        seen: dict[str, Any] = {"status": 0, "bytes": 0, "user": None}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                ]
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            if scope.get("scheme") != "https":
                raise HttpError(403, "plain http is refused: use https")
            seen["user"] = await self.authenticate(site, scope, seen)
            scope["jobspool.site"], scope["jobspool.user"] = site, seen["user"]
            await self.router(scope, receive, sending)
        except Exception as exc:
            if seen["status"]:
                raise  # the answer is under way: nothing can be added to it
            if status_of(exc) == 500:
                self.log.error("request failed", id=rid, error=str(exc),
                               exc_info=not isinstance(exc, JobspoolError))  # fmt: skip
            await error_response(exc, site.cfg.spool, rid)(scope, receive, sending)
        finally:
            client = scope.get("client")
            self.log.info(
                "request",
                id=rid,
                user=seen["user"],
                client=client[0] if client else None,
                method=scope["method"],
                path=scope["path"],
                query=scope.get("query_string", b"").decode("latin-1"),
                status=seen["status"],
                bytes=seen["bytes"],
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                **({"tried": seen["tried"]} if "tried" in seen else {}),
            )

    async def authenticate(self, site: Site, scope: Scope, seen: dict[str, Any]) -> str:
        """The user of a request with good credentials; 401 otherwise (same for every failure)."""
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        creds = parse_basic(header.decode("latin-1")) if header is not None else None
        if creds is None:
            raise HttpError(401, "authentication required", {"WWW-Authenticate": REALM})
        user, password = creds
        ok = site.auth.cached(user, password)
        if ok is None:
            ok = await anyio.to_thread.run_sync(site.auth.check, user, password)
        if not ok:
            seen["tried"] = user
            raise HttpError(401, "wrong user name or password", {"WWW-Authenticate": REALM})
        return user
