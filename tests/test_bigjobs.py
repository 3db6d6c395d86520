"""Real workloads through the real daemon: huge stock exports and slow handlers.

A stock export of hundreds of MB is checked as it streams, in a worker
process off the daemon's main loop: the daemon's own peak memory stays
bounded, systemd's watchdog keeps being fed, and small jobs on other
interfaces keep flowing while it is checked. A bad item near the end of a
huge file is reported with its own line; a truncated one is rejected. A job
whose handler has ended is committed at once, not when the next (slow)
handler ends. ``jobspool check`` and ``submit`` on such files stay in
bounded memory too.

The files are written a block of identical items at a time (hundreds of MB
per second), never built item by item in Python.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit import DEADLINE, STOCK_XSD, Site, measured, order, vm_hwm

MB = 1 << 20


HEAD = b'<?xml version="1.0" encoding="UTF-8"?>\n<stock warehouse="Leeds-2">\n'  # two lines
TAIL = b"</stock>\n"


def item(qty: str = "12") -> bytes:
    """One item, one line."""
    return (
        f'  <item n="1"><sku>HAM-0001</sku><name>Claw hammer, 450 g, fibreglass handle</name>'
        f"<qty>{qty}</qty><bin>A-01-03</bin></item>\n"
    ).encode()


BLOCK_ITEMS = 8192
BLOCK = item() * BLOCK_ITEMS  # about 1 MB


def stock_export(
    path: Path, size: int, bad_line: int | None = None, truncate: bool = False
) -> Path:
    """A stock export of at least ``size`` bytes, written a block of items at a time.

    ``bad_line``: the item on that line (counting from 1; items start on line
    3) has a quantity the schema refuses, and a few valid items follow it.
    ``truncate``: the file ends in the middle of an item, without its root's end.
    """
    blocks = -(-size // len(BLOCK))
    with open(path, "wb") as f:
        f.write(HEAD)
        if bad_line is None:
            for _ in range(blocks):
                f.write(BLOCK)
        else:
            before = bad_line - 3  # valid items before the bad one
            assert before >= 0
            full, rest = divmod(before, BLOCK_ITEMS)
            for _ in range(full):
                f.write(BLOCK)
            f.write(item() * rest + item("many") + item() * 5)
        if truncate:
            f.write(item()[:40])
        else:
            f.write(TAIL)
    return path


def stock_site(site: Site, **interfaces: dict[str, object]) -> Site:
    """``stock_in`` (the stock schema, ``max_size: 2GB``) and ``orders_in`` (orders)."""
    (site.dir / "schemas" / "stock.xsd").write_text(STOCK_XSD)
    site.configure(
        {
            "stock_in": {
                "schema": "schemas/stock.xsd",
                "command": ["/bin/true"],
                "max_size": "2GB",
            },
            "orders_in": {"schema": "schemas/order.xsd", "command": ["/bin/true"]},
            **interfaces,
        },
        check_workers=2,
    )
    site.init()
    return site


def children(pid: int) -> list[int]:
    """The daemon's child processes (its check workers, and handlers while they run)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        out += [int(c) for c in text.split()]
    return out


