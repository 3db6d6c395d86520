"""Scale: the read commands and the daemon's start with 100,000 and 1,000,000 jobs queued.

The jobs are written straight into ``queue/orders_in`` (no submit, no check:
only the queue's size matters here), as empty files named
``job-NNNNNNN.xml`` with distinct mtimes one microsecond apart (the mtime is
a job's place in the queue). Empty, because what is measured never reads a
job, and a million one-block files would take 4 GB. ``orders_in`` is
paused, so the daemon queues them all but processes none: that is the
demanding case, since its lane keeps the whole queue in memory. For
information the same queue is also measured as an ``_out`` interface's
(jobs waiting to be fetched: the daemon only scans them), by renaming the
queue folder between the two interfaces while no daemon runs.

Figures, each against a spool holding one job (same configuration, same
commands, interleaved):

* ``jobspool status JOB``: wall time of the command; target "unchanged"
  (ratio at most 1.1, the noise of the start-up benchmark);
* ``jobspool queue IFACE``: wall time of the listing, read through a pipe;
  for comparison ``ls -tr`` of the folder; target at most 3 s. The CPU
  time of each (user + system, the listing's helper processes included)
  is shown beside it: the listing shares its ``stat`` calls among the CPUs;
* the daemon's start-up: ``Popen`` to ``READY=1`` on a ``NOTIFY_SOCKET``
  bound by the benchmark; target at most 10 s;
* the daemon's resident set size (VmRSS of /proc/PID/status) half a second
  after READY, and its peak (VmHWM); target at most 300 MB.

Targets are for 1,000,000 jobs; ``--quick`` stops at 100,000 and says so.
Everything is on the file system of the temporary directory, with a warm
page cache (the files were just created). The files are removed at the end.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Site, median, row

SIZES = (100_000, 1_000_000)
QUICK_SIZES = (100_000,)
STATUS_RUNS = 20
QUICK_STATUS_RUNS = 10
STATUS_TARGET = 1.1
LIST_TARGET_S = 3.0
START_TARGET_S = 10.0
RSS_TARGET_MB = 300.0
OUT = "orders_out"
JOB = "job-0000000.xml"  # in both spools: the same name, the same lookups

INTERFACES = {
    common.IFACE: {"schema": "order.xsd", "handler": f"{common.HANDLER_MODULE}:handle"},
    OUT: {"schema": "order.xsd"},
}


def run(quick: bool, runs: int | None) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    repeats = runs or (2 if quick else 3)
    status_runs = QUICK_STATUS_RUNS if quick else STATUS_RUNS
    work = common.scratch("scale")
    print(
        f"scale: jobs queued on a paused interface (and, for information, an _out one); "
        f"{repeats} repeats, status {status_runs} runs, against a spool with one job"
    )
    if quick:
        print("  --quick: 1,000,000 jobs skipped; the targets are for 1,000,000")
    small = Site(work / "small", INTERFACES)
    big = Site(work / "big", INTERFACES)
    for site in (small, big):
        site.jobspool("pause", common.IFACE)
        site.jobspool("status", "x.xml", ok=(2,))  # warms the configuration cache
    fill(small.folder("queue"), 0, 1)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    have = 0
    try:
        for size in sizes:
            t0 = time.perf_counter()
            fill(big.folder("queue"), have, size)
            have = size
            took = time.perf_counter() - t0
            print(f"  {size:,} jobs queued ({took:.0f} s to create)", flush=True)
            res = measure(small, big, size, repeats, status_runs)
            if size == sizes[-1]:
                profile(big, size)
            results[str(size)] = res
            rows += table_rows(size, res, size == SIZES[-1])
    finally:
        t0 = time.perf_counter()
        common.remove_tree(work)
        print(f"  removed ({time.perf_counter() - t0:.0f} s)")
    if quick:
        rows.append(row("scale", "1,000,000 jobs queued", "skipped (--quick)"))
    return {"rows": rows, "sizes": results, "repeats": repeats, "quick_skipped_1m": quick}


def fill(folder: Path, start: int, stop: int) -> None:
    """Empty job files ``start`` to ``stop - 1``, mtimes 1 us apart, a day ago onwards."""
    base = time.time_ns() - 86_400 * 10**9
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        for i in range(start, stop):
            fd = os.open(f"job-{i:07d}.xml", flags, 0o640, dir_fd=dfd)
            try:
                t = base + i * 1000
                os.utime(fd, ns=(t, t))
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, bytes]:
    elapsed, _, out = timed_cpu(argv, env, cwd)
    return elapsed, out


def timed_cpu(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, bytes]:
    """Wall time, CPU time (user + system, with every process it waited for), output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip()[-300:]
        raise SystemExit(f"bench: {' '.join(argv)} exited {proc.returncode}: {why}")
    return elapsed, cpu, proc.stdout


