"""The checks: every acknowledgement durable, no finished job without its log, crash states.

:class:`Checker` replays a trace (:mod:`tests.crashcheck.trace`) into the
model (:mod:`tests.crashcheck.model`) and, as it goes:

- at every **acknowledgement** (a daemon's JSON line ``accepted``,
  ``rejected``, ``done``, ``failed``, ``schedule ran``/``skipped``; the
  output of ``jobspool submit``, ``retry`` and ``fetch``, judged by their
  exit status; the answers of ``jobspool serve``: an upload taken (201) or
  rejected (400), a download (200), each at the moment the server began
  to write it on the connection), checks that what it reports would survive a power cut at
  that instant: the job's entry at the place reported (and every directory
  above it), its bytes (those uploaded, when known) and its stamp; for a
  finished or rejected job, its log beside it; for an upload, its pending
  log; for a fetch, the copy in the target too;
- at **every operation** that puts a job into ``bak/`` or ``joberrors/``,
  or removes or replaces a log there, checks that the job never sits there
  without a durable log;
- at chosen points (acknowledgements and random ones), builds **crash
  states**, ALICE-style: the durable ops, plus none, all, or random subsets
  of the pending ones; writes each as a real directory, runs
  ``jobspool daemon --once`` on it as the recovery, and checks that every job
  acknowledged by then is in exactly one place, whole, with its log where
  the contract says, and that nothing is left in ``tmp/`` or as an orphan in
  ``state/pending``.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from jobspool import joblog
from tests.crashcheck.model import Model, Op
from tests.crashcheck.trace import Call, Trace, connection, iovec_data

LOG = ",log.xml"
DAEMON_ACKS = {"accepted", "rejected", "done", "failed", "schedule ran", "schedule skipped"}
STATES = ("incoming", "queue", "bak")


@dataclass
class Ack:
    """Something a user was told: ``kind`` of ``job`` at ``place`` (relative to the spool)."""

    at: int
    kind: str  # accepted rejected done failed submitted retried fetched schedule
    # uploaded downloaded (HTTP; a rejected upload is "rejected")
    job: str
    place: str
    source: str
    original: str | None = None  # the dropped file's name, when the job got a safe one
    target: str | None = None  # a fetch's directory

    def __str__(self) -> str:
        return f"{self.kind} {self.job} -> {self.place} ({self.source}, trace line {self.at})"


@dataclass
class Finding:
    """A violation: at which trace position, of what, and why."""

    at: int
    check: str  # "acknowledged before durable" | "job without durable log" | "crash state"
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] line {self.at}: {self.detail}"


@dataclass
class Report:
    """What one run of the checker saw and found."""

    calls: int = 0
    ops: int = 0
    syncs: int = 0
    failed_syncs: int = 0
    acks: collections.Counter[str] = field(default_factory=collections.Counter)
    injected: collections.Counter[str] = field(default_factory=collections.Counter)  # by call
    http: collections.Counter[str] = field(default_factory=collections.Counter)  # HTTP answers
    findings: list[Finding] = field(default_factory=list)
    crash_points: int = 0
    crash_states: int = 0
    recovered: int = 0
    seconds: float = 0.0
    surprises: list[str] = field(default_factory=list)

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.acks.items()))
        http = ", ".join(f"{k} {n}" for k, n in sorted(self.http.items()))
        lines = [
            f"{self.calls} calls, {self.ops} ops, {self.syncs} syncs ({self.failed_syncs} failed), "
            f"{sum(self.injected.values())} failures injected; "
            f"{sum(self.acks.values())} acknowledgements checked ({kinds}"
            + (f"; of them HTTP answers: {http}" if http else "")
            + "); "
            f"{self.crash_states} crash states at {self.crash_points} points, "
            f"{self.recovered} recovered; {len(self.findings)} findings; {self.seconds:.1f}s",
        ]
        by = collections.Counter(f.check for f in self.findings)
        lines += [f"  {n} x {check}" for check, n in sorted(by.items())]
        lines += [f"  {f}" for f in self.findings[:40]]
        if self.surprises:
            lines.append(f"  model guessed {len(self.surprises)} times, e.g. {self.surprises[:3]}")
        return "\n".join(lines)


@dataclass
class CrashPoint:
    at: int
    why: str
    pending: list[int]  # seq of the ops pending then


class Checker:
    """Check one recorded run; see the module's docstring.

    ``base`` is the directory the model follows (the site: config, spool,
    partners' files), ``config`` the configuration file under it (the
    recovery runs with it), ``spool`` the spool under it. ``expected`` maps
    job names (as dropped or submitted) to their bytes. ``ackers`` are the
    names of programs (besides ``jobspool``) whose JSON log lines on stderr
    acknowledge jobs, as the daemon's do. ``clients`` are the names of
    programs that talk to ``jobspool serve`` and say on stdout what it
    answered (see :meth:`_http_acks`).
    """

    def __init__(
        self,
        trace: Trace,
        base: Path,
        config: Path,
        spool: Path,
        *,
        expected: Mapping[str, bytes] | None = None,
        ackers: Sequence[str] = (),
        clients: Sequence[str] = (),
        jobspool: Path | None = None,
        seed: int = 0,
        points: int = 10,
        random_points: int = 4,
        subsets: int = 2,
        workers: int = 2,
    ) -> None:
        self.trace = trace
        self.base = base
        self.config = config
        self.spool = os.path.relpath(spool, base)
        self.expected = dict(expected or {})
        self.ackers = set(ackers)
        self.clients = set(clients)
        self.jobspool = jobspool
        self.rng = random.Random(seed)
        self.points, self.random_points, self.subsets = points, random_points, subsets
        self.workers = workers
        self.model = Model(base, trace)
        self.report = Report()
        self.acks: list[Ack] = []
        self.crash_points: list[CrashPoint] = []
        self._spoke: set[int] = set()  # CLI processes whose first output was seen
        self._started: dict[int, int] = {}  # process -> its first position in the trace
        self._keep_failed = False
        self._sending: dict[int, int] = {}  # client port -> where it said it sends a request
        self._answered: dict[int, int] = {}  # client port -> the server's first write after

    # --- the replay ------------------------------------------------------------------

    def check(self) -> Report:
        """Replay, check every acknowledgement and operation; no crash states yet."""
        started = time.monotonic()
        for call in self.trace.calls:
            self._started.setdefault(self.trace.leader(call.pid), call.start)
            if call.injected:
                self.report.injected[call.name] += 1
            for op in self.model.apply(call):
                self._after(op)
            self._server_wrote(call)
            for ack in self._acks_of(call):
                self.acks.append(ack)
                self.report.acks[ack.kind] += 1
                self._check_ack(ack)
                self.crash_points.append(CrashPoint(ack.at, str(ack), []))
        self.acks.sort(key=lambda a: a.at)  # an HTTP answer is known after it was given
        self.report.calls = len(self.trace.calls)
        self.report.ops = len(self.model.ops)
        self.report.syncs = self.model.syncs
        self.report.failed_syncs = self.model.failed_syncs
        self.report.surprises = self.model.surprises
        self.report.seconds += time.monotonic() - started
        return self.report

    def find(self, at: int, check: str, detail: str) -> None:
        self.report.findings.append(Finding(at, check, detail))

    # --- acknowledgements ------------------------------------------------------------

    def _acks_of(self, call: Call) -> list[Ack]:
        if call.name not in ("write", "writev") or not call.ret or not call.args:
            return []  # failed, or empty (click writes b"" before a line)
        fd = call.args[0].fd
        if fd not in (1, 2):
            return []
        argv = self.trace.argv(call.pid, call.start)
        if not argv:
            return []
        data = (call.args[1].data or b"") if call.name == "write" else iovec_data(call.args[1])
        text = data[: call.ret].decode("utf-8", "replace")
        proc = self.trace.leader(call.pid)
        prog = os.path.basename(argv[0])
        daemon = prog == "jobspool" and "daemon" in argv
        if daemon or self.ackers & {os.path.basename(a) for a in argv}:
            return self._daemon_acks(call, text, fd, proc)
        if fd == 1 and self.clients & {os.path.basename(a) for a in argv}:
            return self._http_acks(call, text, proc)
        if prog == "jobspool":
            return self._cli_acks(call, argv, text, fd, proc)
        return []

    def _daemon_acks(self, call: Call, text: str, fd: int, proc: int) -> list[Ack]:
        out = []
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("event") not in DAEMON_ACKS:
                continue
            kind = str(event["event"])
            source = f"daemon pid {proc}"
            if kind.startswith("schedule"):
                sid = str(event.get("schedule"))
                out.append(Ack(call.end, "schedule", sid, f"state/schedules/{sid}/runs", source))
                continue
            job, to = str(event.get("job")), str(event.get("to"))
            out.append(Ack(call.end, kind, job, to, source, original=event.get("dropped_as")))
        return out

    def _server_wrote(self, call: Call) -> None:
        """Note ``jobspool serve``'s first write on a connection after its client's request."""
        if call.name not in ("write", "writev", "sendto", "sendmsg") or not call.ok:
            return
        ports = connection(call.args[0]) if call.args else None
        if ports is None or ports[1] not in self._sending or ports[1] in self._answered:
            return
        argv = self.trace.argv(call.pid, call.start)
        if not argv or os.path.basename(argv[0]) != "jobspool" or "serve" not in argv:
            return
        if call.start > self._sending[ports[1]]:
            self._answered[ports[1]] = call.start

    def _http_acks(self, call: Call, text: str, proc: int) -> list[Ack]:
        """A client's lines: ``{"http": "sending", "port": P}`` once its connection is up,
        before it sends the request; ``{"http": "answer", "port": P, "kind": "upload" or
        "download", "status": S, "job": NAME, "interface": IFACE}`` once it has read the
        answer. The acknowledgement is the server's first write on that connection after
        the first line (the answer's first bytes): what had to be durable then, must be.
        """
        out = []
        for line in text.splitlines():
            try:
                said = json.loads(line)
            except ValueError:
                continue
            if not isinstance(said, dict) or "http" not in said:
                continue
            port = int(said["port"])
            if said["http"] == "sending":
                self._sending[port] = call.end
                self._answered.pop(port, None)
                continue
            at = self._answered.get(port)
            source = (
                f"jobspool serve, {said['kind']} answered {said['status']} (client port {port})"
            )
            if at is None:
                self.find(call.end, "answer not traced", f"{source}: no write of the server seen")
                continue
            kind, place = {
                ("upload", 201): ("uploaded", f"queue/{said['interface']}"),
                ("upload", 400): ("rejected", "joberrors"),
                ("download", 200): ("downloaded", f"bak/{said['interface']}"),
            }[(said["kind"], said["status"])]
            self.report.http[kind] += 1
            out.append(Ack(at, kind, str(said["job"]), place, source))
        return out

    def _cli_acks(self, call: Call, argv: list[str], text: str, fd: int, proc: int) -> list[Ack]:
        words = _command(argv)
        if not words:
            return []
        cmd, args = words[0], words[1:]
        status = self.trace.exit_status(proc)
        source = f"jobspool {' '.join(words)} (pid {proc}, exit {status})"
        if cmd == "fetch" and fd == 1:
            iface, to = args[0], _option(args, "--to")
            to = to if to is None or to.startswith("/") else str(self.base / to)
            return [
                Ack(call.end, "fetched", n, f"bak/{iface}", source, target=to) for n in text.split()
            ]
        if cmd not in ("submit", "retry") or proc in self._spoke or fd != (1 if status == 0 else 2):
            return []
        self._spoke.add(proc)
        if cmd == "submit":
            positional = [a for i, a in enumerate(args)
                          if not a.startswith("--") and args[i - 1] != "--name"]  # fmt: skip
            name = _option(args, "--name") or os.path.basename(positional[1])
            if status == 0:
                return [Ack(call.end, "submitted", name, f"queue/{args[0]}", source)]
        else:
            name = args[0]
            if status == 0:
                return [Ack(call.end, "retried", name, text.strip(), source)]
        if status == 65:
            return [Ack(call.end, "rejected", name, "joberrors", source)]
        return []

    def _check_ack(self, ack: Ack) -> None:
        at = ack.at
        where = f"{self.spool}/{ack.place}"
        if ack.kind == "schedule":
            runs = self.model.locate(where)
            if runs is None:
                self.find(at, "acknowledged before durable", f"{ack}: no {where}")
                return
            for name in sorted(self.model.inodes[runs].entries):
                self._need(ack, where, name, None)
            return
        expect = self._expected(ack)
        if ack.kind == "uploaded":
            self._uploaded(ack, expect)
            return
        self._need(ack, where, ack.job, expect)
        if ack.kind in ("rejected", "done", "failed", "fetched", "downloaded"):
            self._need(ack, where, ack.job + LOG, b"")
        if ack.kind == "fetched" and ack.target is not None:
            self._need(ack, os.path.relpath(ack.target, self.base), ack.job, expect)

    def _uploaded(self, ack: Ack, expect: bytes | None) -> None:
        """An upload answered 201: queued with its pending log, or already run on.

        The daemon may have run the job between the upload and its answer:
        then it must be durably in ``bak/IFACE`` or ``joberrors`` with its log.
        """
        queued = self._unsure(f"{self.spool}/{ack.place}", ack.job, ack.at, expect)
        if not queued:
            pending = f"{self.spool}/state/pending"
            self._need(ack, pending, ack.job + LOG, b"")
            return
        if self._moving_on(f"{self.spool}/{ack.place}", ack.job, ack.at, expect):
            return
        iface = ack.place.split("/", 1)[1]
        for later in (f"bak/{iface}", "joberrors"):
            where = f"{self.spool}/{later}"
            if not self._unsure(where, ack.job, ack.at, expect) and not self._unsure(
                where, ack.job + LOG, ack.at, b""
            ):
                return
        self.find(ack.at, "acknowledged before durable", f"{ack}: {queued}")

    def _moving_on(self, rel_dir: str, name: str, at: int, expect: bytes | None) -> bool:
        """Durably at ``rel_dir/name``, whole, but for a pending rename into bak or joberrors.

        A rename is atomic: a crash keeps the job here or there, and there
        it has its log (checked at the rename itself, :meth:`_after`).
        """
        m = self.model
        d = m.root
        for part in [p for p in rel_dir.split("/") if p and p != "."]:
            value, waiting = m.entry(d, part, at)
            if waiting or value is None:
                return False
            d = value
        value, waiting = m.entry(d, name, at)
        if value is None or not waiting:
            return False
        for op in waiting:
            if (
                op.kind != "rename"
                or (op.dir, op.name) != (d, name)
                or not self._finished_dir(op.dir2)
            ):
                return False
        data, _, pending = m.content(value, at)
        return not pending and bool(data) and (expect is None or data == expect)

    def _expected(self, ack: Ack) -> bytes | None:
        """The bytes uploaded as this job, when known by its name."""
        if ack.original is not None and ack.original != ack.job:
            return None  # renamed (invalid name, name in use): whatever it holds now
        return self.expected.get(ack.job)

    def _need(self, ack: Ack, rel_dir: str, name: str, expect: bytes | None) -> None:
        """``rel_dir/name`` is durable at the ack: its entry (and parents) and its data.

        ``expect``: its bytes; ``b""`` any non-empty content; None: whatever it holds now.
        """
        problems = self._unsure(rel_dir, name, ack.at, expect)
        if problems:
            self.find(ack.at, "acknowledged before durable", f"{ack}: {problems}")

    def _unsure(self, rel_dir: str, name: str, at: int, expect: bytes | None) -> str:
        m = self.model
        d = m.root
        parts = [p for p in rel_dir.split("/") if p and p != "."]
        for i, part in enumerate(parts):
            value, waiting = m.entry(d, part, at)
            here = "/".join(parts[: i + 1])
            if waiting:
                return f"directory {here} not durable: {_ops(waiting, m)}"
            if value is None:
                return f"directory {here} is not there durably"
            d = value
        value, waiting = m.entry(d, name, at)
        path = f"{rel_dir}/{name}"
        if waiting:
            return f"entry {path} not durable: {_ops(waiting, m)}"
        if value is None:
            return f"{path} is not there (durably)"
        data, _, waiting = m.content(value, at)
        if waiting:
            return f"data of {path} not durable: {_ops(waiting, m)}"
        if expect == b"" and not data:
            return f"{path} is durable but empty"
        if expect and data != expect:
            return f"{path} holds {len(data)} durable bytes, not the {len(expect)} uploaded"
        return ""

    # --- finished jobs and their logs --------------------------------------------------

    def _finished_dir(self, d: int) -> bool:
        rel = self.model.name(d)
        return rel == f"{self.spool}/joberrors" or (
            rel.startswith(f"{self.spool}/bak/") and rel.count("/") == self.spool.count("/") + 2
        )

    def _after(self, op: Op) -> None:
        """No job in bak/ or joberrors/ without a durable log, at any instant."""
        m = self.model
        if op.kind == "rename":
            places = [(op.dir2, op.name2, "in"), (op.dir, op.name, "out")]
        elif op.kind == "create":
            places = [(op.dir, op.name, "in")]
        elif op.kind == "unlink":
            places = [(op.dir, op.name, "out")]
        else:
            return
        for d, name, way in places:
            if name.startswith(".") or not self._finished_dir(d):
                continue
            folder = m.name(d)
            if not name.endswith(LOG):
                if way == "in":
                    problem = self._unsure(folder, name + LOG, op.end, b"")
                    if problem:
                        self.find(op.end, "job without durable log",
                                  f"{op.describe(m)}: {problem}")  # fmt: skip
                continue
            job = name[: -len(LOG)]
            there = job in m.inodes[d].entries or m.entry(d, job, op.end)[0] is not None
            if not there:
                continue
            if way == "out":
                self.find(op.end, "job without durable log",
                          f"{op.describe(m)} while {folder}/{job} is there")  # fmt: skip
            else:
                _, _, waiting = m.content(op.inode, op.end)
                if waiting:
                    self.find(op.end, "job without durable log",
                              f"{op.describe(m)}: the new log's data is not durable "
                              f"while {folder}/{job} is there")  # fmt: skip

    # --- crash states --------------------------------------------------------------------

    def crash(self, workdir: Path, keep_failed: bool = False) -> Report:
        """Build, recover and check crash states at chosen points (after :meth:`check`).

        Each state is removed once checked; with ``keep_failed`` those with
        findings stay in ``workdir`` for a look (the findings name them).
        """
        self._keep_failed = keep_failed
        started = time.monotonic()
        points = self._choose()
        jobs = []
        for k, point in enumerate(points):
            pending = [op.seq for op in self.model.pending(point.at)]
            keeps: list[set[int]] = [set()]
            if pending:
                keeps.append(set(pending))
                for _ in range(self.subsets):
                    keeps.append({s for s in pending if self.rng.random() < 0.5})
            for j, keep in enumerate(keeps):
                jobs.append((point, keep, workdir / f"crash-{k:03d}-{j}"))
        self.report.crash_points += len(points)
        self.report.crash_states += len(jobs)
        with ThreadPoolExecutor(self.workers) as pool:
            for found in pool.map(lambda job: self._recover(*job), jobs):
                self.report.findings += found
        self.report.seconds += time.monotonic() - started
        return self.report

    def _choose(self) -> list[CrashPoint]:
        acks = self.crash_points
        chosen: dict[int, CrashPoint] = {}
        if acks:
            step = max(1, len(acks) // max(1, self.points))
            for p in acks[::step][: self.points]:
                chosen[p.at] = p
            chosen[acks[-1].at] = acks[-1]
        ops = self.model.ops
        for _ in range(self.random_points if ops else 0):
            op = self.rng.choice(ops)
            why = f"random, after {op.describe(self.model)}"
            chosen.setdefault(op.end, CrashPoint(op.end, why, []))
        return [chosen[at] for at in sorted(chosen)]

    def _recover(self, point: CrashPoint, keep: set[int], where: Path) -> list[Finding]:
        found = self._recover_in(point, keep, where)
        if not (found and self._keep_failed):
            shutil.rmtree(where, ignore_errors=True)
        return found

    def _recover_in(self, point: CrashPoint, keep: set[int], where: Path) -> list[Finding]:
        state = self.model.state(point.at, keep)
        if where.exists():
            shutil.rmtree(where)
        self.model.materialise(state, self.model.root, where)
        spool = where / self.spool
        label = f"crash at line {point.at} ({point.why}), {len(keep)} pending ops kept, in {where}"
        found: list[Finding] = []

        def bad(detail: str) -> None:
            found.append(Finding(point.at, "crash state", f"{label}: {detail}"))

        before = _jobs(spool)
        config = where / os.path.relpath(self.config, self.base)
        jobspool = str(self.jobspool or shutil.which("jobspool") or "jobspool")
        env = {**os.environ, "XDG_CACHE_HOME": str(where / ".xdg-cache"), "T": str(where)}
        env.pop("JOBSPOOL_CONFIG", None)
        proc = subprocess.run(
            [jobspool, "-c", str(config), "daemon", "--once"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=where,
            timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            bad(f"recovery exited {proc.returncode}: {proc.stderr[-2000:]}")
            return found
        self.report.recovered += 1
        after = _jobs(spool)
        leftovers = sorted(os.listdir(spool / "tmp")) if (spool / "tmp").is_dir() else []
        if leftovers:
            bad(f"left in tmp/ after recovery: {leftovers[:5]}")
        pending_dir = spool / "state" / "pending"
        for log in sorted(os.listdir(pending_dir)) if pending_dir.is_dir() else []:
            job = log.removesuffix(LOG)
            if not any(p.startswith("queue/") for p in after.get(job, [])):
                bad(f"state/pending/{log} left for a job not queued ({after.get(job)})")
        for job, places in before.items():
            # Drop folders excepted: a file there may get a new name (invalid, in use).
            if any(not p.startswith("incoming/") for p in places) and job not in after:
                bad(f"{job} was in {places} before recovery and is gone after it")
        last: dict[str, Ack] = {}
        for ack in self.acks:
            if ack.at <= point.at and ack.kind != "schedule":
                last[ack.job] = ack
        begun = [pid for pid, pos in self._started.items() if pos <= point.at]
        retried = {self._retried(pid) for pid in begun}
        for job, ack in last.items():
            self._crash_job(job, ack, after.get(job, []), where, job in retried, bad)
        return found

    def _retried(self, pid: int) -> str | None:
        words = _command(self.trace.argv(pid, 1 << 62))
        return words[1] if len(words) > 1 and words[0] == "retry" else None

    def _crash_job(
        self,
        job: str,
        ack: Ack,
        places: list[str],
        where: Path,
        retried: bool,
        bad: Callable[[str], None],
    ) -> None:
        if len(places) != 1:
            bad(f"{ack}: after recovery in {places or 'no place: lost'}")
            return
        spool = where / self.spool
        place = places[0]
        iface = ack.place.split("/", 1)[1] if "/" in ack.place else None
        downstream = {"joberrors"} | ({f"bak/{iface}", f"queue/{iface}"} if iface else set())
        allowed = {
            "done": {ack.place},
            "fetched": {ack.place},
            "downloaded": {ack.place},
            "rejected": {"joberrors"},
            "failed": {"joberrors"},
        }.get(ack.kind, downstream)
        if retried and ack.kind in ("rejected", "failed"):
            allowed = {"joberrors", *(p for p in _places(spool) if not p.startswith("incoming"))}
        if place not in allowed:
            bad(f"{ack}: after recovery in {place}, not in {sorted(allowed)}")
        folder = spool / place
        data = (folder / job).read_bytes()
        expect = self._expected(ack)
        if expect is not None and data != expect:
            bad(f"{ack}: {place}/{job} holds {len(data)} bytes, not the {len(expect)} uploaded")
        if place == "joberrors" or place.startswith("bak/"):
            log = folder / (job + LOG)
            if not log.is_file():
                bad(f"{ack}: {place}/{job} has no log")
            elif not _valid_log(log.read_bytes()):
                bad(f"{ack}: {place}/{job}{LOG} is not a valid log")
        if ack.kind == "fetched" and ack.target is not None:
            copy = where / os.path.relpath(ack.target, self.base) / job
            if not copy.is_file() or (expect is not None and copy.read_bytes() != expect):
                bad(f"{ack}: the fetched copy {copy} is missing or not whole")


def _valid_log(data: bytes) -> bool:
    try:
        return not joblog.validate(data)
    except Exception:  # empty, or not XML at all
        return False


def _places(spool: Path) -> list[str]:
    out = ["joberrors"]
    for state in STATES:
        base = spool / state
        if base.is_dir():
            out += [f"{state}/{p.name}" for p in sorted(base.iterdir()) if p.is_dir()]
    return out


def _jobs(spool: Path) -> dict[str, list[str]]:
    """Every job in the spool (incoming, queue, bak, joberrors) -> its places."""
    out: dict[str, list[str]] = {}
    for place in _places(spool):
        folder = spool / place
        if not folder.is_dir():
            continue
        for name in os.listdir(folder):
            if name.startswith(".") or name.endswith(LOG):
                continue
            out.setdefault(name, []).append(place)
    return out


def _command(argv: list[str]) -> list[str]:
    """A jobspool command line without the program and its global options."""
    words = argv[1:]
    while words:
        if words[0] in ("-c", "--config"):
            words = words[2:]
        elif words[0].startswith("--config=") or words[0] == "--debug":
            words = words[1:]
        else:
            break
    return words


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _ops(ops: list[Op], model: Model) -> str:
    shown = "; ".join(op.describe(model) for op in ops[:3])
    return shown + (f" and {len(ops) - 3} more" if len(ops) > 3 else "")
