"""A site: a configuration in a directory, its schemas and handlers, its spool, its daemons.

A :class:`Site` under ``dir`` has its configuration in ``dir/jobspool.yaml``,
the order schema in ``dir/schemas/order.xsd``, partner files in
``dir/outside`` and its spool in ``dir/spool``. :meth:`Site.run` runs the real
``jobspool -c CONFIG ...`` (through :func:`tests.kit.process.run`) with the
site's environment: its own configuration cache in ``dir/xdg-cache`` and
``$T`` naming ``dir``, where handlers write their traces.

:meth:`Site.start` runs ``jobspool -c CONFIG daemon`` exactly as systemd
would, as a :class:`Daemon` whose stderr (JSON lines) goes to a file that
every failure message shows (:meth:`Site.describe`).

Everything is asserted the way a sysadmin would look: ``ls`` of the spool,
exit codes, the job logs, the schedules' results. Waits poll the filesystem
with a generous deadline; nothing here measures speed.

Where the kits this replaces disagreed, the values kept are these:

- :data:`FAST` is the daemon section with the quick back-off
  (``backoff_initial`` 0.2 s, ``backoff_max`` 1 s) for every site; the
  schedule tests had run with the defaults (1 s, 300 s), which none of them
  reaches (their interfaces run ``/bin/true`` and never say "try later").
- :meth:`Daemon.said` returns the matching log lines (a list, true when
  non-empty); the schedule kit's returned a bool.
- :meth:`Site.submit` is ``submit(name, data, iface)`` and returns the
  finished command; the schedule kit's took ``(iface, name, data)`` and
  returned its exit status.
- ``DEADLINE`` is 20 s everywhere (every kit had 20).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jobspool import config
from jobspool.schedules import Store
from tests.kit.documents import CONFIG, ORDER_XSD, STOCK_RNG, VALID, order
from tests.kit.logs import valid_log
from tests.kit.process import COMMAND, DEADLINE, assert_fails, assert_ok, clean_environ, run
from tests.kit.process import wait_for as _wait_for
from tests.kit.results import Run, runs_in

# The daemon section that keeps tests quick (the defaults are for production).
FAST = {
    "settle": "0.3s",
    "rescan": "2s",
    "backoff_initial": "0.2s",
    "backoff_max": "1s",
    "grace": "5s",
}

STATES = ("incoming", "queue", "bak", "joberrors")
NOBODY = 65534  # the uid and gid of nobody


def plain(*names: str) -> dict[str, dict[str, Any]]:
    """Interfaces without a schema whose handler is ``/bin/true`` (``orders_in`` by default)."""
    return {name: {"command": ["/bin/true"]} for name in names or ("orders_in",)}


def snapshot(root: Path) -> dict[str, object]:
    """Every directory and file under ``root``, with each file's content and mtime.

    Lock files count by name and content only: the mtime of ``names.lock`` is
    the acceptance stamps' high-water mark, which a refused request may advance.
    """
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel] = "dir"
        elif path.suffix == ".lock":
            out[rel] = (path.read_bytes(), "lock")
        else:
            out[rel] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


class Daemon:
    """A ``jobspool daemon`` subprocess with its stderr in a file."""

    def __init__(self, site: Site, args: tuple[str, ...] = (), user: int | None = None) -> None:
        self.site = site
        site.started += 1
        self.stderr_path = site.dir / f"daemon-{site.started}.stderr"
        argv = site.command("daemon", *args)
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=site.env(),
                cwd=site.dir,
            )
        self.pid = self.proc.pid
        site.daemons.append(self)

    # --- what it said ---

    def text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[dict[str, Any]]:
        """Its stderr as JSON objects (a line that is not JSON becomes {"raw": line})."""
        out = []
        for line in self.text().splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            out.append(value if isinstance(value, dict) else {"raw": line})
        return out

    def said(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Its log lines whose ``event`` is ``event`` and whose fields match (true if any)."""
        return [
            line
            for line in self.lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    # --- its life ---

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> Daemon:
        """Until it says ``ready`` (it has taken the lock, rescanned and started its lanes)."""
        self.site.wait_for(
            lambda: self.said("ready") or not self.running(), "the daemon to say ready"
        )
        assert self.running(), f"the daemon exited {self.proc.returncode}\n{self.site.describe()}"
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the daemon did not exit within {timeout:g}s\n{self.site.describe()}"
            ) from None

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; return its exit code."""
        if self.running():
            self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, or the end of a test."""
        if self.running():
            # With setpriv the daemon *is* the child (setpriv execs), so one kill is enough.
            self.proc.kill()
        self.proc.wait()


