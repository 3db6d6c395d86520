"""The configuration: one YAML file turned into immutable records (docs/spec.rst, "Configuration").

Discovery order: ``-c/--config``, ``$JOBSPOOL_CONFIG``, ``./jobspool.yaml``,
``/etc/jobspool/jobspool.yaml``. Paths inside the file are relative to the
file. Every problem is a :class:`ConfigError` naming the file, the key and
what is expected. This module never touches the spool and never imports lxml:
the read commands load it on their fast path.

That path is kept short: the records are NamedTuples (a frozen dataclass
costs six times as much to define at import), and the parsed YAML is cached
with ``marshal`` under ``${XDG_CACHE_HOME:-~/.cache}/jobspool/``, keyed on
the file's identity (device, inode, size, mtime, ctime), so a read command
need not import PyYAML at all. The cached data is validated like fresh data.
"""

from __future__ import annotations

import marshal
import os
import re
import shlex
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from jobspool import names
from jobspool.errors import BadRequest, ConfigError

DEFAULT_LOCATIONS = (Path("jobspool.yaml"), Path("/etc/jobspool/jobspool.yaml"))
DEFAULT_SPOOL = "/var/spool/jobspool"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_SIZE = 10_000_000

SCHEMA_SUFFIXES = (".xsd", ".rng")


class Interface(NamedTuple):
    """One interface: where its jobs come from, how they are checked and handled."""

    name: str
    schema: Path | None = None
    command: tuple[str, ...] | None = None
    handler: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_size: int = DEFAULT_MAX_SIZE
    concurrency: int = 1
    memory_limit: int | None = None
    cpu_limit: float | None = None
    root_elements: tuple[str, ...] = ()  # an upload naming no interface is matched by these
    xslt: Mapping[str, Path] = {}  # name -> stylesheet, for the HTTP download's xslt=NAME
    max_tries: int | None = None  # handler runs that said "try later" before joberrors
    max_age: float | None = None  # seconds since acceptance after which "try later" fails
    same_content: str | None = None  # "reject" or "flag" a job whose content came before
    same_within: float = 86400.0  # seconds a job's content hash is remembered

    @property
    def outbound(self) -> bool:
        """An ``_out`` interface has no handler: its jobs wait to be fetched."""
        return self.name.endswith("_out")

    @property
    def direction(self) -> str:
        return "out" if self.outbound else "in"


class Schedule(NamedTuple):
    """A scheduled handler: when it runs, what it runs, and who owns it (docs/spec.rst).

    ``timing`` is ``cron``, ``every`` or ``at`` with its text in ``when``;
    ``action`` is ``command`` (``target`` an argv tuple), ``handler``
    (``module:function``) or ``template`` (a built-in, with ``settings``).
    ``raw`` is the mapping it was read from, so that changes made with
    ``jobspool schedule set`` are checked exactly as strictly.
    """

    id: str
    name: str
    timing: str
    when: str
    action: str
    target: Any
    settings: Mapping[str, Any]
    enabled: bool
    owner: str | None
    timezone: str | None
    timeout: float
    catchup: str
    raw: Mapping[str, Any]


class DaemonSettings(NamedTuple):
    """How the daemon watches and works (the ``daemon:`` section)."""

    watch: str = "inotify"  # or "poll", for NFS and CIFS where inotify sees nothing
    rescan: float = 60.0  # full rescan of every folder, whatever the events said
    settle: float = 2.0  # a file written in place is taken this long after its last change
    grace: float = 30.0  # on SIGTERM, how long running handlers may take to finish
    backoff_initial: float = 1.0  # first wait after "try later", doubled each time
    backoff_max: float = 300.0
    output_limit: int = 65536  # bytes of a handler's stdout and stderr kept in the log
    metrics: Path | None = None  # Prometheus textfile for node_exporter
    metrics_interval: float = 15.0
    history: int = 50  # results kept per schedule
    schedule_concurrency: int = 8  # scheduled runs at once; more wait for a free run thread
    check_workers: int = 0  # processes that check drops off the main loop; 0: one per CPU, up to 4
    tree_limit: int = 64 << 20  # bytes: the largest document a RELAX NG schema is checked on
    durability: str | None = None  # "syncfs" or "fsync"; None: chosen by the spool's file system


DEFAULT_HTTP_PORT = 8443
# A user of the HTTP front: what an htpasswd file and a YAML key can both hold.
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}")


# Roles a grant list may hold besides interface names and "*" (docs/http.rst).
HTTP_ROLES = ("console",)


class HttpInterface(NamedTuple):
    """What the HTTP front does differently for one interface (``http.interfaces.IFACE``)."""

    move_on_listing: bool = False  # legacy: the first jobqueue listing moves _out jobs to bak
    joblog_output: bool = False  # partners see the handler's stdout, stderr and traceback
    extensions: Mapping[str, str] = {}  # xslt name -> file name extension of its download


