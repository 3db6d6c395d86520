"""The workload the durability test records: a day of a spool, in a minute.

``python -m tests.crashcheck.workload SITE JOBSPOOL SEED`` (run under strace by
:func:`tests.crashcheck.trace.record`) plays the partners and the sysadmin
against the real commands: ``jobspool init``, the daemon, drops into the
drop folder (valid, schema-invalid, failing in their handler, badly named,
a name in use, outbound ones), ``submit`` (valid, invalid, a name in use),
``retry`` (some succeed, some fail again, some are rejected again),
``fetch`` of the outbound interface, and a schedule whose results the daemon
records. It writes ``SITE/manifest.json``: every job name it dropped or
submitted and its bytes, what the checker compares the spool against.

Partners upload as SFTP clients do: a hidden name, the data, then a rename
(``renameat``, which the tests never make fail; jobspool's own renames are
``rename`` and ``renameat2``), and never a sync.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

DEADLINE = 90.0  # seconds any wait may take; the checker says what went wrong

HANDLER = """\
#!/bin/sh
# Fails a job whose flag file exists (once per flag), does nothing else.
f="$T/fail-$JOBSPOOL_JOB"
if [ -e "$f" ]; then rm -f "$f"; echo "failing as asked" >&2; exit 1; fi
exit 0
"""

ORDER_XSD = """\
<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="order">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="sku" type="xs:string"/>
        <xs:element name="qty" type="xs:positiveInteger"/>
      </xs:sequence>
      <xs:attribute name="id" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""


def config(site: Path) -> str:
    """The site's ``jobspool.yaml``: one inbound, one outbound interface, one schedule."""
    return f"""\
spool: spool
daemon:
  settle: 0.3s
  rescan: 2s
  backoff_initial: 0.2s
  backoff_max: 1s
  grace: 5s
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [{site / "handler.sh"}]
    timeout: 30s
  orders_out:
    schema: schemas/order.xsd
schedules:
  tick:
    every: "0:0:1"
    command: [/bin/true]
"""


def prepare(site: Path) -> Path:
    """Write the configuration, schema and handler into ``site``; return the config."""
    (site / "schemas").mkdir(parents=True, exist_ok=True)
    (site / "schemas" / "order.xsd").write_text(ORDER_XSD)
    handler = site / "handler.sh"
    handler.write_text(HANDLER)
    handler.chmod(0o755)
    (site / "outside").mkdir(exist_ok=True)
    (site / "outbox").mkdir(exist_ok=True)
    path = site / "jobspool.yaml"
    path.write_text(config(site))
    return path


def order(n: str, qty: int = 3) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<order id="{n}">\n'
        f"  <sku>HAM-{n}</sku>\n  <qty>{qty}</qty>\n</order>\n"
    ).encode()


