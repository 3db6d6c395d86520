"""A job life cycle done the way jobspool does it, correctly or with one planted bug.

``python lifecycle.py SPOOL VARIANT JOBS`` plays both sides on a spool made
by ``jobspool init`` (interface ``orders_in``): a partner uploads each job
into ``incoming/orders_in`` (a hidden name, then a rename; never synced, as
SFTP clients do), then a "daemon" takes it into the queue, says
``accepted``, writes its log into ``bak/orders_in`` and moves the job beside
it, and says ``done``: JSON lines on stderr, like the daemon's. The checker
must pass ``correct`` and catch each of the others:

- ``skip-dir-fsync``: the queue directory is not fsynced after the job's
  rename into it;
- ``skip-file-fsync``: the log's data is not fsynced before its rename;
- ``ack-before-sync``: ``done`` is said before the final rename is synced;
- ``ignore-failed-sync``: a failed fsync is taken for a success (run it
  with a sync failure injected); ``correct`` retries it instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jobspool import joblog

IFACE = "orders_in"
VARIANTS = ("correct", "skip-dir-fsync", "skip-file-fsync", "ack-before-sync", "ignore-failed-sync")


def say(event: str, job: str, to: str) -> None:
    line = json.dumps({"event": event, "job": job, "interface": IFACE, "to": to}) + "\n"
    os.write(2, line.encode())


def job_bytes(i: int) -> bytes:
    return f'<?xml version="1.0"?>\n<order id="{i}"><sku>S-{i}</sku><qty>1</qty></order>\n'.encode()


class Life:
    def __init__(self, spool: Path, variant: str) -> None:
        self.spool = spool
        self.variant = variant
        self.staged = 0

    def sync(self, fd: int) -> None:
        """fsync; a failure is retried (correct) or ignored (the planted bug)."""
        for _ in range(5):
            try:
                os.fsync(fd)
                return
            except OSError:
                if self.variant == "ignore-failed-sync":
                    return
        raise SystemExit("fsync keeps failing")

    def sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.sync(fd)
        finally:
            os.close(fd)

    def sync_file(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.sync(fd)
        finally:
            os.close(fd)

    def upload(self, i: int) -> str:
        name = f"job-{i:03d}.xml"
        folder = self.spool / "incoming" / IFACE
        hidden = folder / f".{name}.upload"
        hidden.write_bytes(job_bytes(i))
        os.rename(hidden, folder / name)
        return name

    def accept(self, name: str) -> None:
        src = self.spool / "incoming" / IFACE / name
        queue = self.spool / "queue" / IFACE
        self.sync_file(src)  # the partner never synced it
        os.rename(src, queue / name)
        if self.variant != "skip-dir-fsync":
            self.sync_dir(queue)
        self.sync_dir(src.parent)
        say("accepted", name, f"queue/{IFACE}")

    def finish(self, name: str) -> None:
        bak = self.spool / "bak" / IFACE
        log = joblog.new(name, IFACE)
        joblog.received(log, "drop")
        joblog.checked(log, [], None)
        joblog.moved(log, f"queue/{IFACE}", f"bak/{IFACE}")
        self.staged += 1
        tmp = self.spool / "tmp" / f".{name}.{os.getpid()}.{self.staged}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, joblog.to_bytes(log))
            if self.variant != "skip-file-fsync":
                self.sync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, bak / f"{name},log.xml")
        self.sync_dir(bak)
        os.rename(self.spool / "queue" / IFACE / name, bak / name)
        if self.variant == "ack-before-sync":
            say("done", name, f"bak/{IFACE}")
        self.sync_dir(bak)
        self.sync_dir(self.spool / "queue" / IFACE)
        if self.variant != "ack-before-sync":
            say("done", name, f"bak/{IFACE}")


def main(argv: list[str]) -> int:
    spool, variant, jobs = Path(argv[1]), argv[2], int(argv[3])
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    life = Life(spool, variant)
    for i in range(jobs):
        name = life.upload(i)
        life.accept(name)
        life.finish(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