class Http(NamedTuple):
    """The HTTPS front, ``jobspool serve`` (the ``http:`` section; docs/http.rst)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    cert: Path | None = None  # TLS certificate chain (PEM); without it, see --insecure-behind-proxy
    key: Path | None = None  # its private key (PEM)
    users: Path = Path("/etc/jobspool/htpasswd")  # bcrypt htpasswd file ('jobspool user ...')
    grants: Mapping[str, tuple[str, ...]] = {}  # user -> interfaces it may use ("*": all)
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks whose X-Forwarded-* count
    max_concurrency: int = 100  # open connections, idle keep-alive ones included
    timeout: float = 30.0  # to send a request's headers, and again to send its body
    keep_alive: float = 5.0  # an idle connection is closed after this long
    auth_cache: float = 300.0  # a verified password is trusted this long without bcrypt
    plain: tuple[str, int] | None = None  # plain_listen: answers every request 403 "use https"
    interfaces: Mapping[str, HttpInterface] = {}  # per-interface settings of the front

    def granted(self, user: str) -> tuple[str, ...]:
        """The interfaces ``user`` may use (``*`` is expanded by the caller; roles included)."""
        return self.grants.get(user, ())

    def has_role(self, user: str, role: str) -> bool:
        """Whether ``http.grants`` gives ``user`` the role ``role`` (such as ``console``)."""
        return role in self.grants.get(user, ())

    def interface(self, name: str) -> HttpInterface:
        """The front's settings for interface ``name`` (the defaults if it has none)."""
        return self.interfaces.get(name, _NO_HTTP_INTERFACE)


_NO_HTTP_INTERFACE = HttpInterface()


# What the daemon can tell about (docs/alerts.rst); "fault" in a route's events means both.
EVENTS = ("job-rejected", "job-failed", "schedule-failed", "queue-stuck", "job-blocking",
          "disk-low", "fault-start", "fault-end")  # fmt: skip
EVENT_GROUPS = {"fault": ("fault-start", "fault-end"), "all": EVENTS}


class CommandRoute(NamedTuple):
    """A program run for each notification: JSON on stdin, ``JOBSPOOL_*`` variables."""

    name: str
    events: frozenset[str]
    argv: tuple[str, ...]
    timeout: float = 30.0


class MailRoute(NamedTuple):
    """Mail through the local MTA (``sendmail -t``, as cron does) or SMTP with STARTTLS."""

    name: str
    events: frozenset[str]
    to: tuple[str, ...]
    sender: str | None = None  # From:; without it the MTA (or jobspool@HOST for SMTP) decides
    sendmail: tuple[str, ...] = ("/usr/sbin/sendmail", "-t", "-oi")
    smtp_host: str | None = None  # set: SMTP instead of sendmail
    smtp_port: int = 587
    credentials: Path | None = None  # "user" on the first line, "password" on the second
    ca: Path | None = None  # certificates to trust instead of the system's
    timeout: float = 30.0


class WebhookRoute(NamedTuple):
    """An HTTPS POST of the notification as JSON, retried with back-off."""

    name: str
    events: frozenset[str]
    url: str
    ca: Path | None = None
    timeout: float = 10.0
    retries: int = 3  # tries after the first, waiting 1 s, 2 s, 4 s, ...
    headers: Mapping[str, str] = {}


Route = CommandRoute | MailRoute | WebhookRoute


class Notify(NamedTuple):
    """Notifications (the ``notify:`` section; docs/alerts.rst)."""

    routes: Mapping[str, Route] = {}
    gather: float = 10.0  # after the first event, wait this long for others to join it
    interval: float = 300.0  # at least this long between two notifications of one route
    blocking_after: float = 1800.0  # a job blocking its interface this long is an event
    fault_quiet: float = 300.0  # a fault episode ends after this long without a fault
    queue: int = 10_000  # events waiting for the notifier; beyond, only counted


class Cluster(NamedTuple):
    """Several daemons on one shared spool (the ``cluster:`` section; docs/deployment.rst)."""

    node: str  # this daemon's name in the cluster, unique among its daemons
    lease: float = 30.0  # seconds an unrenewed lease lasts before another node takes over


class Config(NamedTuple):
    """The whole configuration, as read from :attr:`path`."""

    path: Path
    spool: Path
    interfaces: Mapping[str, Interface]
    schedules: Mapping[str, Schedule]
    daemon: DaemonSettings = DaemonSettings()
    http: Http | None = None  # None: no http: section, no 'jobspool serve'
    notify: Notify = Notify()  # no routes: no notifications
    cluster: Cluster | None = None  # None: one daemon serves the spool (the daemon lock)

    def interface(self, name: str) -> Interface:
        """The interface called ``name``; :class:`BadRequest` if there is none."""
        try:
            return self.interfaces[name]
        except KeyError:
            known = ", ".join(sorted(self.interfaces)) or "none configured"
            raise BadRequest(f"unknown interface {name!r} (known: {known})") from None


# --- discovery ---------------------------------------------------------------


