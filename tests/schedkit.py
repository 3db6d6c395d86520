"""What the schedule tests share: schedules, a site with the real daemon, run results.

A :class:`Site` is a configuration with one interface and some ``schedules:``
in a temporary directory, its spool beside it. :meth:`Site.start` runs
``jobspool -c CONFIG daemon`` as a subprocess, exactly as systemd would, its
stderr (JSON lines) kept in a file that every failure message shows;
:meth:`Site.run` runs the real ``jobspool`` command. :func:`site_in` kills
every daemon a test started, whatever happened.

Results are read the way a sysadmin would: the XML files in
``state/schedules/ID/runs/``, each checked against ``result.xsd`` before a
test looks at it (:func:`read_run`). Waits poll the filesystem with a
generous deadline; nothing here measures speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from lxml import etree

from jobspool import config, schedules
from jobspool.config import Schedule
from jobspool.scheduler import Scheduler
from jobspool.schedules import Store
from tests.kit import DEADLINE, JOBSPOOL, run_jobspool, wait_for

NS = "{urn:jobspool:run:1}"
RESULT_NAME = re.compile(r"[0-9]+\.xml")

# The daemon section that keeps tests quick (the defaults are for production).
FAST = {"settle": "0.3s", "rescan": "2s", "grace": "5s"}


# --- time ---------------------------------------------------------------------------


def at(
    zone: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> float:
    """A local wall-clock time in ``zone`` as a POSIX time (its first occurrence)."""
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone)).timestamp()


def local(ts: float, zone: str) -> str:
    """A POSIX time as ``2026-03-29T03:00:00+02:00`` in ``zone`` (what failures show)."""
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).isoformat()


def schedule(sid: str = "job", **raw: Any) -> Schedule:
    """A schedule read from ``raw`` exactly as the configuration file's entry would be."""
    return config.read_schedule(Path("/etc/jobspool/jobspool.yaml"), sid, raw)


# --- waiting ------------------------------------------------------------------------


# --- results ------------------------------------------------------------------------


@dataclass
class Run:
    """One recorded run: the attributes of ``<run>``, its message, output and traceback."""

    path: Path
    attrs: dict[str, str]
    message: str | None
    output: dict[str, str]
    truncated: dict[str, int]
    traceback: str | None

    @property
    def trigger(self) -> str:
        return self.attrs["trigger"]

    @property
    def outcome(self) -> str:
        return self.attrs["outcome"]

    @property
    def name(self) -> str:
        return self.attrs["name"]

    def time(self, key: str) -> float:
        """``due``, ``start`` or ``end`` as a POSIX time."""
        return datetime.fromisoformat(self.attrs[key]).timestamp()

    def __repr__(self) -> str:  # what an assertion shows
        shown = " ".join(f"{k}={v}" for k, v in self.attrs.items() if k != "schedule")
        return f"<run {shown} message={self.message!r} output={self.output!r}>"


def read_run(path: Path) -> Run:
    """A result file, after checking it against ``result.xsd``."""
    data = path.read_bytes()
    problems = schedules.validate(data)
    assert problems == [], f"{path} is not a valid result: {problems}\n{data.decode()}"
    root = etree.fromstring(data)
    output: dict[str, str] = {}
    truncated: dict[str, int] = {}
    for out in root.iter(NS + "output"):
        stream = out.get("stream") or ""
        output[stream] = out.text or ""
        if out.get("truncated"):
            truncated[stream] = int(out.get("truncated") or 0)
    return Run(
        path=path,
        attrs={str(k): str(v) for k, v in root.attrib.items()},
        message=root.findtext(NS + "message"),
        output=output,
        truncated=truncated,
        traceback=root.findtext(NS + "traceback"),
    )


def runs_in(spool: Path, sid: str) -> list[Run]:
    """Every result of schedule ``sid``, oldest first."""
    folder = spool / "state" / "schedules" / sid / "runs"
    try:
        names = [n for n in os.listdir(folder) if RESULT_NAME.fullmatch(n)]
    except FileNotFoundError:
        return []
    return [read_run(folder / n) for n in sorted(names, key=lambda n: int(n[:-4]))]


# --- the scheduler in-process, with a clock of our own -------------------------------------


