"""What the daemon tests share: a spool of their own, the real daemon as a subprocess, drops.

A :class:`Site` is a configuration in a temporary directory, its schemas, its
handlers (tiny shell scripts or Python modules beside the configuration) and
its spool. :meth:`Site.start` runs ``jobspool -c CONFIG daemon`` exactly as
systemd would, with its stderr (JSON lines) captured into a file that every
failure message shows. The ``site`` fixture kills whatever daemon a test left
running, and checks that every XML log the test produced validates.

Everything is asserted the way a sysadmin would look: ``ls`` of the spool,
exit codes, the job logs. Waits poll the filesystem with a generous deadline;
nothing here measures speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from jobspool import joblog
from tests.kit import DEADLINE, JOBSPOOL, ORDER_XSD, run_jobspool, wait_for

# The daemon section that keeps tests quick (the defaults are for production).
FAST = {
    "settle": "0.3s",
    "rescan": "2s",
    "backoff_initial": "0.2s",
    "backoff_max": "1s",
    "grace": "5s",
}


def order(n: int | str = 1, sku: str = "HAM-1", qty: int = 3) -> bytes:
    """A valid order document (for the ``schemas/order.xsd`` above)."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<order id="{n}">\n'
        f"  <sku>{sku}</sku>\n  <qty>{qty}</qty>\n</order>\n"
    ).encode()


STATES = ("incoming", "queue", "bak", "joberrors")


# --- waiting ---------------------------------------------------------------------


# --- job logs --------------------------------------------------------------------


def valid_log(path: Path) -> bytes:
    """The log at ``path`` validates against joblog.xsd; return its bytes."""
    data = path.read_bytes()
    problems = joblog.validate(data)
    assert problems == [], f"{path} is not a valid job log: {problems}\n{data.decode()}"
    return data


def log_events(path: Path, kind: str | None = None) -> list[Any]:
    """The events of a (valid) log, oldest first; only those of ``kind`` if given."""
    root = etree.fromstring(valid_log(path))
    found = [e for e in root if isinstance(e.tag, str)]
    if kind is not None:
        found = [e for e in found if etree.QName(e).localname == kind]
    return found


def log_root(path: Path) -> Any:
    return etree.fromstring(valid_log(path))


def outputs(ran: Any) -> dict[str, Any]:
    """A ``ran`` event's captured output by stream (stdout, stderr)."""
    return {o.get("stream"): o for o in ran if etree.QName(o).localname == "output"}


def child(event: Any, kind: str) -> Any:
    for e in event:
        if etree.QName(e).localname == kind:
            return e
    return None


# --- a spool and its daemon ---------------------------------------------------------


class Daemon:
    """A ``jobspool daemon`` subprocess with its stderr in a file."""

    def __init__(self, site: Site, args: tuple[str, ...], user: int | None = None) -> None:
        self.site = site
        site.started += 1
        self.stderr_path = site.dir / f"daemon-{site.started}.stderr"
        argv = [str(JOBSPOOL), "-c", str(site.config), "daemon", *args]
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
        """Its log lines whose ``event`` is ``event`` and whose fields match."""
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
        wait_for(
            lambda: self.said("ready") or not self.running(),
            "the daemon to say ready",
            show=self.site.describe,
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
        self.daemons: list[Daemon] = []
        self.started = 0
        schemas = directory / "schemas"
        schemas.mkdir(exist_ok=True)
        (schemas / "order.xsd").write_text(ORDER_XSD)
        self.outside = directory / "outside"
        self.outside.mkdir(exist_ok=True)

    # --- configuration and handlers ---

    def configure(self, interfaces: dict[str, Any], **daemon: Any) -> None:
        """Write ``jobspool.yaml`` with these interfaces and the FAST daemon section."""
        data = {"spool": "spool", "interfaces": interfaces, "daemon": {**FAST, **daemon}}
        text = yaml.safe_dump(data, sort_keys=False)
        tmp = self.config.with_name(".jobspool.yaml.new")
        tmp.write_text(text)
        os.replace(tmp, self.config)

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
        env = dict(os.environ)
        env.pop("JOBSPOOL_CONFIG", None)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env["XDG_CACHE_HOME"] = str(self.dir / "xdg-cache")
        env["T"] = str(self.dir)  # handlers write their traces here
        return env

    # --- the command line ---

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``jobspool -c CONFIG ARGS...``"""
        return run_jobspool(self.config, *args, env=self.env(), cwd=self.dir, timeout=timeout)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
        return result.stdout

    def init(self) -> None:
        self.ok("init")

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
        for d in self.daemons:
            d.kill()

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

    def describe(self) -> str:
        """What a failing test shows: the spool's listing and every daemon's stderr."""
        parts = []
        if self.root.is_dir():
            listing = []
            for path in sorted(self.root.rglob("*")):
                if path.is_dir():
                    continue
                listing.append(str(path.relative_to(self.root)))
            shown = listing if len(listing) <= 60 else [*listing[:60], f"... {len(listing)} files"]
            parts.append("spool:\n  " + "\n  ".join(shown))
        for d in self.daemons:
            text = d.text()
            tail = text[-6000:]
            parts.append(f"daemon pid {d.pid} (exit {d.proc.poll()}) stderr:\n{tail}")
        return "\n".join(parts)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        return wait_for(condition, what, timeout, show=self.describe)

    def wait_in(self, name: str, place: str, timeout: float = DEADLINE) -> None:
        """Until job ``name`` is (only) in ``place`` (``bak/IFACE``, ``joberrors``, ...)."""
        self.wait_for(lambda: self.where(name) == [place], f"{name} in {place}", timeout)


@pytest.fixture(name="site")
def site_fixture(tmp_path: Path) -> Iterator[Site]:
    """A fresh site in tmp_path; leftover daemons are killed, every log is validated."""
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.kill_all()
    if s.root.is_dir():
        s.check_logs()
