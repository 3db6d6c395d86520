"""A finished job behind a slow handler: how long after its handler's end it is in bak.

One interface, ``concurrency: 1``, a Python handler that takes 0.5 s for a
job named ``fast-*`` and 10 s for one named ``slow-*`` (an ERP import).
Each repeat drops a fast job, then, once it is queued, a slow one behind
it. The fast job's handler writes ``time.perf_counter()`` (the monotonic
clock, the same in every process) as its last act; the clock stops when the
fast job arrives in ``bak/IFACE`` (inotify). Before the committer thread a
finished job waited for the *next* handler's end, so this read about 10 s.

Target: p99 (nearest rank, over the repeats; default 5, ``--quick`` 2) at
most 50 ms.
"""

from __future__ import annotations

from typing import Any

from bench import common
from bench.common import Inotify, Site, median, percentile, row

TARGET_MS = 50.0
SLOW_S = 10.0
MODULE = "slowhandler"
SOURCE = f"""\
\"\"\"0.5 s for fast-* jobs (stamping the end), {SLOW_S:g} s for slow-* jobs.\"\"\"

import os
import time

STAMPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stamps")


def handle(job):
    if job.name.startswith("slow"):
        time.sleep({SLOW_S})
        return
    time.sleep(0.5)
    with open(os.path.join(STAMPS, job.name), "w") as f:
        f.write(repr(time.perf_counter()))
"""


def run(quick: bool, runs: int | None) -> dict[str, Any]:
    repeats = runs or (2 if quick else 5)
    print(
        f"slow handler: a 0.5 s job with a {SLOW_S:g} s job queued behind it (concurrency 1); "
        f"its handler's end -> in bak, ms; {repeats} repeats"
    )
    work = common.scratch("slowhandler")
    site_dir = work / "site"
    site_dir.mkdir()
    (site_dir / f"{MODULE}.py").write_text(SOURCE)
    stamps = site_dir / "stamps"
    stamps.mkdir()
    site = Site(
        site_dir,
        interfaces={
            common.IFACE: {
                "schema": "order.xsd",
                "handler": f"{MODULE}:handle",
                "concurrency": 1,
                "timeout": "60s",
            }
        },
    )
    daemon = site.start()
    incoming, queue, bak = (site.folder(s) for s in ("incoming", "queue", "bak"))
    data = common.order(1)
    after: list[float] = []
    try:
        for r in range(repeats):
            fast, slow = f"fast-{r}.xml", f"slow-{r}.xml"
            common.write_hidden(incoming, [fast, slow], data)
            with Inotify(queue) as queued, Inotify(bak) as done:
                common.drop(incoming, fast)
                common.wait_arrivals(queued, queue, {fast}, 30.0, f"{fast} queued{daemon.tail()}")
                common.drop(incoming, slow)
                got = common.wait_arrivals(done, bak, {fast}, 30.0, f"{fast} in bak{daemon.tail()}")
                ended = float((stamps / fast).read_text())
                after.append((got[fast] - ended) * 1000)
                print(f"  repeat {r + 1}: in bak {after[-1]:.1f} ms after its end", flush=True)
                common.wait_arrivals(
                    done, bak, {slow}, SLOW_S + 60, f"{slow} in bak{daemon.tail()}"
                )
            daemon.alive()
    finally:
        daemon.stop()
        common.remove_tree(work)
    p99, p50 = percentile(after, 0.99), median(after)
    return {
        "rows": [
            row(
                "slow handler",
                f"fast job in bak after its end, {SLOW_S:g} s job behind: p99",
                f"{p99:.1f} ms",
                f"p50 {p50:.1f} ms",
                target=f"<= {TARGET_MS:g} ms",
                met=p99 <= TARGET_MS,
            )
        ],
        "after_end_ms": after,
        "repeats": repeats,
    }
