"""The workload the durability test records: a day of a spool, in a minute.

``python -m tests.crashcheck.workload SITE JOBSPOOL SEED`` (run under strace by
:func:`tests.crashcheck.trace.record`) plays the partners and the sysadmin
against the real commands: ``jobspool init``, the daemon, drops into the
drop folder (valid, schema-invalid, failing in their handler, badly named,
a name in use, outbound ones), ``submit`` (valid, invalid, a name in use),
``retry`` (some succeed, some fail again, some are rejected again),
``fetch`` of the outbound interface, and a schedule whose results the daemon
records; with an HTTP port, also ``jobspool serve`` taking uploads (valid
and invalid) and serving downloads of the outbound interface. It writes
``SITE/manifest.json``: every job name it dropped, submitted or uploaded
and its bytes, what the checker compares the spool against.

Partners upload as SFTP clients do: a hidden name, the data, then a rename
(``renameat``, which the tests never make fail; jobspool's own renames are
``rename`` and ``renameat2``), and never a sync.

HTTP clients speak HTTP/1.1 over TLS 1.2 on a fresh connection each
(``Connection: close``), and say on stdout, in one ``write`` each, first
``{"http": "sending", "port": P}`` (P: the client's port; written after the
handshake, before the request) and then what the answer was. The checker
takes the server's first write on that connection after the first line as
the moment it answered: with TLS 1.2 the server writes nothing on a
connection between its handshake and its answer (TLS 1.3 servers send
session tickets after it, which would be mistaken for the answer).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import socket
import ssl
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

# The kit's order schema (tests/kit/documents.py), repeated on purpose: this
# script runs alone under strace and imports nothing of the test kit, whose
# package brings httpx, lxml and the whole kit into every recorded trace.
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


USER, PASSWORD = "partner", "partner-Secret-1"  # the HTTP front's one user


def http_section(port: int) -> str:
    """``http:`` of the site's configuration: TLS on ``port``, one user for both interfaces."""
    return f"""\
http:
  listen: 127.0.0.1:{port}
  cert: cert.pem
  key: key.pem
  users: htpasswd
  grants:
    {USER}: [orders_in, orders_out]
  timeout: 30s
"""