def find(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The configuration file to use, in the documented discovery order."""
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get("JOBSPOOL_CONFIG"):
        candidates = [Path(os.environ["JOBSPOOL_CONFIG"])]
    else:
        candidates = list(DEFAULT_LOCATIONS)
    for path in candidates:
        if path.is_file():
            return path.absolute()
    if len(candidates) == 1:
        raise ConfigError(f"{candidates[0]}: no such configuration file")
    tried = ", ".join(str(p) for p in candidates)
    raise ConfigError(
        f"no configuration found (tried {tried}); pass -c FILE or set $JOBSPOOL_CONFIG"
    )


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, read and validate the configuration."""
    path = find(explicit)
    return _Reader(path).config(_read_yaml(path))


def parse(text: str, path: Path) -> Config:
    """Validate YAML ``text`` as if read from ``path`` into a :class:`Config`."""
    return _Reader(path).config(_parse_yaml(text, path))


def _read_yaml(path: Path) -> object:
    """The file's YAML data, from the cache when the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    key = (
        CACHE_VERSION,
        str(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    cache = _cache_file(path)
    try:
        with open(cache, "rb") as f:
            stored_key, data = marshal.load(f)
        if stored_key == key:
            return data
    except (OSError, ValueError, EOFError, TypeError):
        pass  # no cache, or a stale or damaged one: read the file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    data = _parse_yaml(text, path)
    _store(cache, key, data)
    return data


CACHE_VERSION = 2  # 2: files with a key given twice are refused


def _cache_file(path: Path) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # crc32 keeps the name short; the key inside holds the full path.
    return Path(base, "jobspool", f"config-{zlib.crc32(os.fsencode(path)):08x}.marshal")


def _store(cache: Path, key: tuple[int | str, ...], data: Any) -> None:
    """Best effort: a cache that cannot be written (no home, read-only) is skipped."""
    try:
        blob = marshal.dumps((key, data))
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, cache)
    except (OSError, ValueError):  # ValueError: data marshal cannot hold (a YAML date)
        pass


def _parse_yaml(text: str, path: Path) -> object:
    import yaml  # 15-25 ms: only when the cache misses

    try:
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f": line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    return data


def _strict_loader() -> Any:
    """PyYAML's safe loader (the C one where built), refusing a key given twice.

    YAML says keys are unique, PyYAML lets the last one win: two
    ``orders_in:`` would silently drop the first interface.
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Strict(base):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen: dict[object, int] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the constructor says so
                        continue
                    if first is not None:
                        problem = f"duplicate key {key!r} (first on line {first})"
                        mark = key_node.start_mark
                        raise yaml.constructor.ConstructorError(None, None, problem, mark)
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return Strict


# --- units -------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
# One number and its unit; a value is one or more of them (``1h 30min``, ``1h30m``).
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-zµ]*)\s*")
# systemd.time(7)'s units, case-sensitive as there: m is a minute, M a month.
_DURATION_UNITS = {
    "": 1,
    **dict.fromkeys(("us", "usec", "µs"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 0.001),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "week", "weeks"), 604800),
    **dict.fromkeys(("M", "month", "months"), 2_629_800),  # 30.44 days, as systemd counts
    **dict.fromkeys(("y", "year", "years"), 31_557_600),  # 365.25 days
}


def parse_size(value: object) -> int:
    """``10MB`` → 10_000_000, ``1MiB`` → 1_048_576, ``512`` → 512 bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError("a size like 512, 64KB, 10MB or 1GiB")
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """Seconds from a number, or text in systemd's time-span syntax (systemd.time(7)).

    ``300``, ``30s``, ``5m``, ``5min``, ``1h 30min``, ``1h30m``, ``2d``,
    ``500ms``, ``1.5h``: numbers each followed by a unit (none: seconds),
    summed. Case matters as in systemd: ``m`` is a minute, ``M`` a month.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    total = _duration_text(value) if isinstance(value, str) else None
    if total is None:
        raise ValueError("a duration like 300, 30s, 5min, 1h 30min or 2d")
    return total


def _duration_text(text: str) -> float | None:
    # Matched part by part from where the last one ended: one pattern with a
    # repeated group would backtrack exponentially on a long bad value.
    total, pos, parts = 0.0, 0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.group(2) not in _DURATION_UNITS:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos, parts = match.end(), parts + 1
    return total if parts else None


# --- validation --------------------------------------------------------------

T = TypeVar("T")