class Notified:
    """A daemon started as systemd starts it: ``$NOTIFY_SOCKET`` bound here, a watchdog."""

    def __init__(self, site: Site, watchdog_usec: int = 1_000_000) -> None:
        self.site = site
        path = site.dir / "notify.sock"
        assert len(os.fsencode(path)) < 108, "tmp_path too long for a Unix socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.pings: list[float] = []  # monotonic times of WATCHDOG=1, as we read them
        self.ready = False
        env = {**site.env(), "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": str(watchdog_usec)}
        self.stderr = site.dir / "notified-daemon.stderr"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                site.command("daemon"),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                cwd=site.dir,
            )
        self.pid = self.proc.pid
        self.wait_for(lambda: self.ready, "READY=1")

    def drain(self) -> None:
        """Read every datagram that has arrived, stamping each watchdog ping."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            lines = data.decode(errors="replace").splitlines()
            if "WATCHDOG=1" in lines:
                self.pings.append(time.monotonic())
            if "READY=1" in lines:
                self.ready = True

    def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = DEADLINE
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if condition():
                return
            assert self.proc.poll() is None, f"the daemon exited\n{self.text()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:g}s\n{self.text()}"
            time.sleep(0.02)

    def text(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.sock.close()


@pytest.fixture
def notified(site: Site) -> Iterator[Notified]:
    stock_site(site)
    daemon = Notified(site)
    yield daemon
    daemon.stop()


def test_a_300mb_export_is_handled_in_bounded_memory_while_the_rest_flows(
    site: Site, notified: Notified
) -> None:
    big = stock_export(site.outside / "stock-all.xml", 300 * MB)
    # Idle, but warm: one small job has gone through every step.
    site.drop("orders_in", "warm.xml")
    notified.wait_for(lambda: site.ls("bak", "orders_in"), "warm.xml in bak")
    idle_kb = vm_hwm(notified.pid)

    os.rename(big, site.root / "incoming" / "stock_in" / big.name)
    dropped = time.monotonic()
    small_done = 0
    # While the export is checked, small orders dropped on another interface
    # go all the way to bak/, one after the other.
    while not site.where("stock-all.xml") or site.where("stock-all.xml")[0].startswith("incoming"):
        name = f"small-{small_done}.xml"
        site.drop("orders_in", name)
        notified.wait_for(functools.partial(_in_bak, site, name), f"{name} in bak")
        if site.where("stock-all.xml")[0].startswith("incoming"):
            small_done += 1
        time.sleep(0.1)
    checked = time.monotonic()
    notified.wait_for(
        lambda: "stock-all.xml" in site.ls("bak", "stock_in"), "the export in bak", timeout=300
    )
    assert site.status("stock-all.xml") == "bak/stock_in"
    assert small_done >= 3, f"only {small_done} small jobs were done while the export was checked"

    # The daemon never held the export in memory: its peak grew by far less than its size.
    peak_kb = vm_hwm(notified.pid)
    assert peak_kb - idle_kb < 100 * 1024, (idle_kb, peak_kb)
    for worker in children(notified.pid):  # and neither did a check worker
        assert vm_hwm(worker) < 150 * 1024, (worker, vm_hwm(worker))

    # WATCHDOG_USEC=1s: a ping every 0.5 s, all through the check.
    during = [t for t in notified.pings if dropped <= t <= checked]
    gaps = [b - a for a, b in zip([dropped, *during], [*during, checked], strict=True)]
    assert max(gaps) < 5.0, f"the watchdog went {max(gaps):.1f}s without a ping"


def test_a_bad_item_near_the_end_of_a_huge_file_is_rejected_with_its_line(
    site: Site, notified: Notified
) -> None:
    bad_line = (100 * MB // len(item())) + 7
    big = stock_export(site.outside / "stock-bad.xml", 0, bad_line=bad_line)
    assert big.stat().st_size > 99 * MB

    check = measured(site.command("check", "stock_in", str(big)), env=site.env(), timeout=300)
    assert check.returncode == 65, check
    first = check.stderr.splitlines()[0]
    assert first.startswith(f"{big}:{bad_line}:"), first
    assert "qty" in first, first
    assert check.maxrss_kb < 150 * 1024, check.maxrss_kb

    os.rename(big, site.root / "incoming" / "stock_in" / big.name)
    # The rejected line comes once the job is in joberrors (its log is there first).
    notified.wait_for(lambda: _rejected(notified), "the export rejected", timeout=300)
    assert site.where("stock-bad.xml")[0].startswith("joberrors")
    rejected = _rejected(notified)
    assert len(rejected) == 1, rejected
    assert f"line {bad_line}," in rejected[0]["reason"], rejected[0]


def test_a_truncated_huge_file_is_rejected(site: Site, notified: Notified) -> None:
    big = stock_export(site.outside / "stock-cut.xml", 100 * MB, truncate=True)
    check = measured(site.command("check", "stock_in", str(big)), env=site.env(), timeout=300)
    assert check.returncode == 65, check
    assert check.maxrss_kb < 150 * 1024, check.maxrss_kb

    os.rename(big, site.root / "incoming" / "stock_in" / big.name)
    notified.wait_for(lambda: _rejected(notified), "the export rejected", timeout=300)
    assert site.where("stock-cut.xml")[0].startswith("joberrors")
    assert not site.ls("queue", "stock_in") and not site.ls("bak", "stock_in")


def test_submit_of_a_huge_file_uses_bounded_memory(site: Site) -> None:
    stock_site(site)
    big = stock_export(site.outside / "stock-sub.xml", 100 * MB)
    submit = measured(site.command("submit", "stock_in", str(big)), env=site.env(), timeout=300)
    assert submit.returncode == 0, submit
    assert submit.maxrss_kb < 150 * 1024, submit.maxrss_kb
    assert site.status("stock-sub.xml") == "queue/stock_in"
    assert (site.root / "queue" / "stock_in" / "stock-sub.xml").stat().st_size == big.stat().st_size


def test_a_job_behind_a_slow_handler_is_done_before_that_handler_ends(site: Site) -> None:
    handler = site.script(
        "erp-import",
        """
case "$JOBSPOOL_JOB" in
  fast*) sleep 1 ;;
  slow*) sleep 10 ;;
esac
: > "$T/ended-$JOBSPOOL_JOB"
""",
    )
    site.configure({"orders_in": {"command": [handler], "concurrency": 1, "timeout": "60s"}})
    site.init()
    daemon = site.start()
    # The slow job is queued behind the fast one while the fast one's handler runs.
    site.drop("orders_in", "fast.xml", order("fast"))
    site.wait_for(lambda: site.where("fast.xml") == ["queue/orders_in"], "fast.xml queued")
    site.drop("orders_in", "slow.xml", order("slow"))
    site.wait_for(lambda: site.where("slow.xml") == ["queue/orders_in"], "slow.xml queued")
    assert not (site.dir / "ended-fast.xml").exists(), "the fast handler ended too soon"
    site.wait_for(lambda: daemon.said("done", job="fast.xml"), "fast.xml reported done")
    assert site.status("fast.xml") == "bak/orders_in"
    # The slow handler is still running: the fast job did not wait for it.
    assert not (site.dir / "ended-slow.xml").exists()
    assert site.status("slow.xml") == "queue/orders_in"
    site.wait_for(lambda: daemon.said("done", job="slow.xml"), "slow.xml done", timeout=60)
    daemon.stop()


def _in_bak(site: Site, name: str) -> bool:
    return name in site.ls("bak", "orders_in")


def _rejected(daemon: Notified) -> list[dict[str, Any]]:
    return [line for line in _lines(daemon) if line.get("event") == "rejected"]


def _lines(daemon: Notified) -> list[dict[str, Any]]:
    out = []
    for line in daemon.stderr.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
