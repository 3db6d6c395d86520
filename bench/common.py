"""What the daemon benchmarks share: a spool of their own, the real daemon, drops, waiting.

* :class:`Site` is a configuration in a temporary directory (written as JSON,
  which is YAML), the example's order schema, a no-op Python handler module
  beside the configuration, and its spool.
* :class:`Daemon` runs ``jobspool -c CONFIG daemon`` as a subprocess, the way
  systemd does: with a ``NOTIFY_SOCKET`` bound here, so "ready" is the
  ``READY=1`` datagram, timed from the ``Popen`` call. Its stderr (JSON lines)
  goes to a file that every failure message quotes.
* :class:`Inotify` (a few lines of ctypes) tells the benchmark the moment a
  job or log is renamed into ``bak/IFACE``: no polling loop competing with the
  daemon for the two CPUs.
* :class:`Row` and :func:`print_table`: the one table ``python -m bench``
  prints at the end.

Set ``BENCH_PROFILE=DIR`` to have the benchmarks run ``py-spy record --idle``
on the daemon (throughput: one extra burst; latency: one extra series;
scale: one listing and one start at the largest size; scheduler: its
window); the raw profiles land in DIR and their top is printed. The
scheduler's figures of such a run are slowed by the sampling and are not to
be quoted; the others are taken outside the profiled runs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
JOBSPOOL = Path(sys.executable).parent / "jobspool"
ORDER_XSD = ROOT / "spool-example" / "schemas" / "order.xsd"
IFACE = "orders_in"
HANDLER_MODULE = "benchhandler"
HANDLER_SOURCE = """\
\"\"\"A no-op handler: the benchmark measures the spool, not the work.\"\"\"


def handle(job):
    pass
"""

# Everything the benchmarks make lives under one temporary directory, which
# goes when the process ends: bytecode too (PYTHONPYCACHEPREFIX), so that
# nothing is written into the checkout and the daemon does not compile its
# modules at every start.
_RUN_DIR: Path | None = None


def run_dir() -> Path:
    global _RUN_DIR
    if _RUN_DIR is None:
        _RUN_DIR = Path(tempfile.mkdtemp(prefix="jobspool-bench-"))
        atexit.register(shutil.rmtree, _RUN_DIR, ignore_errors=True)
    return _RUN_DIR


def scratch(prefix: str) -> Path:
    """A fresh directory for one benchmark, on the same file system as every other."""
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=run_dir()))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- jobs ---------------------------------------------------------------------------


def order(n: int | str, size: int = 2048) -> bytes:
    """A valid order (``spool-example/schemas/order.xsd``) of about ``size`` bytes."""
    head = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<order id="{n}">\n'
        "  <customer>ACME Tools Ltd, Goods-in, Dock 4</customer>\n  <date>2026-11-20</date>\n"
    )
    tail = "</order>\n"
    lines: list[str] = []
    i = 0
    while len(head) + sum(len(x) for x in lines) + len(tail) < size - 50:
        lines.append(f"  <line><sku>HAM-{i % 10000:04d}</sku><qty>{i % 97 + 1}</qty></line>\n")
        i += 1
    return (head + "".join(lines) + tail).encode()


def write_hidden(folder: Path, names: Iterable[str], data: bytes) -> None:
    """Write ``.NAME`` for each name, as an uploading client does before its rename."""
    for name in names:
        fd = os.open(folder / ("." + name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def drop(folder: Path, name: str) -> None:
    """The client's last step: rename ``.NAME`` to ``NAME``."""
    os.rename(folder / ("." + name), folder / name)


def empty_folder(folder: Path) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


# --- a spool --------------------------------------------------------------------------