class Workload:
    def __init__(self, site: Path, jobspool: str, seed: int) -> None:
        self.site = site
        self.spool = site / "spool"
        self.config = site / "jobspool.yaml"
        self.jobspool = jobspool
        self.rng = random.Random(seed)
        self.manifest: dict[str, str] = {}
        self.env = {**os.environ, "T": str(site), "XDG_CACHE_HOME": str(site / ".xdg-cache")}
        self.env.pop("JOBSPOOL_CONFIG", None)
        self.uploads = 0

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.jobspool, "-c", str(self.config), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=self.env,
            cwd=self.site, timeout=120, check=False,
        )  # fmt: skip

    def drop(self, iface: str, name: str, data: bytes, record: bool = True) -> None:
        """Upload as an SFTP client does: hidden name, data, rename; never synced."""
        folder = os.open(self.spool / "incoming" / iface, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.uploads += 1
            hidden = f".upload-{self.uploads}"
            fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=folder)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(hidden, name, src_dir_fd=folder, dst_dir_fd=folder)  # renameat
        finally:
            os.close(folder)
        if record:  # a name in use: the job gets a new name, its bytes are checked otherwise
            self.manifest[name] = data.hex()

    def wait(self, what: str, done: object) -> bool:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if callable(done) and done():
                return True
            time.sleep(0.1)
        print(f"workload: gave up waiting for {what}", file=sys.stderr)
        return False

    def quiet(self) -> bool:
        """Nothing left in the drop folders or the inbound queue."""
        folders = [self.spool / "incoming" / i for i in ("orders_in", "orders_out")]
        folders.append(self.spool / "queue" / "orders_in")
        return not any(n for f in folders for n in os.listdir(f) if not n.startswith("."))

    def flag(self, name: str) -> None:
        """The handler fails ``name`` once."""
        (self.site / f"fail-{name}").write_text("fail\n")

    def main(self, drops: int, submits: int, retries: int) -> int:
        init = self.run("init")
        if init.returncode != 0:
            print(init.stderr, file=sys.stderr)
            return 1
        with open(self.site / "daemon.stderr", "wb") as err:
            daemon = subprocess.Popen(
                [self.jobspool, "-c", str(self.config), "daemon"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env, cwd=self.site,
            )  # fmt: skip
        try:
            self.wait("the daemon to say ready", lambda: b'"ready"' in self._said())
            self.play(drops, submits, retries)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        (self.site / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
        return 0

    def _said(self) -> bytes:
        return (self.site / "daemon.stderr").read_bytes()

    def play(self, drops: int, submits: int, retries: int) -> None:
        rng = self.rng
        kinds = ["valid"] * 10 + ["invalid"] * 2 + ["fail"] * 2 + ["badname", "inuse", "out"]
        used: list[str] = []
        failing: list[str] = []
        invalid: list[str] = []
        for i in range(drops):
            kind = rng.choice(kinds)
            name = f"drop-{i:03d}.xml"
            iface, data = "orders_in", order(str(i))
            if kind == "invalid":
                data = order(str(i), qty=-1)
                invalid.append(name)
            elif kind == "fail":
                self.flag(name)
                failing.append(name)
            elif kind == "badname":
                name = f"bad name {i}.xml"
            elif kind == "inuse":
                # One taken already: renaming over a file still in the drop
                # folder would replace that upload, not test the name check.
                incoming = [self.spool / "incoming" / i for i in ("orders_in", "orders_out")]
                taken = [n for n in used[:-20] if not any((f / n).exists() for f in incoming)]
                if not taken:
                    continue
                name = rng.choice(taken)
                data = order(f"{i}-again")
            elif kind == "out":
                iface = "orders_out"
            if kind != "inuse":
                used.append(name)
            self.drop(iface, name, data, record=kind != "inuse")
            if i % 10 == 9:
                time.sleep(rng.uniform(0.0, 0.3))  # bursts of various sizes
        for k in range(submits):
            name = f"sub-{k:02d}.xml"
            data = order(f"s{k}", qty=-2 if k % 5 == 4 else 2)
            path = self.site / "outside" / name
            path.write_bytes(data)
            iface = "orders_out" if k % 4 == 3 else "orders_in"
            if k == submits - 1 and used:  # a name in use: refused, nothing changes
                self.run("submit", iface, str(path), "--name", used[0])
                continue
            self.manifest[name] = data.hex()
            self.run("submit", iface, str(path))
        self.wait("the drops to be taken and run", self.quiet)
        # Retries: failed ones (now without their flag: done; one flagged
        # again: fails again, racing the retry's clean-up), rejected ones.
        chosen = failing[: max(1, retries - 2)] + invalid[:2]
        for n, name in enumerate(chosen[:retries]):
            if n == 0 and name in failing:
                self.flag(name)
            self.run("retry", name)
        self.wait("the retried jobs to be run", self.quiet)
        self.run("fetch", "orders_out", "--to", str(self.site / "outbox"))
        runs = self.spool / "state" / "schedules" / "tick" / "runs"
        self.wait("two schedule results", lambda: runs.is_dir() and len(os.listdir(runs)) >= 2)


def main(argv: list[str]) -> int:
    site, jobspool, seed = Path(argv[1]), argv[2], int(argv[3])
    drops, submits, retries = (int(a) for a in argv[4:7])
    return Workload(site, jobspool, seed).main(drops, submits, retries)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