def config(site: Path, port: int | None = None) -> str:
    """The site's ``jobspool.yaml``: one inbound, one outbound interface, one schedule.

    With ``port``, the HTTPS front too (``cert.pem``, ``key.pem`` and
    ``htpasswd`` in the site, see :func:`prepare`).
    """
    http = http_section(port) if port is not None else ""
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
{http}"""


def prepare(site: Path, port: int | None = None) -> Path:
    """Write the configuration, schema and handler into ``site``; return the config.

    With ``port`` (the HTTPS front), the caller has put ``cert.pem`` and
    ``key.pem`` there; this writes the users file.
    """
    if port is not None:
        import bcrypt  # jobspool's own dependency (the HTTP front's passwords)

        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        (site / "htpasswd").write_text(f"{USER}:{hashed}\n")
    (site / "schemas").mkdir(parents=True, exist_ok=True)
    (site / "schemas" / "order.xsd").write_text(ORDER_XSD)
    handler = site / "handler.sh"
    handler.write_text(HANDLER)
    handler.chmod(0o755)
    (site / "outside").mkdir(exist_ok=True)
    (site / "outbox").mkdir(exist_ok=True)
    path = site / "jobspool.yaml"
    path.write_text(config(site, port))
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
        self.port: int | None = None  # the HTTPS front's, when it runs
        self._port = 0  # the client's port of the last request

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

    def main(self, drops: int, submits: int, retries: int, http: tuple[int, int, int]) -> int:
        """The day; ``http``: (uploads, downloads, port), port 0 for no HTTP front."""
        init = self.run("init")
        if init.returncode != 0:
            print(init.stderr, file=sys.stderr)
            return 1
        with open(self.site / "daemon.stderr", "wb") as err:
            daemon = subprocess.Popen(
                [self.jobspool, "-c", str(self.config), "daemon"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env, cwd=self.site,
            )  # fmt: skip
        server = None
        try:
            self.wait("the daemon to say ready", lambda: b'"ready"' in self._said())
            if http[2]:
                self.port = http[2]
                server = self.serve()
            self.play(drops, submits, retries, http[:2])
        finally:
            for proc in (server, daemon):
                if proc is None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        (self.site / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
        return 0

    def serve(self) -> subprocess.Popen[bytes]:
        """``jobspool serve``, once it listens."""
        log = self.site / "serve.stderr"
        with open(log, "wb") as err:
            server = subprocess.Popen(
                [self.jobspool, "-c", str(self.config), "serve"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env, cwd=self.site,
            )  # fmt: skip
        listening = lambda: server.poll() is not None or b'"listening"' in log.read_bytes()  # noqa: E731
        self.wait("the server to listen", listening)
        if server.poll() is not None:
            print(f"workload: the server exited {server.returncode}", file=sys.stderr)
        return server

    def _said(self) -> bytes:
        return (self.site / "daemon.stderr").read_bytes()

    def play(self, drops: int, submits: int, retries: int, http: tuple[int, int]) -> None:
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
        if self.port:
            self.http_day(*http)
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

    # --- the HTTPS front ---------------------------------------------------------------

    def http_day(self, uploads: int, downloads: int) -> None:
        """Uploads (valid and invalid, both interfaces), then downloads of the outbound one."""
        for k in range(uploads):
            invalid = k % 4 == 3
            iface = "orders_out" if k % 2 == 0 else "orders_in"
            data = order(f"h{k}", qty=-4 if invalid else 4)
            status, headers, body = self.request("POST", f"/xml/upload?Interfacename={iface}", data)
            text = body.decode("utf-8", "replace")
            if status == 201:
                name = text.strip()
            elif status == 400 and (m := re.match(r"(\S+) rejected into joberrors", text)):
                name = m.group(1)
            else:
                name = ""
            if status != (400 if invalid else 201) or not name:
                print(f"workload: upload {k} answered {status}: {text[:300]}", file=sys.stderr)
                continue
            self.manifest[name] = data.hex()
            self.say(kind="upload", status=status, job=name, interface=iface)
        for _ in range(downloads):
            status, headers, body = self.request("GET", "/xml/job?Interfacename=orders_out")
            name = headers.get("x-jobname", "")
            if status != 200 or not name:
                print(f"workload: download answered {status}: {body[:300]!r}", file=sys.stderr)
                continue
            known = self.manifest.get(name)
            if known is not None and bytes.fromhex(known) != body:
                print(f"workload: download of {name} is not what was uploaded", file=sys.stderr)
            self.say(kind="download", status=status, job=name, interface="orders_out")

    def say(self, **what: object) -> None:
        """One JSON line on stdout, in one write: the checker reads it from the trace."""
        if "port" not in what:
            what["port"] = self._port
        os.write(1, json.dumps({"http": "answer", **what}).encode() + b"\n")

    def request(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """:meth:`once`, again after a 5xx answer (a failed sync), as a partner would."""
        for _ in range(10):
            status, headers, content = self.once(method, target, body)
            if status < 500:
                break
            print(f"workload: {method} {target} answered {status}, again", file=sys.stderr)
            time.sleep(0.2)
        return status, headers, content

    def once(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a connection of its own; the answer's status, headers and body."""
        assert self.port is not None
        ctx = ssl.create_default_context(cafile=str(self.site / "ca.pem"))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # see the module's docstring
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            self._port = tls.getsockname()[1]
            os.write(1, json.dumps({"http": "sending", "port": self._port}).encode() + b"\n")
            tls.sendall(head.encode() + body)
            answer = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLEOFError, ConnectionError):
                    break
                if not chunk:
                    break
                answer += chunk
        top, _, content = answer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, content


def main(argv: list[str]) -> int:
    site, jobspool, seed = Path(argv[1]), argv[2], int(argv[3])
    drops, submits, retries = (int(a) for a in argv[4:7])
    uploads, downloads, port = (int(a) for a in argv[7:10]) if len(argv) > 9 else (0, 0, 0)
    return Workload(site, jobspool, seed).main(drops, submits, retries, (uploads, downloads, port))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