_INTERFACE_KEYS = {
    "schema", "command", "handler", "timeout", "max_size", "concurrency", "memory_limit",
    "cpu_limit", "root_elements", "xslt", "max_tries", "max_age", "same_content",
    "same_within",
}  # fmt: skip
_DAEMON_KEYS = set(DaemonSettings._fields)
_HTTP_KEYS = {
    "listen", "cert", "key", "users", "grants", "trusted_proxies", "max_concurrency", "timeout",
    "keep_alive", "auth_cache", "plain_listen", "interfaces",
}  # fmt: skip
_HTTP_INTERFACE_KEYS = set(HttpInterface._fields)
_NOTIFY_KEYS = {"routes", "gather", "interval", "blocking_after", "fault_quiet", "queue"}
_ROUTE_KINDS = ("command", "mail", "webhook")
_MAIL_KEYS = {"to", "from", "sendmail", "smtp", "credentials", "ca"}
_SCHEDULE_TIMINGS = ("cron", "every", "at")
_SCHEDULE_RUNS = ("command", "handler", "template")
_SCHEDULE_KEYS = {
    "name", "owner", "enabled", "timezone", "timeout", "catchup", "with",
    *_SCHEDULE_TIMINGS, *_SCHEDULE_RUNS,
}  # fmt: skip
_HANDLER_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class _Reader:
    """Walks the parsed YAML, converting values and naming the key on error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def fail(self, key: str, expected: str, got: object = ...) -> ConfigError:
        shown = "" if got is ... else f", got {_show(got)}"
        return ConfigError(f"{self.path}: {key}: expected {expected}{shown}")

    def mapping(self, value: object, key: str, allowed: set[str] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key or "the top level", "a mapping", value)
        for k in value:
            if not isinstance(k, str):
                raise self.fail(f"{key}.{k}", "a text key", k)
            if allowed is not None and k not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(f"{self.path}: {_join(key, k)}: unknown key (known: {known})")
        return value

    def convert(self, value: object, key: str, conv: Callable[[object], T]) -> T:
        try:
            return conv(value)
        except ValueError as exc:
            raise self.fail(key, str(exc), value) from None

    def relative(self, value: object, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a path", value)
        return (self.base / value).absolute()

    def config(self, data: object) -> Config:
        top = self.mapping(
            data, "", {"spool", "interfaces", "schedules", "daemon", "http", "notify", "cluster"}
        )
        spool = self.relative(top.get("spool", DEFAULT_SPOOL), "spool")
        raw_ifaces = self.mapping(top.get("interfaces"), "interfaces", None)
        if not raw_ifaces:
            raise self.fail("interfaces", "at least one interface")
        interfaces = {n: self.interface(n, v) for n, v in raw_ifaces.items()}
        raw_scheds = self.mapping(top.get("schedules"), "schedules", None)
        schedules = {i: self.schedule(i, v) for i, v in raw_scheds.items()}
        http = None if top.get("http") is None else self.http(top["http"], interfaces)
        daemon = self.daemon(top.get("daemon"))
        cluster = None if top.get("cluster") is None else self.cluster(top["cluster"])
        notify = self.notify(top.get("notify"))
        return Config(self.path, spool, interfaces, schedules, daemon, http, notify, cluster)

    def cluster(self, value: object) -> Cluster:
        raw = self.mapping(value, "cluster", set(Cluster._fields))
        node = raw.get("node")
        if not isinstance(node, str) or not names.is_valid(node):
            raise self.fail("cluster.node", "a node name that is a valid file name", node)
        default = Cluster._field_defaults["lease"]
        lease = self.convert(raw.get("lease", default), "cluster.lease", parse_duration)
        if lease < 3:
            raise self.fail("cluster.lease", "a duration of 3 seconds or more", raw.get("lease"))
        return Cluster(node, lease)

    def notify(self, value: object) -> Notify:
        """The ``notify:`` section: its routes and how events are gathered and spaced."""
        raw = self.mapping(value, "notify", _NOTIFY_KEYS)
        d = Notify()
        routes = {
            name: self.route(name, spec)
            for name, spec in self.mapping(raw.get("routes"), "notify.routes", None).items()
        }
        if raw and not routes:
            raise self.fail("notify.routes", "at least one route (command:, mail: or webhook:)")
        seconds = {
            k: self.convert(raw.get(k, getattr(d, k)), f"notify.{k}", parse_duration)
            for k in ("gather", "interval", "blocking_after", "fault_quiet")
        }
        return Notify(routes=routes, queue=self.count(raw.get("queue", d.queue), "notify.queue"),
                      **seconds)  # fmt: skip

    def route(self, name: str, value: object) -> Route:
        key = f"notify.routes.{name}"
        if not names.is_valid(name):
            raise self.fail(key, "a route name of A-Z a-z 0-9 . _ -: " + names.why_invalid(name))
        raw = self.mapping(value, key, {"events", "timeout", *_ROUTE_KINDS})
        kinds = [k for k in _ROUTE_KINDS if k in raw]
        if len(kinds) != 1:
            raise self.fail(key, "exactly one of command:, mail: or webhook:")
        events = self.events(raw.get("events", "all"), f"{key}.events")
        kind = kinds[0]
        timeout = None
        if "timeout" in raw:
            timeout = self.positive(raw["timeout"], f"{key}.timeout")
        if kind == "command":
            argv = self.command(raw["command"], f"{key}.command")
            route = CommandRoute(name, events, argv)
            return route._replace(timeout=timeout) if timeout else route
        if kind == "mail":
            return self.mail(name, events, raw["mail"], f"{key}.mail", timeout)
        return self.webhook(name, events, raw["webhook"], f"{key}.webhook", timeout)

    def events(self, value: object, key: str) -> frozenset[str]:
        items = [value] if isinstance(value, str) else value
        known = (*EVENTS, *EVENT_GROUPS)
        if not isinstance(items, list) or not items or not all(i in known for i in items):
            raise self.fail(key, f"all, or a list of {', '.join(known[:-1])}", value)
        return frozenset(e for i in items for e in EVENT_GROUPS.get(i, (i,)))

    def mail(
        self, name: str, events: frozenset[str], value: object, key: str, timeout: float | None
    ) -> MailRoute:
        spec = self.mapping(value, key, _MAIL_KEYS)
        to = spec.get("to")
        to = [to] if isinstance(to, str) else to
        if not isinstance(to, list) or not to or not all(_is_address(a) for a in to):
            raise self.fail(f"{key}.to", "a list of mail addresses like [ops@example.com]", to)
        sender = spec.get("from")
        if sender is not None and not _is_address(sender):
            raise self.fail(f"{key}.from", "a mail address like jobspool@example.com", sender)
        d = MailRoute(name, events, ())
        smtp = spec.get("smtp")
        host, port = None, d.smtp_port
        if smtp is not None:
            if "sendmail" in spec:
                raise self.fail(key, "either smtp: or sendmail:, not both")
            host, port = self.convert(smtp, f"{key}.smtp", _host_port)
        elif any(k in spec for k in ("credentials", "ca")):
            raise self.fail(key, "smtp: with credentials: and ca: (sendmail needs neither)")
        sendmail = d.sendmail
        if "sendmail" in spec:
            sendmail = self.command(spec["sendmail"], f"{key}.sendmail")
        return MailRoute(
            name=name,
            events=events,
            to=tuple(to),
            sender=sender,
            sendmail=sendmail,
            smtp_host=host,
            smtp_port=port,
            credentials=self.optional_file(spec.get("credentials"), f"{key}.credentials",
                                           "an existing file: the user, then the password, "
                                           "one per line"),
            ca=self.optional_file(spec.get("ca"), f"{key}.ca", "an existing CA file (PEM)"),
            timeout=timeout or d.timeout,
        )  # fmt: skip

    def webhook(
        self, name: str, events: frozenset[str], value: object, key: str, timeout: float | None
    ) -> WebhookRoute:
        spec = self.mapping(value, key, {"url", "ca", "retries", "headers"})
        url = spec.get("url")
        if not isinstance(url, str) or not re.fullmatch(r"https://[^\s/?#]+[^\s]*", url):
            raise self.fail(f"{key}.url", "an https:// URL", url)
        headers = self.mapping(spec.get("headers"), f"{key}.headers", None)
        for h, v in headers.items():
            if not re.fullmatch(r"[A-Za-z0-9-]+", h) or not isinstance(v, str) or "\n" in v:
                raise self.fail(f"{key}.headers.{h}", "a header name and a one-line text", v)
        d = WebhookRoute(name, events, url)
        retries = spec.get("retries", d.retries)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise self.fail(f"{key}.retries", "a whole number from 0 to 10", retries)
        return WebhookRoute(
            name=name,
            events=events,
            url=url,
            ca=self.optional_file(spec.get("ca"), f"{key}.ca", "an existing CA file (PEM)"),
            timeout=timeout or d.timeout,
            retries=retries,
            headers=dict(headers),
        )

    def optional_file(self, value: object, key: str, what: str) -> Path | None:
        return None if value is None else self.existing(value, key, what)

    def daemon(self, value: object) -> DaemonSettings:
        raw = self.mapping(value, "daemon", _DAEMON_KEYS)
        d = DaemonSettings()
        watch = raw.get("watch", d.watch)
        if watch not in ("inotify", "poll"):
            raise self.fail("daemon.watch", "inotify or poll", watch)
        seconds = {
            k: self.convert(raw.get(k, getattr(d, k)), f"daemon.{k}", parse_duration)
            for k in ("rescan", "settle", "grace", "backoff_initial", "backoff_max",
                      "metrics_interval")
        }  # fmt: skip
        for k in ("rescan", "backoff_initial", "metrics_interval"):
            if seconds[k] <= 0:
                raise self.fail(f"daemon.{k}", "a duration above zero", raw.get(k))
        metrics = raw.get("metrics")
        durability = raw.get("durability")
        if durability not in (None, "syncfs", "fsync"):
            raise self.fail("daemon.durability", "syncfs or fsync", durability)
        return DaemonSettings(
            watch=watch,
            durability=durability,
            history=self.count(raw.get("history", d.history), "daemon.history"),
            schedule_concurrency=self.count(
                raw.get("schedule_concurrency", d.schedule_concurrency),
                "daemon.schedule_concurrency",
            ),
            output_limit=self.convert(
                raw.get("output_limit", d.output_limit), "daemon.output_limit", parse_size
            ),
            check_workers=self.convert(
                raw.get("check_workers", d.check_workers), "daemon.check_workers", _workers
            ),
            tree_limit=self.convert(
                raw.get("tree_limit", d.tree_limit), "daemon.tree_limit", parse_size
            ),
            metrics=None if metrics is None else self.relative(metrics, "daemon.metrics"),
            **seconds,
        )

    def interface(self, name: str, value: object) -> Interface:
        key = f"interfaces.{name}"
        if not names.is_valid(name):
            raise self.fail(key, "an interface name that is a valid directory name: "
                            + names.why_invalid(name))  # fmt: skip
        raw = self.mapping(value, key, _INTERFACE_KEYS)
        schema = None
        if raw.get("schema") is not None:
            schema = self.relative(raw["schema"], f"{key}.schema")
            if schema.suffix not in SCHEMA_SUFFIXES:
                raise self.fail(
                    f"{key}.schema", "an XSD (.xsd) or RELAX NG (.rng) file", str(schema)
                )
            if not schema.is_file():
                raise self.fail(f"{key}.schema", "an existing schema file", str(schema))
        command = self.command(raw["command"], f"{key}.command") if "command" in raw else None
        handler = self.handler(raw["handler"], f"{key}.handler") if "handler" in raw else None
        outbound = name.endswith("_out")
        if outbound and (command or handler):
            raise self.fail(
                key, "no command or handler: an _out interface's jobs wait to be fetched"
            )
        if not outbound and (command is None) == (handler is None):
            raise self.fail(key, "exactly one of command: or handler: (or a name ending in _out)")
        return Interface(
            name=name,
            schema=schema,
            command=command,
            handler=handler,
            timeout=self.positive(raw.get("timeout", DEFAULT_TIMEOUT), f"{key}.timeout"),
            max_size=self.convert(
                raw.get("max_size", DEFAULT_MAX_SIZE), f"{key}.max_size", parse_size
            ),
            concurrency=self.count(raw.get("concurrency", 1), f"{key}.concurrency"),
            memory_limit=None
            if raw.get("memory_limit") is None
            else self.convert(raw["memory_limit"], f"{key}.memory_limit", parse_size),
            cpu_limit=None
            if raw.get("cpu_limit") is None
            else self.positive(raw["cpu_limit"], f"{key}.cpu_limit"),
            root_elements=self.strings(raw.get("root_elements", []), f"{key}.root_elements"),
            xslt=self.stylesheets(raw.get("xslt"), f"{key}.xslt"),
            max_tries=None
            if raw.get("max_tries") is None
            else self.count(raw["max_tries"], f"{key}.max_tries"),
            max_age=None
            if raw.get("max_age") is None
            else self.positive(raw["max_age"], f"{key}.max_age"),
            same_content=self.same_content(raw.get("same_content"), f"{key}.same_content"),
            same_within=self.positive(raw.get("same_within", 86400.0), f"{key}.same_within"),
        )

    def same_content(self, value: object, key: str) -> str | None:
        if value is None or value in ("reject", "flag"):
            return None if value is None else str(value)
        raise self.fail(key, "reject or flag", value)

    def stylesheets(self, value: object, key: str) -> dict[str, Path]:
        out = {}
        for name, path in self.mapping(value, key, None).items():
            if not names.is_valid(name):
                raise self.fail(f"{key}.{name}", "a name of A-Z a-z 0-9 . _ -: "
                                + names.why_invalid(name))  # fmt: skip
            out[name] = self.existing(path, f"{key}.{name}", "an existing XSLT stylesheet")
        return out

    def existing(self, value: object, key: str, what: str) -> Path:
        path = self.relative(value, key)
        if not path.is_file():
            raise self.fail(key, what, str(path))
        return path

    def http(self, value: object, interfaces: Mapping[str, Interface]) -> Http:
        """The ``http:`` section; cert and key must exist, grants name known interfaces."""
        raw = self.mapping(value, "http", _HTTP_KEYS)
        d = Http()
        host, port = self.convert(raw.get("listen", f"{d.host}:{d.port}"), "http.listen",
                                  parse_listen)  # fmt: skip
        cert = key = None
        if raw.get("cert") is not None:
            cert = self.existing(raw["cert"], "http.cert", "an existing certificate file (PEM)")
        if raw.get("key") is not None:
            key = self.existing(raw["key"], "http.key", "an existing private key file (PEM)")
        if (cert is None) != (key is None):
            raise self.fail("http", "both cert: and key: (or neither, behind a TLS proxy)")
        grants = {}
        for user, granted in self.mapping(raw.get("grants"), "http.grants", None).items():
            gkey = f"http.grants.{user}"
            if not USER_NAME.fullmatch(user):
                raise self.fail(gkey, "a user name of A-Z a-z 0-9 . _ @ + - (up to 100)")
            if not isinstance(granted, list) or not all(isinstance(i, str) for i in granted):
                raise self.fail(gkey, "a list of interface names (or ['*'] for all)", granted)
            for iface in granted:
                if iface in HTTP_ROLES and iface in interfaces:
                    raise self.fail(gkey, f"{iface!r} to name either the role or the interface; "
                                    f"rename interface {iface} to grant it")  # fmt: skip
                if iface != "*" and iface not in interfaces and iface not in HTTP_ROLES:
                    known = ", ".join(sorted(interfaces))
                    roles = ", ".join(HTTP_ROLES)
                    raise self.fail(
                        gkey,
                        f"configured interfaces (known: {known}), '*' or roles ({roles})",
                        iface,
                    )
            grants[user] = tuple(granted)
        proxies = raw.get("trusted_proxies", [])
        if not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies):
            raise self.fail("http.trusted_proxies", "a list of addresses like [127.0.0.1]",
                            proxies)  # fmt: skip
        for proxy in proxies:
            self.convert(proxy, "http.trusted_proxies", _ip_or_network)
        plain = None
        if raw.get("plain_listen") is not None:
            plain = self.convert(raw["plain_listen"], "http.plain_listen", parse_listen)
            if cert is None:
                raise self.fail("http.plain_listen", "cert: and key: too (it points to https)")
            if plain == (host, port):
                raise self.fail("http.plain_listen", "another address than http.listen", plain)
        return Http(
            host=host,
            port=port,
            cert=cert,
            key=key,
            users=self.relative(raw.get("users", "htpasswd"), "http.users"),
            grants=grants,
            trusted_proxies=tuple(proxies),
            max_concurrency=self.count(
                raw.get("max_concurrency", d.max_concurrency), "http.max_concurrency"
            ),
            timeout=self.positive(raw.get("timeout", d.timeout), "http.timeout"),
            keep_alive=self.positive(raw.get("keep_alive", d.keep_alive), "http.keep_alive"),
            auth_cache=self.convert(
                raw.get("auth_cache", d.auth_cache), "http.auth_cache", parse_duration
            ),
            plain=plain,
            interfaces=self.http_interfaces(raw.get("interfaces"), interfaces),
        )

    def http_interfaces(
        self, value: object, interfaces: Mapping[str, Interface]
    ) -> dict[str, HttpInterface]:
        """``http.interfaces``: per configured interface, what the front does differently."""
        out = {}
        for name, settings in self.mapping(value, "http.interfaces", None).items():
            key = f"http.interfaces.{name}"
            if name not in interfaces:
                raise self.fail(key, f"a configured interface (known: {', '.join(interfaces)})")
            raw = self.mapping(settings, key, _HTTP_INTERFACE_KEYS)
            for flag in ("move_on_listing", "joblog_output"):
                if not isinstance(raw.get(flag, False), bool):
                    raise self.fail(f"{key}.{flag}", "true or false", raw[flag])
            if raw.get("move_on_listing") and not interfaces[name].outbound:
                raise self.fail(f"{key}.move_on_listing", "an _out interface (its jobs are "
                                "fetched; other interfaces' jobs are handled)")  # fmt: skip
            extensions = {}
            for sheet, ext in self.mapping(
                raw.get("extensions"), f"{key}.extensions", None
            ).items():
                if sheet not in interfaces[name].xslt:
                    known = ", ".join(interfaces[name].xslt) or "none"
                    raise self.fail(f"{key}.extensions.{sheet}", f"a stylesheet of {name}'s "
                                    f"xslt: (known: {known})")  # fmt: skip
                if not isinstance(ext, str) or not re.fullmatch(r"[A-Za-z0-9]{1,10}", ext):
                    raise self.fail(f"{key}.extensions.{sheet}", "an extension like csv", ext)
                extensions[sheet] = ext
            out[name] = HttpInterface(
                move_on_listing=raw.get("move_on_listing", False),
                joblog_output=raw.get("joblog_output", False),
                extensions=extensions,
            )
        return out

    def strings(self, value: object, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "a list of element names like [order, '{urn:x}order']", value)
        return tuple(value)

    def count(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, "a whole number of at least 1", value)
        return value

    def positive(self, value: object, key: str) -> float:
        seconds = self.convert(value, key, parse_duration)
        if seconds <= 0:
            raise self.fail(key, "a duration above zero", value)
        return seconds

    def command(self, value: object, key: str) -> tuple[str, ...]:
        if isinstance(value, str):
            argv = shlex.split(value)
        elif isinstance(value, list) and all(isinstance(a, str) for a in value):
            argv = list(value)
        else:
            raise self.fail(key, "a list of strings like [/usr/local/bin/import, --flag]", value)
        if not argv or not argv[0]:
            raise self.fail(key, "a program to run", value)
        if "/" in argv[0]:  # a path, relative to the configuration file; bare names use $PATH
            argv[0] = str(self.base / argv[0])
        return tuple(argv)

    def handler(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not _HANDLER_REF.fullmatch(value):
            raise self.fail(key, "a Python callable as module:function", value)
        return value

    def schedule(self, sid: str, value: object) -> Schedule:
        key = f"schedules.{sid}"
        if not names.is_valid(sid):
            raise self.fail(key, "a schedule id of A-Z a-z 0-9 . _ -: " + names.why_invalid(sid))
        raw = self.mapping(value, key, _SCHEDULE_KEYS)
        timings = [k for k in _SCHEDULE_TIMINGS if k in raw]
        actions = [k for k in _SCHEDULE_RUNS if k in raw]
        if len(timings) != 1:
            raise self.fail(key, "exactly one of cron:, every: or at:")
        if len(actions) != 1:
            raise self.fail(key, "exactly one of command:, handler: or template:")
        timing, action = timings[0], actions[0]
        when = raw[timing]
        if timing == "at" and hasattr(when, "isoformat"):  # YAML read a timestamp
            when = when.isoformat(sep=" ")
        if not isinstance(when, str) or not when.strip():
            raise self.fail(f"{key}.{timing}", _TIMING_HELP[timing], when)
        if timing == "every":
            self.convert(when, f"{key}.every", parse_every)
        target: Any = raw[action]
        if action == "command":
            target = self.command(target, f"{key}.command")
        elif action == "handler":
            target = self.handler(target, f"{key}.handler")
        elif not isinstance(target, str) or not names.is_valid(target):
            raise self.fail(f"{key}.template", "the name of a built-in template", target)
        settings = self.mapping(raw.get("with"), f"{key}.with", None)
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise self.fail(f"{key}.enabled", "true or false", enabled)
        catchup = raw.get("catchup", "once")
        if catchup not in ("once", "skip"):
            raise self.fail(f"{key}.catchup", "once or skip", catchup)
        for opt in ("name", "owner", "timezone"):
            if opt in raw and not isinstance(raw[opt], str):
                raise self.fail(f"{key}.{opt}", "text", raw[opt])
        return Schedule(
            id=sid,
            name=raw.get("name", sid),
            timing=timing,
            when=when.strip(),
            action=action,
            target=target,
            settings=settings,
            enabled=enabled,
            owner=raw.get("owner"),
            timezone=raw.get("timezone"),
            timeout=self.positive(raw.get("timeout", DEFAULT_TIMEOUT), f"{key}.timeout"),
            catchup=catchup,
            raw=raw,
        )


def read_schedule(path: Path, sid: str, raw: Mapping[str, Any]) -> Schedule:
    """Check one schedule's mapping as strictly as the configuration file would."""
    return _Reader(path).schedule(sid, dict(raw))


