"""Throughput: jobs dropped into a drop folder at once, until all are in bak with their log.

Each job is a valid order of about 2 KB (``spool-example/schemas/order.xsd``),
written as ``.NAME`` and renamed to ``NAME`` (the way WinSCP, rsync and careful
scripts upload), checked against the XSD, handed to a no-op in-process
Python handler, and finished durably (the daemon's only mode): log into
``bak/IFACE``, then the job. The clock runs from the first rename to the
moment the last job *and* its log have arrived in ``bak/IFACE`` (inotify on
that folder, so the benchmark does not poll).

Baselines, in the same run and interleaved with it (repeat by repeat):

* **the filesystem floor** (``bench/floor.py``): only the renames, writes and
  syncs any durable spool must do per job, synced per job, and with one
  ``syncfs`` per batch of 64; three runs of each per repeat, because a
  ``syncfs`` costs whatever else the machine has left unwritten;
* **the floor doing each job's own work**: the batched floor loop that also
  checks each job with jobspool's check and writes its real job log, in its
  one thread: what any implementation of the spool must spend, so that the
  daemon's CPU over it is what the daemon itself adds (threads, the GIL,
  bookkeeping, log lines); reported beside the target, not a target;
* **the shell loop** a sysadmin would write instead: ``inotifywait -m`` piped
  into a bash loop that runs ``xmllint --noout --schema`` and ``mv`` per file
  (no log, no sync).

Targets: at least 0.6 x the floor synced per job, 0.7 x the batched floor,
at least 10 x the shell loop; and the daemon's CPU time per job (user +
system of the daemon *and its check worker processes*, from /proc, over the
N=1,000 burst) at most 1.5 x the batched floor loop's CPU time per job
(``getrusage`` of this process around the loop). The CPU of the daemon's own
process alone is reported beside it.

The same runs give the depth series for the plot: N = 100, 1,000, 5,000
jobs dropped at once (``--quick``: 100 and 1,000), and one extra job dropped
right behind them, whose latency (its rename to its arrival in bak) is the
latency at queue depth N. For each burst the daemon's CPU time (utime +
stime from /proc) over the wall time is reported, and the kernel's share of
it: at about 100 % of one core the daemon is bound by its own CPU (and the
GIL), well below it by the disk.

With ``BENCH_PROFILE=DIR`` one more burst of the largest N runs under
``py-spy record --idle`` (not counted in the figures).

``python -m bench.throughput RESULTS.json PNG`` draws the plot of
``docs/bench-depth.png`` from the results ``python -m bench --json`` wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench import common, floor
from bench.common import Inotify, Site, median, row

FLOOR_TARGET = 0.6  # against the floor synced per job
BATCH_TARGET = 0.7  # against the batched floor
CPU_TARGET = 1.5  # the daemon's CPU per job over the batched floor loop's
SHELL_TARGET = 10.0
N = 1000  # the headline figure's batch
DEPTHS = (100, 1000, 5000)
QUICK_DEPTHS = (100, 1000)
FLOOR_RUNS = 3  # floor runs per repeat, of each kind
SHELL_JOBS = 1000
QUICK_SHELL_JOBS = 200

SHELL_LOOP = r"""
# The drop-folder loop a sysadmin would write: check each arrival, move it on.
in=$1 bak=$2 err=$3 xsd=$4
inotifywait -m -e moved_to,close_write "$in" | while read -r dir events f; do
  case $f in .*) continue ;; esac   # uploads in progress
  [ -f "$in/$f" ] || continue
  if xmllint --noout --schema "$xsd" "$in/$f" 2>/dev/null; then
    mv "$in/$f" "$bak/"
  else
    mv "$in/$f" "$err/"
  fi