class Site:
    """A configuration, its schema and handler module, and its spool, in ``folder``."""

    def __init__(
        self,
        folder: Path,
        interfaces: dict[str, dict[str, Any]] | None = None,
        daemon: dict[str, Any] | None = None,
        schedules: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ORDER_XSD, self.dir / "order.xsd")
        (self.dir / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
        if interfaces is None:
            interfaces = {IFACE: {"schema": "order.xsd", "handler": f"{HANDLER_MODULE}:handle"}}
        cfg: dict[str, Any] = {
            "spool": "spool",
            "interfaces": interfaces,
            # settle 0s: a file renamed in is taken at once anyway; this is
            # for files written in place. grace: a quick stop.
            "daemon": {"settle": "0s", "grace": "5s", **(daemon or {})},
        }
        if schedules:
            cfg["schedules"] = schedules
        self.config = self.dir / "jobspool.yaml"
        self.config.write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML
        self.spool = self.dir / "spool"
        self.jobspool("init")

    def env(self) -> dict[str, str]:
        drop = ("JOBSPOOL_", "PYTHONDONTWRITEBYTECODE", "NOTIFY_SOCKET", "WATCHDOG_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            XDG_CACHE_HOME=str(run_dir() / "cache"),
            PYTHONPYCACHEPREFIX=str(run_dir() / "pycache"),
        )
        return env

    def argv(self, *args: str) -> list[str]:
        return [str(JOBSPOOL), "-c", str(self.config), *args]

    def jobspool(self, *args: str, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(self.argv(*args), env=self.env(), cwd=self.dir, capture_output=True)
        if proc.returncode not in ok:
            raise SystemExit(
                f"bench: jobspool {' '.join(args)} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()[-500:]}"
            )
        return proc

    def folder(self, state: str, iface: str = IFACE) -> Path:
        return self.spool / state / iface

    def start(self, timeout: float = 120.0) -> Daemon:
        d = Daemon(self)
        d.wait_ready(timeout)
        return d


class Daemon:
    """``jobspool -c CONFIG daemon`` as a subprocess, with a notify socket of our own."""

    _count = 0

    def __init__(self, site: Site) -> None:
        Daemon._count += 1
        self.site = site
        self.stderr_path = site.dir / f"daemon-{Daemon._count}.stderr"
        sock_path = site.dir / f"notify-{Daemon._count}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(sock_path))
        env = dict(site.env(), NOTIFY_SOCKET=str(sock_path))
        self.ready_after: float | None = None
        with open(self.stderr_path, "wb") as err:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                site.argv("daemon"),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                cwd=site.dir,
            )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the ``Popen`` call to ``READY=1``."""
        deadline = self.t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                self.stop()
                raise SystemExit(f"bench: the daemon was not ready after {timeout:g}s{self.tail()}")
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if ready:
                msg = self.sock.recv(4096)
                if b"READY=1" in msg.split(b"\n"):
                    self.ready_after = time.perf_counter() - self.t0
                    return self.ready_after
            elif self.proc.poll() is not None:
                raise SystemExit(
                    f"bench: the daemon exited {self.proc.returncode} before ready{self.tail()}"
                )

    def tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- its stderr (end) ---\n" + text[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"bench: the daemon died (exit {self.proc.returncode}){self.tail()}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        return cpu_split(self.pid)

    def family_cpu(self) -> tuple[float, float]:
        """(utime, stime) of the daemon and its check workers."""
        return family_cpu(self.pid)

    def rss_mb(self) -> tuple[float, float]:
        """Resident set size now, and its peak (VmHWM), in MB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def wait_idle(self, quiet: float = 0.3, timeout: float = 60.0) -> None:
        wait_idle(self.pid, quiet, timeout)

    @contextlib.contextmanager
    def profiled(self, label: str) -> Iterator[None]:
        with profiled(self.pid, label):
            yield


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds: in Python and C, and in the kernel."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def children(pid: int) -> list[int]:
    """A process's children (the daemon's check workers, and handlers while they run)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out += [int(c) for c in text.split()]
    return out


def family_cpu(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its living children (the check workers), in seconds."""
    user, system = cpu_split(pid)
    for child in children(pid):
        with contextlib.suppress(OSError, IndexError):
            u, s = cpu_split(child)
            user, system = user + u, system + s
    return user, system


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set size (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"bench: no VmHWM for pid {pid}")


def wait_idle(pid: int, quiet: float = 0.3, timeout: float = 60.0) -> None:
    """Until a process has used no CPU for ``quiet`` seconds (it has digested its events)."""
    deadline = time.monotonic() + timeout
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# --- inotify, for the moment a file lands -----------------------------------------------

IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")


class Overflow(Exception):
    """The kernel dropped events: look at the directory instead."""


class Inotify:
    """Names arriving in one directory, with the time (``perf_counter``) we heard of them."""

    def __init__(self, directory: Path, mask: int = IN_MOVED_TO) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "inotify_init1")
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err), str(directory))
        self.fd = fd

    def read(self, timeout: float) -> list[tuple[str, float]]:
        """The names that arrived, waiting up to ``timeout`` seconds for the first."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return []
        now = time.perf_counter()
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        out = []
        pos = 0
        while pos < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            name = data[pos : pos + length].rstrip(b"\0")
            pos += length
            if mask & IN_Q_OVERFLOW:
                raise Overflow()
            if name:
                out.append((os.fsdecode(name), now))
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_arrivals(
    watch: Inotify, folder: Path, wanted: set[str], timeout: float, what: str
) -> dict[str, float]:
    """Until every name in ``wanted`` has arrived in ``folder``; their arrival times.

    If the kernel's event queue overflows, the folder is listed instead and
    the names found get the time of that listing (later than true, never
    earlier).
    """
    got: dict[str, float] = {}
    deadline = time.perf_counter() + timeout
    missing = set(wanted)
    while missing:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise SystemExit(
                f"bench: gave up after {timeout:g}s waiting for {what}: "
                f"{len(missing)} of {len(wanted)} missing (e.g. {sorted(missing)[:3]})"
            )
        try:
            events = watch.read(min(left, 0.5))
        except Overflow:
            now = time.perf_counter()
            events = [(n, now) for n in os.listdir(folder)]
        for name, t in events:
            if name in missing:
                missing.discard(name)
                got[name] = t
    return got


# --- tools from Debian -------------------------------------------------------------------


def require_commands(commands: dict[str, str]) -> None:
    """Install the Debian packages of missing commands ({command: package}) or fail clearly."""
    missing = {pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None}
    if not missing:
        return
    line = f"apt-get install -y {' '.join(sorted(missing))}"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {', '.join(sorted(missing))}: {line}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        wait = ["-o", "DPkg::Lock::Timeout=180"]  # another apt-get may be running
        argv = [*line.split()[:1], *wait, *line.split()[1:]]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # a stale package list: update once and retry
            subprocess.run(["apt-get", *wait, "update", "-q"], env=env, capture_output=True)
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode == 0 and all(shutil.which(c) for c in commands):
            return
        why = (proc.stderr or proc.stdout).strip()[-300:]
        raise SystemExit(f"bench: '{line}' failed: {why}")
    raise SystemExit(
        f"bench: {', '.join(c for c in commands if shutil.which(c) is None)} missing; "
        f"install them with: sudo {line}"
    )


# --- profiles ----------------------------------------------------------------------------


def _spy(label: str) -> tuple[list[str], Path] | None:
    """py-spy's ``record`` command line writing ``$BENCH_PROFILE/LABEL.txt``, if wanted."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        print("  (BENCH_PROFILE set but py-spy is not installed: pip install py-spy)")
        return None
    out = Path(where).absolute()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{label}.txt"
    return [spy, "record", "--idle", "--threads", "-r", "250", "-f", "raw", "-o", str(raw)], raw