_TIMING_HELP = {
    "cron": "a cron expression like '0 3 * * *' (five fields, optional seconds last)",
    "every": "an interval as h:m:s like '1:00:00'",
    "at": "a date and time like '2026-12-24 18:00'",
}


def _workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ValueError("a whole number from 0 (one per CPU) to 64")
    return value


def parse_every(value: object) -> float:
    """``every:`` as ``h:m:s`` (``0:0:30``, ``1:00:00``, ``24:00:00``) → seconds."""
    parts = value.split(":") if isinstance(value, str) else []
    try:
        h, m, s = (float(p) for p in parts)
    except ValueError:
        h = m = s = -1.0
    total = h * 3600 + m * 60 + s
    if len(parts) != 3 or min(h, m, s) < 0 or total <= 0:
        raise ValueError(_TIMING_HELP["every"])
    return total


def parse_listen(value: object) -> tuple[str, int]:
    """``host:port``, ``[v6addr]:port`` or a bare port (on 127.0.0.1) → (host, port)."""
    help_ = "host:port like 0.0.0.0:8443, [::]:8443 or 127.0.0.1:8443"
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str):
        host, sep, port_text = value.strip().rpartition(":")
        if not sep:
            raise ValueError(help_)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(help_ + " (an IPv6 address goes in brackets)")
    else:
        raise ValueError(help_)
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(help_)
    return host, int(port_text)


def _is_address(value: object) -> bool:
    """A plain mail address (no display name, nothing that could add a header line)."""
    return isinstance(value, str) and bool(re.fullmatch(r"[^\s@<>,;\"]+@[^\s@<>,;\"]+", value))


def _host_port(value: object) -> tuple[str, int]:
    """``host:port`` or ``host`` (port 587, submission with STARTTLS)."""
    if isinstance(value, str) and ":" not in value.strip() and value.strip():
        return value.strip(), 587
    try:
        return parse_listen(value)
    except ValueError:
        raise ValueError("host:port like mail.example.com:587") from None


def _ip_or_network(value: object) -> str:
    import ipaddress  # 1 ms: only when the configuration names proxies

    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError("IP addresses or networks like 127.0.0.1, ::1 or 10.0.0.0/8") from None
    return str(value)


def _join(key: str, sub: str) -> str:
    return f"{key}.{sub}" if key else sub


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    # The end of a long value (a path's file name) says more than its middle.
    return text if len(text) <= 80 else text[:30] + "..." + text[-47:]


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)
