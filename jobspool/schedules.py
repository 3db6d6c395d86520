"""Schedules as they stand: the configuration, changes made from the command line, results.

The configuration file defines each schedule. ``jobspool schedule enable``,
``disable``, ``rename``, ``chown`` and ``set`` never rewrite that file (it is
the administrator's, with its comments); they store the changed keys in
``state/schedules/ID/settings.json``, written atomically. The effective
schedule is the configuration's mapping with those keys laid over it,
checked exactly as strictly as the file itself. The daemon notices a changed
settings file within a second, so changes take effect without a restart.

``jobspool schedule add`` defines a schedule without the file: its mapping
(the same keys as in the file) is kept in ``state/schedules/added.json``,
checked as strictly; the file wins over it for an id both define. A
running daemon notices a change of that file within a second, as of a
settings file. ``schedule remove`` takes one out again (only one added so).

Per schedule, under ``state/schedules/ID/``:

- ``settings.json``: the command line's changes;
- ``last``: the last tick the daemon fired (for catch-up after downtime);
- ``run.lock``: held during a run, by the daemon or by ``schedule run``, so
  two runs never overlap;
- ``runs/START.xml``: the result of each run (``schemas/result.xsd``), the
  newest ``daemon.history`` kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from jobspool import config, handlers, joblog, templates, timing
from jobspool.config import Config, Schedule
from jobspool.durable import rename_noreplace, write_file, write_staged
from jobspool.errors import BadRequest, ConfigError, JobspoolError
from jobspool.faults import HandlerNotStarted
from jobspool.handlers import Outcome
from jobspool.spool import Spool

NS = "urn:jobspool:run:1"
SCHEMA = Path(__file__).parent / "schemas" / "result.xsd"
TIMINGS = ("cron", "every", "at")
STILL_GOING = "the previous run was still going"  # a skipped run's message
ACTIONS = ("command", "handler", "template")


class Result(NamedTuple):
    """One run of a schedule, as recorded: which tick, its outcome, and what the run did.

    ``run`` is the same record a job's handler run leaves
    (:class:`~jobspool.handlers.Outcome`: times, exit status, output); its
    ``reason`` is the result's message.
    """

    schedule: str
    trigger: str  # time | manual | catch-up
    outcome: str  # ok | failed | skipped
    run: Outcome
    due: float | None = None

    @property
    def start(self) -> float:
        return self.run.started

    @property
    def end(self) -> float:
        return self.run.ended

    @property
    def message(self) -> str | None:
        return self.run.reason


def skipped(sid: str, trigger: str, due: float | None, why: str) -> Result:
    """The result of a tick that did not run, recorded now."""
    now = time.time()
    never_ran = Outcome(handlers.FAILED, now, now, reason=why)
    return Result(sid, trigger, "skipped", never_ran, due)


class _Paths(NamedTuple):
    folder: str
    last: str
    runs: str
    settings: str
    lock: str


class Staged(NamedTuple):
    """A result written to a staging file, waiting for its batch's sync to be placed."""

    schedule: Schedule
    result: Result
    staging: str


