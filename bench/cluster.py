"""Throughput of 1, 2 and 3 daemons on a shared GlusterFS spool against one on a local disk.

Every row runs the real daemon(s) on a fresh spool with four interfaces whose
handler is ``/bin/true``: the daemons start (and, in cluster mode, spread the
interfaces), then ``N`` drops are renamed into the drop folders, spread over
the interfaces and the hosts' mounts, and the clock runs until every job is
in ``bak/``. The baseline is one daemon on the local disk (``syncfs``), in
the same run. The volume and its client hosts are ``tests/kit/dfs.py``'s
(root, ``glusterfs-server``); the ``syncfs`` row on GlusterFS is there only
to price ``fsync`` durability: it is not durable on FUSE.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kit.dfs import Volume

INTERFACES = ("ifa", "ifb", "ifc", "ifd")
JOBSPOOL = [sys.executable, "-m", "jobspool"]


def order(n: int) -> bytes:
    return f'<?xml version="1.0"?>\n<order id="{n}"><sku>S</sku><qty>1</qty></order>\n'.encode()


def configure(where: Path, spool: Path, node: str | None, durability: str | None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    daemon: dict[str, Any] = {"watch": "poll", "rescan": "3s", "settle": "0.3s", "grace": "2s"}
    if durability:
        daemon["durability"] = durability
    data: dict[str, Any] = {
        "spool": str(spool),
        "interfaces": {i: {"command": ["/bin/true"]} for i in INTERFACES},
        "daemon": daemon,
    }
    if node is not None:
        data["cluster"] = {"node": node, "lease": "6s"}
    path = where / "jobspool.yaml"
    path.write_text(json.dumps(data))
    return path


def done(spool: Path) -> int:
    total = 0
    for iface in INTERFACES:
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for n in os.listdir(spool / "bak" / iface) if n.endswith(",log.xml"))
    return total


def one_row(work: Path, spools: list[Path], cluster: bool, durability: str | None, n: int) -> float:
    """Seconds for ``n`` jobs through one daemon per spool path (one path per host)."""
    configs = [
        configure(work / f"node{i}", spool, f"node{i}" if cluster else None, durability)
        for i, spool in enumerate(spools)
    ]
    subprocess.run([*JOBSPOOL, "-c", str(configs[0]), "init"], check=True, capture_output=True)
    errs = [open(c.with_name("stderr"), "wb") for c in configs]  # noqa: SIM115
    procs = [
        subprocess.Popen([*JOBSPOOL, "-c", str(c), "daemon"], stdout=e, stderr=e)
        for c, e in zip(configs, errs, strict=True)
    ]
    try:
        leases = spools[0] / "state" / "leases"
        deadline = time.monotonic() + 120
        while cluster and time.monotonic() < deadline:  # every interface served, spread
            holders = set()
            for iface in INTERFACES:
                folder = leases / f"interface.{iface}"
                try:
                    gen = max(int(g) for g in os.listdir(folder) if g.isdigit())
                    record = json.loads((folder / str(gen)).read_bytes())
                except (OSError, ValueError):
                    break
                if not record["released"]:
                    holders.add(record["node"])
            else:
                if len(holders) == min(len(spools), len(INTERFACES)):
                    break
            time.sleep(0.2)
        time.sleep(1.0)  # the lanes started
        for k in range(n):  # written hidden first, then all renamed in: a burst
            folder = spools[k % len(spools)] / "incoming" / INTERFACES[k % len(INTERFACES)]
            (folder / f".b{k:06d}.xml").write_bytes(order(k))
        began = time.monotonic()
        for k in range(n):
            folder = spools[k % len(spools)] / "incoming" / INTERFACES[k % len(INTERFACES)]
            os.rename(folder / f".b{k:06d}.xml", folder / f"b{k:06d}.xml")
        while done(spools[0]) < n:
            if time.monotonic() - began > 600:
                raise RuntimeError(f"only {done(spools[0])} of {n} jobs done: see {work}")
            time.sleep(0.05)
        return time.monotonic() - began
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        for e in errs:
            e.close()


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Measure the rows; print the table; return the figures."""
    n = 200 if quick else 1000
    base = Path(tempfile.mkdtemp(prefix="jobspool-bench-cluster-"))
    rows: dict[str, float] = {}
    try:
        with Volume(base / "dfs", hosts=3) as vol:
            mounts = [h.mount for h in vol.hosts]
            local = base / "local"
            rows["1 daemon, local disk (syncfs): baseline"] = one_row(
                local, [local / "spool"], False, None, n
            )
            plan = [
                ("1 daemon, GlusterFS, fsync (auto)", 1, None),
                ("1 daemon, GlusterFS, syncfs (not durable there)", 1, "syncfs"),
                ("2 daemons, GlusterFS, fsync", 2, None),
                ("3 daemons, GlusterFS, fsync", 3, None),
            ]
            for k, (label, hosts, durability) in enumerate(plan):
                spools = [m / f"spool{k}" for m in mounts[:hosts]]
                rows[label] = one_row(base / f"row{k}", spools, True, durability, n)
            timings = vol.timings
    finally:
        shutil.rmtree(base, ignore_errors=True)
    baseline = next(iter(rows.values()))
    print(f"\ncluster throughput, {n} jobs, 4 interfaces (volume up in {timings['mounted']:.1f}s)")
    print(f"{'row':<52} {'seconds':>8} {'jobs/s':>8} {'vs local':>9}")
    for label, seconds in rows.items():
        print(f"{label:<52} {seconds:8.2f} {n / seconds:8.0f} {baseline / seconds:9.2f}")
    return {"ok": True, "jobs": n, "seconds": rows, "volume_up": timings}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