done
"""


def run(quick: bool, runs: int | None) -> dict[str, Any]:
    common.require_commands({"inotifywait": "inotify-tools", "xmllint": "libxml2-utils"})
    repeats = runs or (2 if quick else 3)
    depths = QUICK_DEPTHS if quick else DEPTHS
    shell_jobs = QUICK_SHELL_JOBS if quick else SHELL_JOBS
    work = common.scratch("throughput")
    data = common.order(1)
    print(
        f"throughput: {len(data)}-byte orders checked against order.xsd, no-op Python handler, "
        f"durable; {repeats} repeats, interleaved with the baselines"
    )

    site = Site(work / "site")
    daemon = site.start()
    shell = ShellLoop(work / "shell")
    tree = floor.Tree(work / "floor")
    samples: dict[str, list[float]] = {
        "floor_synced": [],
        "floor_batch": [],
        "floor_work": [],
        "shell": [],
    }
    floor_cpu: list[float] = []  # CPU seconds per job of the batched floor loop
    work_cpu: list[float] = []  # the same, doing each job's check and log too
    own_work = floor.checked_log(common.ORDER_XSD, common.IFACE)
    job_cpu: dict[int, list[float]] = {d: [] for d in depths}  # the daemon's, with its workers
    main_cpu: dict[int, list[float]] = {d: [] for d in depths}  # its own process only
    behind: dict[int, list[float]] = {d: [] for d in depths}
    rate: dict[int, list[float]] = {d: [] for d in depths}
    cpu: dict[int, list[float]] = {d: [] for d in depths}
    kernel: dict[int, list[float]] = {d: [] for d in depths}
    try:
        for r in range(repeats):
            names = [f"floor-{r}-{i:05d}.xml" for i in range(N)]
            for _ in range(FLOOR_RUNS):  # cheap, and syncfs varies with the machine's I/O
                for key, batch, per_job, cpu_of in (
                    ("floor_synced", None, None, None),
                    ("floor_batch", floor.BATCH, None, floor_cpu),
                    ("floor_work", floor.BATCH, own_work, work_cpu),
                ):
                    tree.fill(names, data)
                    wall, used = floor.run_jobs_cpu(tree, names, batch, per_job)
                    samples[key].append(N / wall)
                    if cpu_of is not None:
                        cpu_of.append(used / N)
                    tree.clear()
            for depth in depths:
                burst = drop_batch(site, daemon, f"r{r}d{depth}", depth, data)
                rate[depth].append(burst.jobs_per_s)
                behind[depth].append(burst.extra_latency)
                cpu[depth].append(burst.cpu)
                kernel[depth].append(burst.kernel)
                job_cpu[depth].append(burst.cpu_per_job)
                main_cpu[depth].append(burst.main_cpu_per_job)
            samples["shell"].append(shell.run(f"r{r}", shell_jobs, data))
            print(
                f"  repeat {r + 1}: floor {median(samples['floor_synced'][-FLOOR_RUNS:]):.0f} / "
                f"{median(samples['floor_batch'][-FLOOR_RUNS:]):.0f} jobs/s, daemon "
                + ", ".join(f"N={d}: {rate[d][-1]:.0f} jobs/s" for d in depths)
                + f", shell loop {samples['shell'][-1]:.1f} jobs/s",
                flush=True,
            )
        if os.environ.get("BENCH_PROFILE"):
            drop_batch(site, daemon, "profiled", max(depths), data, profile="throughput")
    finally:
        daemon.stop()
        shell.stop()
        common.remove_tree(work)

    fl_sync, fl_batch = median(samples["floor_synced"]), median(samples["floor_batch"])
    fl_work = median(samples["floor_work"])
    sh = median(samples["shell"])
    main = median(rate[N])
    print(f"\n  {'':<44} {'jobs/s':>8}  {'daemon / it':>11}")
    print(f"  {'daemon, N=' + str(N):<44} {main:8.0f}")
    for label, v in (
        ("floor, synced per job", fl_sync),
        (f"floor, one syncfs per {floor.BATCH} jobs", fl_batch),
        ("the same, with each job's check and log", fl_work),
        (f"shell loop (inotifywait + xmllint), N={shell_jobs}", sh),
    ):
        print(f"  {label:<44} {v:8.1f}  {main / v:10.2f}x")
    print("\n  depth series (median): N dropped at once -> jobs/s; latency of one job behind them")
    series = []
    for d in depths:
        j, lat, c, k = median(rate[d]), median(behind[d]), median(cpu[d]), median(kernel[d])
        series.append(
            {
                "depth": d,
                "jobs_per_s": j,
                "latency_behind_ms": lat * 1000,
                "cpu_pct": c * 100,
                "kernel_share": k,
            }
        )
        print(
            f"  N={d:<6} {j:8.0f} jobs/s   extra job's latency {lat * 1000:9.0f} ms   "
            f"daemon CPU {c * 100:4.0f}% of one core, {k * 100:.0f}% of it in the kernel"
        )

    fcpu, dcpu, mcpu = median(floor_cpu), median(job_cpu[N]), median(main_cpu[N])
    wcpu = median(work_cpu)
    print(
        f"\n  CPU per job (user + system), N={N}: daemon with its check workers "
        f"{dcpu * 1000:.2f} ms ({mcpu * 1000:.2f} ms in its own process), batched floor loop "
        f"{fcpu * 1000:.2f} ms: {dcpu / fcpu:.2f}x; the floor loop doing each job's check "
        f"and log {wcpu * 1000:.2f} ms: {dcpu / wcpu:.2f}x"
    )
    # The floor moves with the file system's state (docs/benchmarks.rst): say how far.
    print(
        f"  the floor loop's CPU per job over this run: {min(floor_cpu) * 1000:.2f} to "
        f"{max(floor_cpu) * 1000:.2f} ms; with the check and log {min(work_cpu) * 1000:.2f} "
        f"to {max(work_cpu) * 1000:.2f} ms"
    )
    rows = [
        row(
            "throughput",
            f"daemon vs floor synced per job (N={N})",
            f"{main:.0f} jobs/s",
            f"{fl_sync:.0f} jobs/s",
            main / fl_sync,
            f">= {FLOOR_TARGET}x",
            main / fl_sync >= FLOOR_TARGET,
        ),
        row(
            "throughput",
            f"daemon vs floor 1 sync/{floor.BATCH} jobs",
            f"{main:.0f} jobs/s",
            f"{fl_batch:.0f} jobs/s",
            main / fl_batch,
            f">= {BATCH_TARGET}x",
            main / fl_batch >= BATCH_TARGET,
        ),
        row(
            "throughput",
            "daemon vs the same floor doing the job's own work",
            f"{main:.0f} jobs/s",
            f"floor + check + log {fl_work:.0f} jobs/s",
            main / fl_work,
        ),
        row(
            "throughput",
            f"CPU/job, daemon + check workers (N={N})",
            f"{dcpu * 1000:.2f} ms",
            f"floor loop {fcpu * 1000:.2f} ms",
            dcpu / fcpu,
            f"<= {CPU_TARGET}x",
            dcpu / fcpu <= CPU_TARGET,
        ),
        row(
            "throughput",
            f"CPU/job, daemon process alone (N={N})",
            f"{mcpu * 1000:.2f} ms",
            f"floor loop {fcpu * 1000:.2f} ms",
            mcpu / fcpu,
        ),
        row(
            "throughput",
            "CPU/job, same, vs the job's own work",
            f"{dcpu * 1000:.2f} ms",
            f"floor + check + log {wcpu * 1000:.2f} ms",
            dcpu / wcpu,
        ),
        row(
            "throughput",
            f"daemon vs shell loop (N={shell_jobs})",
            f"{main:.0f} jobs/s",
            f"{sh:.1f} jobs/s",
            main / sh,
            f">= {SHELL_TARGET:g}x",
            main / sh >= SHELL_TARGET,
        ),
    ]
    for s in series:
        if s["depth"] != N:
            figure = f"daemon, N={s['depth']} at once"
            rows.append(row("throughput", figure, f"{s['jobs_per_s']:.0f} jobs/s"))
    return {
        "rows": rows,
        "jobs_per_s": {str(d): v for d, v in rate.items()},
        "latency_behind_s": {str(d): v for d, v in behind.items()},
        "cpu": {str(d): v for d, v in cpu.items()},
        "floor_synced": samples["floor_synced"],
        "floor_batch": samples["floor_batch"],
        "floor_work": samples["floor_work"],
        "floor_cpu_per_job_s": floor_cpu,
        "floor_work_cpu_per_job_s": work_cpu,
        "cpu_per_job_s": {str(d): v for d, v in job_cpu.items()},
        "main_cpu_per_job_s": {str(d): v for d, v in main_cpu.items()},
        "shell": samples["shell"],
        "series": series,
        "job_bytes": len(data),
        "repeats": repeats,
    }


class Batch(NamedTuple):
    """One burst: N jobs dropped at once, and one more right behind them."""

    jobs_per_s: float  # N over the time until the last of them is in bak
    extra_latency: float  # seconds from the extra job's drop to its arrival in bak
    cpu: float  # the daemon's CPU seconds over wall seconds, while the N were handled
    kernel: float  # the share of that CPU time spent in the kernel (stime)
    cpu_per_job: float  # CPU seconds per job of the daemon and its check workers
    main_cpu_per_job: float  # CPU seconds per job of the daemon's own process


def drop_batch(
    site: Site, daemon: common.Daemon, tag: str, n: int, data: bytes, profile: str | None = None
) -> Batch:
    """Drop ``n`` jobs at once and one more behind them; time them into bak."""
    incoming, bak = site.folder("incoming"), site.folder("bak")
    names = [f"{tag}-{i:05d}.xml" for i in range(n)]
    extra = f"{tag}-extra.xml"
    common.write_hidden(incoming, [*names, extra], data)
    daemon.wait_idle()  # it has looked at (and ignored) the .NAME files
    wanted = {*names, *(common_log(x) for x in names), extra, common_log(extra)}
    spy = daemon.profiled(profile) if profile else contextlib.nullcontext()
    with spy, Inotify(bak) as watch:
        user0, sys0 = daemon.cpu_split()
        fam0 = sum(daemon.family_cpu())
        t0 = time.perf_counter()
        for name in names:
            common.drop(incoming, name)
        common.drop(incoming, extra)
        t_extra = time.perf_counter()
        got = common.wait_arrivals(
            watch, bak, wanted, max(60.0, n / 20), f"{n} jobs in {bak}{daemon.tail()}"
        )
        user1, sys1 = daemon.cpu_split()
        fam1 = sum(daemon.family_cpu())
    daemon.alive()
    cpu, kernel = (user1 - user0) + (sys1 - sys0), sys1 - sys0
    done = max(got[x] for x in wanted if not x.startswith(extra))
    common.empty_folder(bak)
    wall = max(got.values()) - t0
    return Batch(
        n / (done - t0),
        max(got[extra], got[common_log(extra)]) - t_extra,
        cpu / wall,
        kernel / cpu if cpu else 0.0,
        (fam1 - fam0) / (n + 1),
        cpu / (n + 1),
    )


def common_log(name: str) -> str:
    return name + ",log.xml"


class ShellLoop:
    """The bash + inotifywait + xmllint loop, running in a process group of its own."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.incoming, self.bak, self.err = (folder / d for d in ("incoming", "bak", "err"))
        for d in (self.incoming, self.bak, self.err):
            d.mkdir(parents=True)
        xsd = folder / "order.xsd"
        xsd.write_bytes(common.ORDER_XSD.read_bytes())
        script = folder / "loop.sh"
        script.write_text(SHELL_LOOP)
        self.stderr = folder / "loop.stderr"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                ["bash", str(script), str(self.incoming), str(self.bak), str(self.err), str(xsd)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while b"Watches established" not in self.stderr.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"bench: the shell loop did not start: {self.stderr.read_text()}")
            time.sleep(0.02)

    def run(self, tag: str, n: int, data: bytes) -> float:
        names = [f"{tag}-{i:05d}.xml" for i in range(n)]
        common.write_hidden(self.incoming, names, data)
        time.sleep(0.5)  # it has read (and skipped) the .NAME events
        with Inotify(self.bak) as watch:
            t0 = time.perf_counter()
            for name in names:
                common.drop(self.incoming, name)
            got = common.wait_arrivals(
                watch, self.bak, set(names), max(60.0, n / 5), f"{n} jobs from the shell loop"
            )
        if os.listdir(self.err):
            raise SystemExit(f"bench: the shell loop rejected jobs: {os.listdir(self.err)[:3]}")
        common.empty_folder(self.bak)
        return n / (max(got.values()) - t0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


# --- the plot ----------------------------------------------------------------------------


def plot(results: dict[str, Any], out: Path) -> None:
    """Throughput and latency against queue depth, from ``python -m bench --json`` results.

    Needs matplotlib (``pip install -e '.[bench]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench: the plot needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tp = results["throughput"]
    series = tp["series"]
    depths = [s["depth"] for s in series]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))

    left.plot(depths, [s["jobs_per_s"] for s in series], "o-", label="jobspool daemon")
    for key, label, style in (
        ("floor_batch", f"floor, 1 syncfs per {floor.BATCH} jobs", ":"),
        ("floor_synced", "floor, synced per job", "--"),
        ("shell", "shell loop (inotifywait + xmllint)", "-."),
    ):
        value = median(tp[key])
        left.axhline(value, linestyle=style, color="grey", label=f"{label}: {value:.0f}")
    for value, label in (
        (FLOOR_TARGET * median(tp["floor_batch"]), f"target {FLOOR_TARGET} x batch floor"),
        (SHELL_TARGET * median(tp["shell"]), f"target {SHELL_TARGET:g} x shell loop"),
    ):
        left.axhline(value, linestyle="--", color="tab:red", linewidth=0.8)
        left.annotate(
            f"{label}: {value:.0f}", (depths[0], value), fontsize=7, color="tab:red", va="bottom"
        )
    left.set_xscale("log")
    left.set_ylim(0, None)
    left.set_xlabel("jobs dropped at once (N)")
    left.set_ylabel("jobs/s until all N are in bak")
    left.set_title("Throughput")
    left.legend(fontsize=7, loc="center right")

    lat_x = list(depths)
    lat_y = [s["latency_behind_ms"] for s in series]
    if "latency" in results:
        lat = results["latency"]
        lat_x.insert(0, 0)
        lat_y.insert(0, median(lat["p50_ms"]["renamed"]))
    right.plot([max(x, 1) for x in lat_x], lat_y, "o-", label="one job behind N queued")
    right.axhline(50, linestyle="--", color="grey", label="target p99, one at a time (50 ms)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.set_xlabel("jobs ahead of it (N; 0 plotted at 1: one at a time, p50)")
    right.set_ylabel("ms from its drop to bak")
    right.set_title("Latency")
    right.legend(fontsize=8)

    fig.suptitle(
        "jobspool daemon, 2 KB orders, XSD check, no-op handler, durable (medians)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot written to {out}")


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Plot throughput and latency against queue depth from bench --json results.",
    )
    parser.add_argument("results", type=Path, help="the file python -m bench --json wrote")
    parser.add_argument("png", type=Path, help="where to write the plot (docs/bench-depth.png)")
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.png)