class Store:
    """The schedules of one configuration and their state on disk."""

    def __init__(self, cfg: Config, spool: Spool | None = None) -> None:
        self.cfg = cfg
        self.spool = spool or Spool.of(cfg)
        self.root = self.spool.state / "schedules"
        self._path_cache: dict[str, _Paths] = {}
        self._settings: list[tuple[str, str]] | None = None
        self._added: dict[str, Schedule] | None = None
        self._added_seen = -1

    def folder(self, sid: str) -> Path:
        return self.root / sid

    # --- definitions -----------------------------------------------------------------------

    def ids(self) -> list[str]:
        return list(self.bases())

    def bases(self) -> dict[str, Schedule]:
        """Every schedule as defined: the file's, then those added by command.

        The file wins: an id the file defines is never taken from
        ``state/schedules/added.json`` (``schedule add`` refuses it, and one
        added before the file defined it is shadowed).
        """
        if self._added is None:
            self._added = {}
            for sid, raw in _read_added(self.added_path()).items():
                if sid not in self.cfg.schedules and isinstance(raw, dict):
                    try:
                        self._added[sid] = config.read_schedule(self.cfg.path, sid, raw)
                    except ConfigError as exc:
                        raise ConfigError(f"{self.added_path()}: {exc}") from None
        return {**self.cfg.schedules, **self._added}

    def added_path(self) -> Path:
        """The schedules added by ``jobspool schedule add``, one JSON object."""
        return self.root / "added.json"

    def is_added(self, sid: str) -> bool:
        """True for a schedule added by command (not defined in the file)."""
        return sid not in self.cfg.schedules and sid in self.bases()

    def get(self, sid: str) -> Schedule:
        """The effective schedule ``sid``; :class:`BadRequest` if there is none."""
        bases = self.bases()
        if sid not in bases:
            known = ", ".join(bases) or "none configured"
            raise BadRequest(f"unknown schedule {sid!r} (known: {known})")
        return self._merge(bases[sid], self.overrides(sid))

    def all(self) -> dict[str, Schedule]:
        return {sid: self.get(sid) for sid in self.bases()}

    def add(self, sid: str, raw: Mapping[str, Any]) -> Schedule:
        """Define a schedule by command, checked as strictly as the file; persisted."""
        if sid in self.cfg.schedules:
            raise BadRequest(f"schedule {sid} is defined in {self.cfg.path}: change it "
                             "with 'jobspool schedule set' or there")  # fmt: skip
        if sid in self.bases():
            raise BadRequest(f"schedule {sid} exists already ('jobspool schedule remove {sid}')")
        try:
            s = config.read_schedule(self.cfg.path, sid, raw)  # the file's own reader
            check(s, self.cfg.path)
        except ConfigError as exc:
            raise BadRequest(str(exc).removeprefix(f"{self.cfg.path}: ")) from None
        added = _read_added(self.added_path())
        added[sid] = dict(raw)
        self._write_added(added)
        with contextlib.suppress(FileNotFoundError):  # a stale one from an earlier schedule
            os.unlink(self.folder(sid) / "settings.json")
        return s

    def remove(self, sid: str) -> None:
        """Remove a schedule added by command; its results stay until pruned by hand."""
        if sid in self.cfg.schedules:
            raise BadRequest(f"schedule {sid} is defined in {self.cfg.path}: remove it there "
                             "(or 'jobspool schedule disable' it)")  # fmt: skip
        added = _read_added(self.added_path())
        if sid not in added:
            self.get(sid)  # the unknown-schedule message
        del added[sid]
        self._write_added(added)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder(sid) / "settings.json")

    def _write_added(self, added: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(added, indent=2, sort_keys=True, default=str).encode()
        write_file(self.added_path(), [text], staging=self.root, replace=True)
        self._added = None
        self._settings = None

    def overrides(self, sid: str) -> dict[str, Any]:
        try:
            data = json.loads((self.folder(sid) / "settings.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder(sid) / 'settings.json'}: unreadable: {exc}") from None
        return data if isinstance(data, dict) else {}

    def signature(self) -> tuple[tuple[str, int], ...]:
        """Changes whenever a settings file changes: the daemon's cue to reload them.

        The daemon asks about once a second, for every schedule: hence a
        bare ``os.stat`` of a path built once, not a Path per call.
        """
        out = []
        stat = os.stat
        try:
            added = stat(self.added_path()).st_mtime_ns
        except OSError:
            added = 0
        if added != self._added_seen:  # schedules added or removed: read them again
            self._added_seen, self._added, self._settings = added, None, None
        out.append(("", added))
        for sid, path in self._settings_files():
            try:
                out.append((sid, stat(path).st_mtime_ns))
            except OSError:
                out.append((sid, 0))
        return tuple(out)

    def _settings_files(self) -> list[tuple[str, str]]:
        if self._settings is None:
            self._settings = [(sid, self._paths(sid).settings) for sid in self.bases()]
        return self._settings

    def change(self, sid: str, changes: Mapping[str, Any]) -> Schedule:
        """Store changed keys, checked as strictly as the configuration; return the result."""
        self.get(sid)  # an unknown id is a bad request
        base = self.bases()[sid]
        merged = {**self.overrides(sid), **changes}
        # An empty value (name=) drops the change: the file's value holds again.
        for key in [k for k, v in changes.items() if v is None]:
            del merged[key]
        # Setting one timing (or action) replaces the other ones.
        for group in (TIMINGS, ACTIONS):
            chosen = [k for k in group if changes.get(k) is not None]
            for k in group:
                if chosen and k not in chosen:
                    merged[k] = None
        try:
            schedule = self._merge(base, merged)
        except ConfigError as exc:  # the request is what is wrong, not the file
            raise BadRequest(str(exc).removeprefix(f"{self.cfg.path}: ")) from None
        folder = self.folder(sid)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(merged, indent=2, sort_keys=True, default=str).encode()
        write_file(folder / "settings.json", [text], staging=folder, replace=True)
        return schedule

    def _merge(self, base: Schedule, overrides: Mapping[str, Any]) -> Schedule:
        raw = {**base.raw, **overrides}
        raw = {k: v for k, v in raw.items() if v is not None}
        s = config.read_schedule(self.cfg.path, base.id, raw)
        check(s, self.cfg.path)
        return s

    # --- ticks and results -------------------------------------------------------------------

    def last_tick(self, sid: str) -> float | None:
        try:
            return float((self.folder(sid) / "last").read_text())
        except (OSError, ValueError):
            return None

    def record_tick(self, sid: str, tick: float) -> None:
        """Remember the last tick fired, for catch-up after downtime.

        Overwritten in place, one fixed-size write, not synced: the daemon
        writes it for every tick of every schedule, and creating a file (as
        a rename would) costs far more than the write. A crash cannot tear
        one write; a power cut can lose it, or leave a new file empty (read
        as "never ran"), which only changes whether one catch-up run happens.
        """
        paths = self._paths(sid)
        # Padded: a shorter number must not leave the end of a longer one behind.
        data = f"{tick!r:<31}\n".encode()
        fd = _open_in(paths.folder, paths.last, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def results(self, sid: str) -> list[Path]:
        """Result files, newest first."""
        try:
            files = [p for p in (self.folder(sid) / "runs").iterdir() if p.suffix == ".xml"]
        except FileNotFoundError:
            return []
        return sorted(files, key=lambda p: int(p.stem) if p.stem.isdigit() else 0, reverse=True)

    def record(self, s: Schedule, result: Result) -> Path:
        """Write a run's result durably, then keep only the newest ``daemon.history``."""
        runs = self.folder(s.id) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        stems = self.result_stems(s.id)
        stem = _result_stem(result, stems)
        write_file(runs / f"{stem}.xml", [result_xml(s, result)], staging=runs, replace=True)
        stems.append(stem)
        self.prune(s.id, stems)
        return runs / f"{stem}.xml"

    def stage(self, s: Schedule, result: Result) -> Staged:
        """Write a run's result to a staging file, unsynced: see :meth:`place`."""
        staging = write_staged(self.spool.tmp, s.id, [result_xml(s, result)])
        return Staged(s, result, staging)

    def place(self, staged: Staged, stems: list[int]) -> Path:
        """Rename a staged result into place, after its batch was synced (group commit).

        ``stems`` are the schedule's results (:meth:`result_stems`); the new
        one is added. It is named by the run's start, and after the newest
        result, which is only known now: the same rule as :meth:`record`.
        """
        runs = self._paths(staged.schedule.id).runs
        stem = _result_stem(staged.result, stems)
        while True:
            path = f"{runs}/{stem}.xml"
            try:
                try:
                    rename_noreplace(staged.staging, path)
                except FileNotFoundError:  # its first result (or the folder was removed)
                    os.makedirs(runs, exist_ok=True)
                    rename_noreplace(staged.staging, path)
            except FileExistsError:  # a run by hand, in the same nanosecond
                stem += 1
                continue
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(staged.staging)
                raise JobspoolError(f"cannot record a result in {runs}: {exc.strerror}") from exc
            stems.append(stem)
            return Path(path)

    def prune(self, sid: str, stems: list[int] | None = None) -> None:
        """Keep only the newest ``daemon.history`` results of ``sid`` (of ``stems``, if given)."""
        runs = self._paths(sid).runs
        stems = self.result_stems(sid) if stems is None else stems
        for stem in stems[: -self.cfg.daemon.history]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{runs}/{stem}.xml")

    def result_stems(self, sid: str) -> list[int]:
        """The results' names as numbers, oldest first.

        Bare names, no Path per file: the daemon lists them for every run.
        """
        try:
            names = os.listdir(self._paths(sid).runs)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-4]) for n in names if n.endswith(".xml") and n[:-4].isdigit())

    def _paths(self, sid: str) -> _Paths:
        """The files of ``sid`` as text, built once per process."""
        paths = self._path_cache.get(sid)
        if paths is None:
            folder = str(self.folder(sid))
            paths = self._path_cache[sid] = _Paths(
                folder, f"{folder}/last", f"{folder}/runs", f"{folder}/settings.json",
                f"{folder}/run.lock",
            )  # fmt: skip
        return paths

    @contextlib.contextmanager
    def run_lock(self, sid: str) -> Iterator[bool]:
        """Try to take the schedule's run lock; yields whether we have it."""
        paths = self._paths(sid)
        fd = _open_in(paths.folder, paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _read_added(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from None
    return data if isinstance(data, dict) else {}


def _result_stem(result: Result, stems: list[int]) -> int:
    # Named by start, but always after the newest: a clock that went back
    # must not make a new result the first to be pruned.
    return max(int(result.start * 1e9), stems[-1] + 1 if stems else 0)


def _open_in(folder: str, path: str, flags: int, mode: int) -> int:
    """Open ``path``, making its folder first if it is missing (a schedule's first tick)."""
    try:
        return os.open(path, flags, mode)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return os.open(path, flags, mode)


def check(s: Schedule, path: Path) -> None:
    """What the configuration's shape cannot say: a valid cron, zone, owner and template."""
    where = f"{path}: schedules.{s.id}"
    try:
        timing.zone(s)
    except ValueError as exc:
        raise ConfigError(f"{where}.timezone: {exc}") from None
    try:
        timing.next_run(s, time.time())
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{where}.{s.timing}: {exc}") from None
    if s.owner is not None:
        try:
            pwd.getpwnam(s.owner)
        except KeyError:
            raise ConfigError(f"{where}.owner: no such user {s.owner!r}") from None
    if s.action == "template":
        try:
            templates.settings(s.target, s.settings)
        except BadRequest as exc:
            raise ConfigError(f"{where}.with: {exc}") from None


# --- running ---------------------------------------------------------------------------------


class Context(NamedTuple):
    """What a Python schedule handler is called with."""

    schedule: str
    spool: Path
    settings: Mapping[str, Any]


def execute(
    store: Store,
    s: Schedule,
    trigger: str,
    due: float | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    record: Callable[[Schedule, Result], object] | None = None,
) -> Result:
    """Run a schedule now, unless its previous run is still going (then: skipped).

    The result is recorded while the run lock is still held: durably with
    :meth:`Store.record`, or by ``record`` (the daemon stages it for a group
    commit).
    """
    with store.run_lock(s.id) as mine:
        if not mine:
            result = skipped(s.id, trigger, due, STILL_GOING)
        else:
            result = _run(store, s, trigger, due, on_start)
        (record or store.record)(s, result)
    return result


def run_by_hand(store: Store, sid: str) -> Result:
    """``schedule run ID`` and the console's Run: refused while disabled or running.

    A disabled schedule is a :class:`BadRequest`; one whose previous run is
    still going is :class:`TryLater` (the skipped run is recorded). A run
    that failed is returned: its outcome says so.
    """
    from jobspool.errors import TryLater

    s = store.get(sid)
    if not s.enabled:
        raise BadRequest(f"schedule {sid} is disabled; 'jobspool schedule enable {sid}' first")
    result = execute(store, s, "manual")
    if result.outcome == "skipped":
        raise TryLater(f"schedule {sid} is running now; try again when it is done")
    return result


def pairs_as_values(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts as a mapping, each value read as YAML (``schedule add``)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadRequest(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            out[key] = text
    return out


def changes_from_pairs(store: Store, sid: str, pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts (values read as YAML) as changes for :meth:`Store.change`.

    ``with.NAME=VALUE`` changes one of the template's or handler's settings.
    """
    changes: dict[str, Any] = {}
    settings = dict(store.get(sid).settings)
    for key, value in pairs_as_values(pairs).items():
        if key.startswith("with."):
            settings[key[5:]] = value
            changes["with"] = settings
        else:
            changes[key] = value
    return changes


def _run(
    store: Store,
    s: Schedule,
    trigger: str,
    due: float | None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None,
) -> Result:
    start = time.time()

    def result(outcome: str, message: str | None, trace: str | None = None) -> Result:
        done = handlers.DONE if outcome == "ok" else handlers.FAILED
        run = Outcome(done, start, time.time(), reason=message, traceback=trace)
        return Result(s.id, trigger, outcome, run, due)

    if s.action == "command":
        env = dict(os.environ, JOBSPOOL_SCHEDULE=s.id, JOBSPOOL_SPOOL=str(store.spool.root))
        as_user = s.owner if os.geteuid() == 0 and s.owner not in (None, "root") else None
        limit = store.cfg.daemon.output_limit
        try:
            o = handlers.run_command(
                s.target, env, s.timeout, output_limit=limit, user=as_user, on_start=on_start
            )
        except HandlerNotStarted as exc:  # a run that could not start is a failed run
            return result("failed", str(exc))
        return Result(s.id, trigger, "ok" if o.result == handlers.DONE else "failed", o, due)
    try:
        if s.action == "template":
            template = templates.TEMPLATES[s.target]
            message = template.run(store.spool, templates.settings(s.target, s.settings))
        else:
            handler = handlers.load_callable(s.target, beside=store.cfg.path.parent)
            handler(Context(s.id, store.spool.root, s.settings))
            message = None
    except templates.TemplateFailed as exc:
        return result("failed", str(exc))
    except Exception as exc:
        return result("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    return result("ok", message)


def result_xml(s: Schedule, r: Result) -> bytes:
    from lxml import etree

    q = f"{{{NS}}}"
    el = etree.Element(q + "run", nsmap={None: NS})
    run = r.run
    attrs: dict[str, object] = {
        "schedule": s.id,
        "name": s.name,
        "trigger": r.trigger,
        "outcome": r.outcome,
        "due": None if r.due is None else joblog.iso(r.due),
        "start": joblog.iso(run.started),
        "end": joblog.iso(run.ended),
        "exit-status": run.exit_status,
        "signal": run.signal,
        "timed-out": "true" if run.timed_out else None,
    }
    for key, value in attrs.items():
        if value is not None:
            el.set(key, joblog.xml_text(str(value)))
    if run.reason:
        etree.SubElement(el, q + "message").text = joblog.xml_text(run.reason)
    joblog.run_details(el, run, q)
    return etree.tostring(el, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def read_run(path: Path) -> dict[str, Any]:
    """A result with everything in it: attributes, message, output streams, traceback."""
    from jobspool.check import parse

    root = parse(path.read_bytes()).getroot()
    out: dict[str, Any] = {str(k): str(v) for k, v in root.attrib.items()}
    out["file"] = path.name
    for el in root:
        tag = el.tag.split("}")[-1] if isinstance(el.tag, str) else ""
        if tag == "message":
            out["message"] = el.text or ""
        elif tag == "output":
            out[str(el.get("stream"))] = el.text or ""
            if el.get("truncated"):
                out[f"{el.get('stream')}-truncated"] = str(el.get("truncated"))
        elif tag == "traceback":
            out["traceback"] = el.text or ""
    return out


def read_result(path: Path) -> dict[str, str]:
    """A result's attributes and message, for listing."""
    from jobspool.check import parse

    root = parse(path.read_bytes()).getroot()
    out = dict(root.attrib)
    msg = root.find(f"{{{NS}}}message")
    if msg is not None and msg.text:
        out["message"] = msg.text
    return {str(k): str(v) for k, v in out.items()}


def validate(data: bytes) -> list[str]:
    """Problems of a result against ``result.xsd`` (empty when valid)."""
    from lxml import etree

    schema = etree.XMLSchema(etree.parse(str(SCHEMA)))
    if schema.validate(etree.fromstring(data).getroottree()):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