class Site:
    """A configuration, its schemas and handlers under ``dir``, and its spool ``dir/spool``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config = directory / "jobspool.yaml"
        self.root = directory / "spool"
        self.outside = directory / "outside"  # where partner files wait to be submitted
        self.daemons: list[Daemon] = []
        self.started = 0
        self.pids: list[Path] = []  # pid files of processes a test made, killed at the end
        schemas = directory / "schemas"
        schemas.mkdir(exist_ok=True)
        (schemas / "order.xsd").write_text(ORDER_XSD)
        self.outside.mkdir(exist_ok=True)

    # --- configuration and handlers ---

    def configure(
        self,
        interfaces: Mapping[str, Any] | None = None,
        *,
        schedules: Mapping[str, Any] | None = None,
        **daemon: Any,
    ) -> None:
        """Write ``jobspool.yaml``: interfaces (:func:`plain` by default), schedules if any,
        and the :data:`FAST` daemon section with ``daemon`` on top."""
        data: dict[str, Any] = {
            "spool": "spool",
            "interfaces": dict(plain() if interfaces is None else interfaces),
            "daemon": {**FAST, **daemon},
        }
        if schedules is not None:
            data["schedules"] = dict(schedules)
        tmp = self.config.with_name(".jobspool.yaml.new")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, self.config)  # a daemon reloading it never reads half a file

    def script(self, name: str, body: str) -> str:
        """A shell handler ``dir/NAME`` (made executable); returns its path."""
        path = self.dir / name
        path.write_text("#!/bin/sh\n" + body.strip("\n") + "\n")
        path.chmod(0o755)
        return str(path)

    def module(self, name: str, source: str) -> None:
        """A Python module beside the configuration (the daemon puts that dir on sys.path)."""
        (self.dir / f"{name}.py").write_text(source)

    def env(self) -> dict[str, str]:
        """The environment of the site's commands and daemons."""
        env = clean_environ()
        env["XDG_CACHE_HOME"] = str(self.dir / "xdg-cache")
        env["T"] = str(self.dir)  # handlers write their traces here
        return env

    def store(self) -> Store:
        """The schedules of this configuration, on an initialised spool (for in-process tests)."""
        store = Store(config.load(self.config))
        store.spool.init()
        return store

    # --- the command line ---

    def command(self, *args: str) -> list[str]:
        """The argv of ``jobspool -c CONFIG ARGS...``, for a test that starts it itself."""
        return [*COMMAND, "-c", str(self.config), *args]

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """``jobspool -c CONFIG ARGS...`` in ``dir``; ``env`` adds to :meth:`env`."""
        return run(
            "-c",
            str(self.config),
            *args,
            env={**self.env(), **(env or {})},
            cwd=self.dir if cwd is None else cwd,
            **kwargs,
        )

    def ok(self, *args: str) -> str:
        """Run a command that must exit 0; return its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
        return result.stdout

    def fails(self, code: int, *args: str) -> str:
        """Run a command that must exit ``code`` with one ``jobspool:`` line; return it."""
        return assert_fails(self.run(*args), code)

    def init(self) -> None:
        self.ok("init")

    def file(self, name: str, data: bytes = VALID) -> Path:
        """A partner's file outside the spool, ready to submit."""
        path = self.outside / name
        path.write_bytes(data)
        return path

    def submit(
        self, name: str, data: bytes = VALID, iface: str = "orders_in"
    ) -> subprocess.CompletedProcess[str]:
        """``jobspool submit IFACE FILE`` of a partner's file ``name``."""
        return self.run("submit", iface, str(self.file(name, data)))

    def queue(self, iface: str = "orders_in") -> list[str]:
        """``jobspool queue IFACE``, as a list of names."""
        return assert_ok(self.run("queue", iface)).splitlines()

    def status(self, name: str) -> str:
        """``jobspool status NAME``, without its newline."""
        return assert_ok(self.run("status", name)).rstrip("\n")

    # --- the daemon ---

    def start(self, *args: str, user: int | None = None, ready: bool = True) -> Daemon:
        """Start ``jobspool daemon ARGS``; by default wait until it says it is ready."""
        d = Daemon(self, args, user)
        if ready:
            d.wait_ready()
        return d

    def once(self, timeout: float = 60) -> Daemon:
        """``jobspool daemon --once``: run until nothing is left to do; it must exit 0."""
        d = Daemon(self, ("--once",))
        code = d.wait(timeout)
        assert code == 0, f"daemon --once exited {code}\n{self.describe()}"
        return d

    def kill_all(self) -> None:
        """Kill every daemon the site started, and every process named in :attr:`pids`."""
        for d in self.daemons:
            d.kill()
        for pid_file in self.pids:  # processes a schedule started and a daemon left behind
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)

    # --- dropping files ---

    def drop(self, iface: str, name: str, data: bytes | None = None) -> Path:
        """A careful upload: write ``.NAME`` in the drop folder, then rename it to ``NAME``."""
        folder = self.root / "incoming" / iface
        hidden = folder / f".{name[:200]}.upload"
        hidden.write_bytes(order(name) if data is None else data)
        final = folder / name
        os.rename(hidden, final)
        return final

    # --- looking at the spool ---

    def tree(self) -> dict[str, object]:
        """:func:`snapshot` of the spool."""
        return snapshot(self.root)

    def dir_of(self, state: str, iface: str | None = None) -> Path:
        return (
            self.root / state
            if state == "joberrors" or iface is None
            else self.root / state / iface
        )

    def ls(self, state: str, iface: str | None = None) -> list[str]:
        """Job files in a state directory (no logs, no hidden files), sorted by name."""
        try:
            entries = os.listdir(self.dir_of(state, iface))
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if not n.endswith(",log.xml") and not n.startswith("."))

    def places(self) -> dict[str, list[str]]:
        """Every job name in the spool -> the places it is in (``bak/orders_in``, ...)."""
        out: dict[str, list[str]] = {}
        for state in STATES:
            if state == "joberrors":
                folders = [(state, self.root / state)]
            else:
                base = self.root / state
                subdirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
                folders = [(f"{state}/{p.name}", p) for p in subdirs]
            for label, folder in folders:
                for name in os.listdir(folder):
                    if not name.endswith(",log.xml") and not name.startswith("."):
                        out.setdefault(name, []).append(label)
        return out

    def where(self, name: str) -> list[str]:
        return self.places().get(name, [])

    def log(self, name: str, iface: str | None = None) -> Path:
        """The log beside a job in bak/IFACE (or joberrors when ``iface`` is None)."""
        return self.dir_of("bak" if iface else "joberrors", iface) / f"{name},log.xml"

    def check_logs(self) -> int:
        """Every log in bak/*/ and joberrors/ validates; return how many there are."""
        n = 0
        for folder in [self.root / "joberrors", *sorted((self.root / "bak").glob("*"))]:
            if folder.is_dir():
                for log in sorted(folder.glob("*,log.xml")):
                    valid_log(log)
                    n += 1
        return n

    def runs(self, sid: str) -> list[Run]:
        """Every result of schedule ``sid``, oldest first."""
        return runs_in(self.root, sid)

    def describe(self) -> str:
        """What a failing test shows: the spool's listing, the schedules' results, and
        every daemon's stderr."""
        parts = []
        if self.root.is_dir():
            listing = []
            for path in sorted(self.root.rglob("*")):
                if path.is_dir():
                    continue
                listing.append(str(path.relative_to(self.root)))
            shown = listing if len(listing) <= 60 else [*listing[:60], f"... {len(listing)} files"]
            parts.append("spool:\n  " + "\n  ".join(shown))
        folder = self.root / "state" / "schedules"
        if folder.is_dir():
            for sid in sorted(os.listdir(folder)):
                results = "\n    ".join(repr(r) for r in runs_in(self.root, sid)) or "-"
                parts.append(f"results of {sid}:\n    {results}")
        for d in self.daemons:
            tail = d.text()[-6000:]
            parts.append(f"daemon pid {d.pid} (exit {d.proc.poll()}) stderr:\n{tail}")
        return "\n".join(parts)

    # --- waiting ---

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        """:func:`tests.kit.process.wait_for`, showing :meth:`describe` when it gives up."""
        return _wait_for(condition, what, timeout, show=self.describe)

    def wait_in(self, name: str, place: str, timeout: float = DEADLINE) -> None:
        """Until job ``name`` is (only) in ``place`` (``bak/IFACE``, ``joberrors``, ...)."""
        self.wait_for(lambda: self.where(name) == [place], f"{name} in {place}", timeout)

    def wait_runs(
        self, sid: str, count: int, which: Callable[[Run], bool] = lambda r: True
    ) -> list[Run]:
        """Until ``sid`` has at least ``count`` results that ``which`` accepts; return them."""

        def enough() -> list[Run] | None:
            found = [r for r in self.runs(sid) if which(r)]
            return found if len(found) >= count else None

        result: list[Run] = self.wait_for(enough, f"{count} result(s) of {sid}")
        return result


def make_site(directory: Path) -> Site:
    """The standard configuration (:data:`CONFIG`: three interfaces) and its schemas in
    ``directory``; no spool yet."""
    site = Site(directory)
    (directory / "schemas" / "stock.rng").write_text(STOCK_RNG)
    site.config.write_text(CONFIG)
    return site