def _show(raw: Path, what: str) -> None:
    if raw.exists():
        print(f"  profile of {what}: {raw}")
        for line in profile_top(raw):
            print("    " + line)


@contextlib.contextmanager
def profiled(pid: int, label: str) -> Iterator[None]:
    """``py-spy record --idle`` on ``pid`` while the block runs, if ``$BENCH_PROFILE`` is set."""
    spy = _spy(label)
    if spy is None:
        yield
        return
    argv, raw = spy
    proc = subprocess.Popen(
        [*argv, "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)  # attach before the work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        _show(raw, f"the daemon during {label}")


def profile_command(argv: list[str], label: str, env: dict[str, str], cwd: Path) -> None:
    """Run a command once under ``py-spy record`` if ``$BENCH_PROFILE`` is set."""
    spy = _spy(label)
    if spy is None:
        return
    prefix, raw = spy
    subprocess.run([*prefix, "--", *argv], env=env, cwd=cwd, capture_output=True)
    _show(raw, label)


_WAITS = ("Condition.wait", "Event.wait", "DelayedQueue.get", "_check_inotify_fd", "Queue.get")
# The bottom of every stack: threading's and click's plumbing, the command's entry.
_BASE = re.compile(
    r"^(Thread\._bootstrap|Thread\.run |<module> |main \(jobspool/|daemon \(jobspool/cli"
    r"|[^ ]+ \(click/|make_pass_decorator)"
)


def profile_top(raw: Path, n: int = 12) -> list[str]:
    """Per thread (alike ones summed): the functions with the largest inclusive share.

    ``raw`` is py-spy's ``--threads -f raw`` output: one line per distinct
    stack, ``thread (TID): NAME;frame;frame... COUNT``. Shares are of the
    thread's samples, idle ones included (a thread waiting in fsync is not
    idle to the job it works on). Threads that only wait are summed up in
    one line.
    """
    threads: dict[str, int] = {}
    waiting: dict[str, int] = {}
    inclusive: dict[tuple[str, str], int] = {}
    leaves: dict[tuple[str, str], int] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.rpartition(";")[2].replace(str(ROOT) + "/", "")
        frames = [
            re.sub(r":[0-9]+\)$", ")", f.replace(str(ROOT) + "/", "")) for f in stack.split(";")
        ]
        thread = frames[0].partition(": ")[2] or frames[0]
        thread = re.sub(r"-[0-9]+$", "-*", re.sub(r"^(schedule)-.*", r"\1-*", thread))
        threads[thread] = threads.get(thread, 0) + count
        if len(frames) > 1 and frames[-1].partition(" (")[0].endswith(_WAITS):
            waiting[thread] = waiting.get(thread, 0) + count
        leaves[(thread, leaf)] = leaves.get((thread, leaf), 0) + count
        for frame in dict.fromkeys(f for f in frames[1:] if not _BASE.match(f)):
            inclusive[(thread, frame)] = inclusive.get((thread, frame), 0) + count
    out = []
    idle = []
    busiest = max(threads.values(), default=0)
    for thread, total in sorted(threads.items(), key=lambda t: waiting.get(t[0], 0) - t[1]):
        if waiting.get(thread, 0) > 0.95 * total or total < 0.1 * busiest:
            idle.append(thread)
            continue
        out.append(f"{thread}: {total} samples; inclusive:")
        mine = sorted(
            ((c, f) for (t, f), c in inclusive.items() if t == thread), key=lambda x: -x[0]
        )
        for c, f in mine[:n]:
            out.append(f"  {100 * c / total:5.1f}%  {f[:110]}")
        out.append("  where the samples end (the line on top of the stack):")
        mine = sorted(((c, f) for (t, f), c in leaves.items() if t == thread), key=lambda x: -x[0])
        for c, f in mine[: max(3, n // 2)]:
            out.append(f"  {100 * c / total:5.1f}%  {f[:110]}")
    if idle:
        out.append(f"waiting (almost) all the time, or hardly sampled: {', '.join(idle)}")
    return out


# --- figures -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method: a value that occurred."""
    ordered = sorted(values)
    k = max(1, math.ceil(q * len(ordered)))
    return ordered[k - 1]


class Row(NamedTuple):
    """One line of the summary table."""

    benchmark: str
    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None  # None: information, no target


def row(
    benchmark: str,
    figure: str,
    value: str,
    baseline: str = "-",
    ratio: float | None = None,
    target: str = "-",
    met: bool | None = None,
) -> dict[str, Any]:
    return Row(
        benchmark, figure, value, baseline, "-" if ratio is None else f"{ratio:.2f}", target, met
    )._asdict()


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NOT MET")


def startup_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The start-up benchmark's own result as rows of the table."""
    res = result["results"]
    base = res["click"]["median_ms"]
    rows = []
    for key in ("status", "queue", "log"):
        r = res[key]
        rows.append(
            row(
                "startup",
                r["label"],
                f"{r['median_ms']:.1f} ms",
                f"import click {base:.1f} ms",
                r["ratio"],
                f"ratio <= {result['target']}",
                r["ratio"] <= result["target"],
            )
        )
    return rows


def print_table(results: dict[str, dict[str, Any]], seconds: float) -> None:
    """The one table: every benchmark's figures, baselines, ratios and targets."""
    rows: list[Row] = []
    for name, result in results.items():
        raw = startup_rows(result) if name == "startup" else result.get("rows", [])
        rows.extend(Row(**r) for r in raw)
    if not rows:
        return
    head = Row("benchmark", "figure", "value", "baseline", "ratio", "target", None)
    cells = [[*head[:6], "met?"]] + [[*r[:6], verdict(r.met)] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(7)]
    line = "  ".join("-" * w for w in widths)
    print(f"summary: {len(rows)} figures, every one a median over repeats")
    print(line)
    for i, c in enumerate(cells):
        print("  ".join(s.ljust(w) for s, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            print(line)
    print(line)
    failed = [r for r in rows if r.met is False]
    print(
        f"{sum(r.met is True for r in rows)} targets met, {len(failed)} NOT MET; "
        f"{len(results)} benchmarks in {seconds:.0f} s; load average now "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