class RecordingLog:
    """Stands in for the daemon's structured logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level in ("debug", "info", "warning", "error", "exception"):
            return self._log(level)
        raise AttributeError(level)


def finish(scheduler: Scheduler) -> None:
    """Wait until every run the scheduler started has been recorded (durably)."""
    assert scheduler.drain(DEADLINE), f"runs still going after {DEADLINE:g}s: {scheduler.busy}"


# --- a site: configuration, spool, daemon --------------------------------------------------


class Daemon:
    """A ``jobspool daemon`` subprocess with its stderr in a file."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.stderr_path = site.dir / f"daemon-{len(site.daemons) + 1}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [str(JOBSPOOL), "-c", str(site.config), "daemon"],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=site.env(),
                cwd=site.dir,
            )
        site.daemons.append(self)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    out.append(value)
        return out

    def said(self, event: str) -> bool:
        return any(line.get("event") == event for line in self.lines())

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> Daemon:
        self.site.wait_for(
            lambda: self.said("ready") or not self.running(), "the daemon to say ready"
        )
        assert self.running(), f"the daemon exited {self.proc.returncode}\n{self.site.describe()}"
        return self

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; return its exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon ignored SIGTERM\n{self.site.describe()}") from None

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait()


@dataclass
class Site:
    """``dir/jobspool.yaml`` with one interface and some schedules; the spool in ``dir/spool``."""

    dir: Path
    daemons: list[Daemon] = field(default_factory=list)
    pids: list[Path] = field(default_factory=list)  # pid files of processes a test made

    @property
    def config(self) -> Path:
        return self.dir / "jobspool.yaml"

    @property
    def root(self) -> Path:
        return self.dir / "spool"

    def configure(
        self,
        schedules: Mapping[str, Any],
        interfaces: tuple[str, ...] = ("orders_in",),
        **daemon: Any,
    ) -> None:
        """Write ``jobspool.yaml``: interfaces (no schema), schedules, a quick daemon section."""
        data = {
            "spool": "spool",
            "interfaces": {name: {"command": ["/bin/true"]} for name in interfaces},
            "daemon": {**FAST, **daemon},
            "schedules": dict(schedules),
        }
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("JOBSPOOL_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(name, None)
        env["XDG_CACHE_HOME"] = str(self.dir / "xdg-cache")
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``jobspool -c CONFIG ARGS...``, as a sysadmin types it."""
        return run_jobspool(self.config, *args, env=self.env(), cwd=self.dir)

    def ok(self, *args: str) -> str:
        """Run a command that must succeed; return its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
        return result.stdout

    def fails(self, code: int, *args: str) -> str:
        """Run a command that must exit ``code`` with one ``jobspool:`` line; return it."""
        result = self.run(*args)
        assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("jobspool: "), result.stderr
        return lines[0]

    def submit(self, iface: str, name: str, data: bytes) -> int:
        """``jobspool submit IFACE FILE`` of a partner's file; return the exit status."""
        outside = self.dir / "outside"
        outside.mkdir(exist_ok=True)
        (outside / name).write_bytes(data)
        return self.run("submit", iface, str(outside / name)).returncode

    def store(self) -> Store:
        """The schedules of this configuration, on an initialised spool (for in-process tests)."""
        store = Store(config.load(self.config))
        store.spool.init()
        return store

    def start(self) -> Daemon:
        """Start the daemon and wait until it says it is ready."""
        return Daemon(self).wait_ready()

    def runs(self, sid: str) -> list[Run]:
        return runs_in(self.root, sid)

    def wait_runs(
        self, sid: str, count: int, which: Callable[[Run], bool] = lambda r: True
    ) -> list[Run]:
        """Until ``sid`` has at least ``count`` results that ``which`` accepts; return them."""

        def enough() -> list[Run] | None:
            found = [r for r in self.runs(sid) if which(r)]
            return found if len(found) >= count else None

        result: list[Run] = self.wait_for(enough, f"{count} result(s) of {sid}")
        return result

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        return wait_for(condition, what, timeout, show=self.describe)

    def describe(self) -> str:
        """What a failing test shows: the schedules' results and every daemon's stderr."""
        parts = []
        folder = self.root / "state" / "schedules"
        if folder.is_dir():
            for sid in sorted(os.listdir(folder)):
                shown = "\n    ".join(repr(r) for r in runs_in(self.root, sid)) or "-"
                parts.append(f"results of {sid}:\n    {shown}")
        for i, d in enumerate(self.daemons, 1):
            text = d.stderr_path.read_text(errors="replace")[-6000:]
            parts.append(f"daemon {i} (pid {d.proc.pid}, exit {d.proc.poll()}):\n{text}")
        return "\n".join(parts)

    def kill_all(self) -> None:
        for d in self.daemons:
            d.kill()
        for pid_file in self.pids:  # processes a schedule started and a daemon left behind
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


@contextlib.contextmanager
def site_in(directory: Path) -> Iterator[Site]:
    """A fresh site; every daemon it started is killed at the end, whatever happened."""
    site = Site(directory)
    try:
        yield site
    finally:
        site.kill_all()