def measure(small: Site, big: Site, size: int, repeats: int, status_runs: int) -> dict[str, Any]:
    status: dict[str, list[float]] = {"small": [], "big": []}
    for i in range(status_runs):
        order = (("small", small), ("big", big)) if i % 2 == 0 else (("big", big), ("small", small))
        for key, site in order:
            t, out = timed(site.argv("status", JOB), site.env(), site.dir)
            if out != f"queue/{common.IFACE}\n".encode():
                raise SystemExit(f"bench: status said {out!r}")
            status[key].append(t)

    listing: dict[str, list[float]] = {"jobspool": [], "ls": []}
    listing_cpu: dict[str, list[float]] = {"jobspool": [], "ls": []}
    env = dict(big.env(), LC_ALL="C")
    for _ in range(repeats):
        t, cpu, out = timed_cpu(big.argv("queue", common.IFACE), big.env(), big.dir)
        listed = out.count(b"\n")
        if listed != size or not out.startswith(JOB.encode()):
            raise SystemExit(f"bench: jobspool queue listed {listed} jobs, not {size}")
        listing["jobspool"].append(t)
        listing_cpu["jobspool"].append(cpu)
        t, cpu, out = timed_cpu(["ls", "-tr", str(big.folder("queue"))], env, big.dir)
        listing["ls"].append(t)
        listing_cpu["ls"].append(cpu)

    start: dict[str, dict[str, list[float]]] = {
        k: {"ready_s": [], "rss_mb": [], "peak_mb": []} for k in ("small", "big", "out")
    }
    for _ in range(repeats):
        for key, site in (("small", small), ("big", big)):
            sample(site, start[key])
    swap_queue(big)  # the same queue as an _out interface's, for information
    try:
        for _ in range(repeats):
            sample(big, start["out"])
    finally:
        swap_queue(big)

    med: dict[str, Any] = {
        "status_s": {k: median(v) for k, v in status.items()},
        "list_s": {k: median(v) for k, v in listing.items()},
        "list_cpu_s": {k: median(v) for k, v in listing_cpu.items()},
        "start": {k: {f: median(v) for f, v in d.items()} for k, d in start.items()},
    }
    s, b = med["status_s"]["small"] * 1000, med["status_s"]["big"] * 1000
    print(f"    status JOB            {b:8.1f} ms   (1 job queued: {s:.1f} ms; ratio {b / s:.2f})")
    lj, ls = med["list_s"]["jobspool"], med["list_s"]["ls"]
    cj, cl = med["list_cpu_s"]["jobspool"], med["list_cpu_s"]["ls"]
    print(
        f"    queue IFACE           {lj:8.2f} s    (ls -tr: {ls:.2f} s; "
        f"CPU time {cj:.2f} s, ls -tr {cl:.2f} s)"
    )
    for key, label in (("big", "paused inbound"), ("out", "_out, information")):
        st, sm = med["start"][key], med["start"]["small"]
        print(
            f"    daemon start ({label + ')':<19} {st['ready_s']:6.2f} s to READY, "
            f"RSS {st['rss_mb']:.0f} MB, peak {st['peak_mb']:.0f} MB "
            f"(1 job: {sm['ready_s']:.2f} s, {sm['rss_mb']:.0f} MB)"
        )
    return {
        "median": med,
        "status_s": status,
        "list_s": listing,
        "list_cpu_s": listing_cpu,
        "start": start,
    }


def profile(site: Site, size: int) -> None:
    """With $BENCH_PROFILE: the listing and the daemon's start under py-spy."""
    common.profile_command(site.argv("queue", common.IFACE), f"queue-{size}", site.env(), site.dir)
    if os.environ.get("BENCH_PROFILE"):
        d = common.Daemon(site)
        try:
            with d.profiled(f"start-{size}"):
                d.wait_ready(300)
        finally:
            d.stop()


def sample(site: Site, into: dict[str, list[float]]) -> None:
    """Start the daemon, wait for READY, read its memory, stop it."""
    d = common.Daemon(site)
    try:
        into["ready_s"].append(d.wait_ready(300))
        time.sleep(0.5)
        rss, peak = d.rss_mb()
        into["rss_mb"].append(rss)
        into["peak_mb"].append(peak)
    finally:
        d.stop()


def swap_queue(site: Site) -> None:
    """Exchange the queue folders of orders_in and orders_out (three renames)."""
    a, b = site.folder("queue"), site.folder("queue", OUT)
    tmp = a.with_name(".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def table_rows(size: int, res: dict[str, Any], targets: bool) -> list[dict[str, Any]]:
    """Rows for one size; the targets are judged at the largest size only."""
    med = res["median"]
    n = f"{size:,}"
    s, b = med["status_s"]["small"] * 1000, med["status_s"]["big"] * 1000
    lj, ls = med["list_s"]["jobspool"], med["list_s"]["ls"]
    st, sm, out = med["start"]["big"], med["start"]["small"], med["start"]["out"]

    def judged(ok: bool) -> bool | None:
        return ok if targets else None

    def target(text: str) -> str:
        return text if targets else f"({text} at 1M)"

    return [
        row(
            "scale",
            f"status JOB, {n} queued",
            f"{b:.1f} ms",
            f"1 queued {s:.1f} ms",
            b / s,
            target(f"ratio <= {STATUS_TARGET}"),
            judged(b / s <= STATUS_TARGET),
        ),
        row(
            "scale",
            f"queue IFACE listing, {n}",
            f"{lj:.2f} s",
            f"ls -tr {ls:.2f} s",
            lj / ls,
            target(f"<= {LIST_TARGET_S:g} s"),
            judged(lj <= LIST_TARGET_S),
        ),
        row(
            "scale",
            f"daemon start to READY, {n} (paused)",
            f"{st['ready_s']:.2f} s",
            f"1 queued {sm['ready_s']:.2f} s",
            st["ready_s"] / sm["ready_s"],
            target(f"<= {START_TARGET_S:g} s"),
            judged(st["ready_s"] <= START_TARGET_S),
        ),
        row(
            "scale",
            f"daemon RSS after start, {n} (paused)",
            f"{st['rss_mb']:.0f} MB (peak {st['peak_mb']:.0f})",
            f"1 queued {sm['rss_mb']:.0f} MB",
            st["rss_mb"] / sm["rss_mb"],
            target(f"<= {RSS_TARGET_MB:g} MB"),
            judged(st["rss_mb"] <= RSS_TARGET_MB),
        ),
        row(
            "scale",
            f"daemon start / RSS, {n} as _out",
            f"{out['ready_s']:.2f} s / {out['rss_mb']:.0f} MB",
        ),
    ]
