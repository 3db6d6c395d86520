"""The job-management API's exact answers, checked with curl against a real server.

One ``jobspool serve`` (TLS, plus its plain-http listener) and one ``jobspool
daemon`` serve the module's site; every request is made with curl, as a
partner's script would. What the partner learns is then checked where an
administrator would look: ``jobspool status``, the spool's folders, the logs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.kit import (
    COMMAND,
    DEADLINE,
    INVALID,
    STOCK_VALID,
    VALID,
    Server,
    assert_every_log_valid,
    assert_ok,
    free_port,
    kinds,
    make_certificates,
    make_site,
    run,
    valid_log,
    wait_for,
)

CURL = "/usr/bin/curl"
PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}

CSV_XSL = """\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="text" media-type="text/csv"/>
  <xsl:template match="/order">id,sku,qty
<xsl:value-of select="@id"/>,<xsl:value-of select="sku"/>,<xsl:value-of select="qty"/>
</xsl:template>
</xsl:stylesheet>
"""
SUMMARY_XSL = """\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="text"/>
  <xsl:template match="/order">order <xsl:value-of select="@id"/></xsl:template>
</xsl:stylesheet>
"""
PAGE_XSL = """\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="html"/>
  <xsl:template match="/order"><p>order <xsl:value-of select="@id"/></p></xsl:template>
</xsl:stylesheet>
"""
# A handler that talks about server paths on both streams, as real ones do.
TALKING = """\
#!/bin/sh
echo "imported into /srv/erp/db/orders.sqlite from $1"
echo "warning: /etc/erp/secret.conf is world-readable" >&2
"""
HELD = "#!/bin/sh\necho 'the ERP is down' >&2\nexit 75\n"

CONFIG = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [{dir}/bin/talking, --verbose]
    root_elements: [order]
  stock_in:
    schema: schemas/stock.rng
    command: [{dir}/bin/talking]
  held_in:
    schema: schemas/order.xsd
    command: [{dir}/bin/held]
  orders_out:
    schema: schemas/order.xsd
    xslt: {{csv: xslt/csv.xsl, summary: xslt/summary.xsl, page: xslt/page.xsl}}
  legacy_out:
    schema: schemas/order.xsd
daemon: {{settle: 0.3s, rescan: 2s, backoff_initial: 0.2s, backoff_max: 1s, grace: 5s}}
http:
  listen: 127.0.0.1:{port}
  plain_listen: 127.0.0.1:{plain}
  cert: cert.pem
  key: key.pem
  users: htpasswd
  grants:
    alice: [orders_in, stock_in, held_in, orders_out, legacy_out]
    bob: [orders_in, orders_out]
  interfaces:
    stock_in: {{joblog_output: true}}
    orders_out: {{extensions: {{summary: sum}}}}
    legacy_out: {{move_on_listing: true}}
"""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Front:
    dir: Path
    config: Path
    spool: Path
    env: dict[str, str]
    server: Server
    plain: int
    daemon: subprocess.Popen[bytes]

    def run(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run("-c", str(self.config), *args, env=self.env, **kw)

    def curl(self, path: str, *args: str, user: str | None = "alice") -> Answer:
        """``curl`` against the TLS port, as ``user`` (None: no credentials)."""
        auth = ["-u", f"{user}:{PASSWORDS[user]}"] if user else []
        return curl(f"{self.server.url}{path}", "--cacert", str(self.server.ca), *auth, *args)

    def upload(self, iface: str, data: bytes = VALID, user: str = "alice", **query: str) -> str:
        job = self.dir / f"upload-{time.monotonic_ns()}.xml"
        job.write_bytes(data)
        params = "&".join(f"{k}={v}" for k, v in {"Interfacename": iface, **query}.items())
        r = self.curl(f"/xml/upload?{params}", "-H", "Content-Type: text/xml",
                      "--data-binary", f"@{job}", user=user)  # fmt: skip
        assert r.status == 201, r.text
        return r.text

    def status(self, name: str) -> str:
        return assert_ok(self.run("status", name)).strip()

    def wait_status(self, name: str, status: str) -> None:
        wait_for(lambda: self.run("status", name).stdout.strip() == status, f"{name} in {status}")


def curl(url: str, *args: str) -> Answer:
    """One request with curl: status, the final answer's headers (lower-case), body."""
    into = [] if "-OJ" in args else ["-o", "-"]
    out = subprocess.run([CURL, "-sS", "-D", "-", *into, url, *args],
                         capture_output=True, timeout=DEADLINE, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    data = out.stdout
    while True:  # skip "100 Continue" and the like
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status >= 200:
            break
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Answer(status, headers, data)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    directory = tmp_path_factory.mktemp("parity")
    make_site(directory)
    for name, text in (("csv", CSV_XSL), ("summary", SUMMARY_XSL), ("page", PAGE_XSL)):
        (directory / "xslt").mkdir(exist_ok=True)
        (directory / "xslt" / f"{name}.xsl").write_text(text)
    (directory / "bin").mkdir()
    for name, text in (("talking", TALKING), ("held", HELD)):
        (directory / "bin" / name).write_text(text)
        (directory / "bin" / name).chmod(0o755)
    make_certificates(directory)
    port, plain = free_port(), free_port()
    config = directory / "jobspool.yaml"
    config.write_text(CONFIG.format(dir=directory, port=port, plain=plain))
    env = {"XDG_CACHE_HOME": str(directory / "xdg-cache")}
    assert_ok(run("-c", str(config), "init", env=env))
    for user, password in PASSWORDS.items():
        assert_ok(run("-c", str(config), "user", "add", user, "--password-stdin", "--cost", "4",
                      input=password + "\n", env=env))  # fmt: skip
    server = Server(config, port, directory / "ca.pem", env).start()
    with open(directory / "daemon.log", "wb") as err:
        daemon = subprocess.Popen([*COMMAND, "-c", str(config), "daemon"], stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err, env={**os.environ, **env})  # fmt: skip
    site = Front(directory, config, directory / "spool", env, server, plain, daemon)
    try:
        wait_for(lambda: b'"ready"' in (directory / "daemon.log").read_bytes(), "the daemon")
        yield site
    finally:
        daemon.terminate()
        daemon.wait(DEADLINE)
        assert server.stop() == 0, server.stderr.read_text()[-3000:]
    assert_every_log_valid(directory)


# --- plain http --------------------------------------------------------------------------


def test_plain_http_is_answered_403_with_the_https_address(site: Front) -> None:
    base = f"http://127.0.0.1:{site.plain}"
    path = "/xml/jobstatus?Jobname=x.xml"
    hinted = f"use https: https://127.0.0.1:{site.server.port}{path}\n"
    anonymous = curl(base + path)
    with_password = curl(base + path, "-u", f"alice:{PASSWORDS['alice']}")
    for r in (anonymous, with_password):
        assert (r.status, r.text) == (403, hinted)
        assert "www-authenticate" not in r.headers
        assert r.headers["connection"] == "close"
    # The name the client asked for is kept; the port is the TLS one.
    named = curl(base + "/xml/jobqueue?Interfacename=orders_in", "-H", "Host: jobs.example.com:80")
    assert named.text == (
        f"use https: https://jobs.example.com:{site.server.port}/xml/jobqueue?Interfacename=orders_in\n"
    )
    assert curl(base + "/console/").status == 403


def test_plain_http_reads_no_body_and_stores_nothing(site: Front) -> None:
    big = site.dir / "big.xml"
    big.write_bytes(VALID + b"<!--" + b"x" * 3_000_000 + b"-->")
    before = sorted(p.name for p in site.spool.rglob("*") if p.is_file() and p.suffix != ".lock")
    start = time.monotonic()
    r = curl(f"http://127.0.0.1:{site.plain}/xml/upload?Interfacename=orders_in",
             "-u", f"alice:{PASSWORDS['alice']}", "-H", "Content-Type: text/xml",
             "-H", "Expect:", "--data-binary", f"@{big}")  # fmt: skip
    took = time.monotonic() - start
    assert r.status == 403 and r.text.startswith("use https: https://127.0.0.1:")
    assert took < 5
    after = sorted(p.name for p in site.spool.rglob("*") if p.is_file() and p.suffix != ".lock")
    assert after == before
    # Nothing reached the application: no access line for it.
    assert not any(x["path"] == "/xml/upload" and x["status"] == 403
                   for x in site.server.requests())  # fmt: skip


# --- download ----------------------------------------------------------------------------


def test_download_from_an_empty_queue_is_503_with_retry_after(site: Front) -> None:
    while site.curl("/xml/job?Interfacename=orders_out").status == 200:
        pass  # take whatever other tests left
    r = site.curl("/xml/job?Interfacename=orders_out")
    assert (r.status, r.text) == (503, "no job queued on orders_out\n")
    assert r.headers["retry-after"] == "30"
    name = site.upload("orders_out")
    again = site.curl("/xml/job?Interfacename=orders_out")
    assert again.status == 200 and again.headers["x-jobname"] == name


@pytest.mark.parametrize(
    ("xslt", "suffix", "media", "content"),
    [
        ("csv", ".csv", "text/csv", b"id,sku,qty\n1,HAM-1,3\n"),  # media-type="text/csv"
        ("summary", ".sum", "text/plain", b"order 1"),  # http.interfaces...extensions
        ("page", ".html", "text/html", b"<p>order 1</p>"),  # method="html"
        (None, ".xml", "application/xml", VALID),
    ],
)
def test_the_downloaded_file_is_named_after_the_output_type(
    site: Front, tmp_path: Path, xslt: str | None, suffix: str, media: str, content: bytes
) -> None:
    name = site.upload("orders_out")
    query = f"Jobname={name}" + (f"&xslt={xslt}" if xslt else "")
    # -OJ: saved under the name the server offers, as a partner's script would.
    r = site.curl(f"/xml/job?{query}", "-OJ", "--output-dir", str(tmp_path))
    assert r.status == 200
    assert r.headers["content-type"].startswith(media)
    saved = tmp_path / (name.removesuffix(".xml") + suffix)
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]
    assert saved.read_bytes().strip() == content.strip()
    assert site.status(name) == "bak/orders_out"


# --- the legacy listing ------------------------------------------------------------------


def test_move_on_listing_takes_the_listed_jobs_to_bak(site: Front) -> None:
    jobs = [site.upload("legacy_out", VALID.replace(b'id="1"', f'id="{n}"'.encode()))
            for n in range(3)]  # fmt: skip
    listed = site.curl("/xml/jobqueue?Interfacename=legacy_out")
    assert listed.status == 200 and listed.text.splitlines() == jobs
    # Moved by that listing, each with its log saying so: the next listing is empty.
    for name in jobs:
        assert site.status(name) == "bak/legacy_out"
        log = valid_log(site.spool / "bak" / "legacy_out" / f"{name},log.xml")
        assert b"listed by alice: moved on its first listing (move_on_listing)" in log
    assert site.curl("/xml/jobqueue?Interfacename=legacy_out").text == ""
    # A listing that got lost loses nothing: every job still downloads by name.
    r = site.curl(f"/xml/job?Jobname={jobs[1]}")
    assert r.status == 200 and b'id="1"' in r.body
    # Without the switch a listing moves nothing.
    out = site.upload("orders_out")
    assert out in site.curl("/xml/jobqueue?Interfacename=orders_out").text
    assert site.status(out) == "queue/orders_out"


# --- joblog ------------------------------------------------------------------------------


def test_joblog_shows_partners_no_server_paths_and_no_handler_output(site: Front) -> None:
    name = site.upload("orders_in")
    site.wait_status(name, "bak/orders_in")
    stored = (site.spool / "bak" / "orders_in" / f"{name},log.xml").read_bytes()
    assert str(site.dir).encode() in stored and b"/srv/erp/db" in stored  # the administrator's
    r = site.curl(f"/xml/joblog?Jobname={name}")
    assert r.status == 200 and r.headers["content-type"] == "application/xml"
    valid_log(r.body)
    assert kinds(r.body) == kinds(stored)
    assert str(site.dir).encode() not in r.body
    assert b"/srv/" not in r.body and b"/etc/" not in r.body
    assert b"<output" not in r.body and b"secret.conf" not in r.body
    root = etree.fromstring(r.body)
    ns = {"j": "urn:jobspool:joblog:1"}
    checked, ran = root.find("j:checked", ns), root.find("j:ran", ns)
    assert checked is not None and ran is not None
    assert checked.get("schema") == "order.xsd"
    assert (ran.get("handler"), ran.get("outcome")) == ("talking", "done")
    moves = [(m.get("from"), m.get("to")) for m in root.findall("j:moved", ns)]
    assert moves == [("outside", "queue/orders_in"), ("queue/orders_in", "bak/orders_in")]


def test_joblog_keeps_handler_output_where_the_interface_allows_it(site: Front) -> None:
    name = site.upload("stock_in", STOCK_VALID)
    site.wait_status(name, "bak/stock_in")
    r = site.curl(f"/xml/joblog?Jobname={name}")
    valid_log(r.body)
    outputs = {o.get("stream"): o.text or "" for o in etree.fromstring(r.body).iter(
        "{urn:jobspool:joblog:1}output")}  # fmt: skip
    assert "secret.conf is world-readable" in outputs["stderr"]
    assert "imported into /srv/erp/db/orders.sqlite" in outputs["stdout"]
    assert str(site.dir).encode() not in r.body.split(b"<output")[0]  # paths before it: none


# --- why a queue does not move ---------------------------------------------------------


def test_queuestatus_and_the_jobqueue_header_say_paused_or_blocked_and_by_what(site: Front) -> None:
    ok = site.curl("/xml/queuestatus?Interfacename=orders_out")
    assert (ok.status, ok.text) == (200, "ok")
    assert site.curl("/xml/jobqueue?Interfacename=orders_out").headers["x-queue-status"] == "ok"
    name = site.upload("held_in")

    def blocked() -> bool:
        return site.curl("/xml/queuestatus?Interfacename=held_in").text.startswith("blocked:")

    wait_for(blocked, "held_in to be blocked")
    text = site.curl("/xml/queuestatus?Interfacename=held_in").text
    assert text.startswith(f"blocked: {name} blocks the queue since ")
    assert "exit 75: try later" in text and "\n" not in text
    header = site.curl("/xml/jobqueue?Interfacename=held_in").headers["x-queue-status"]
    assert header.startswith(f"blocked: {name} blocks the queue")
    assert_ok(site.run("pause", "held_in"))
    try:
        assert site.curl("/xml/queuestatus?Interfacename=held_in").text == "paused"
        assert site.curl("/xml/jobqueue?Interfacename=held_in").text == f"{name}\n"
    finally:
        assert_ok(site.run("resume", "held_in"))
    wait_for(blocked, "held_in to be blocked again")
    # Bob may not use held_in: the same answer as for an interface that does not exist.
    theirs = site.curl("/xml/queuestatus?Interfacename=held_in", user="bob")
    none = site.curl("/xml/queuestatus?Interfacename=nowhere", user="bob")
    assert theirs.status == none.status == 400
    assert theirs.text.replace("held_in", "X") == none.text.replace("nowhere", "X")
    assert_ok(site.run("pause", "held_in"))  # no more retries for the rest of the module


# --- jobstatus by RefName ----------------------------------------------------------------


def test_jobstatus_by_refname_finds_the_callers_newest_upload(site: Front) -> None:
    first = site.upload("orders_out", RefName="PO-4711")
    time.sleep(1.1)  # names carry the second: the second upload is the newer one
    second = site.upload("orders_out", RefName="PO-4711")
    bobs = site.upload("orders_out", user="bob", RefName="PO-4711")
    mine = site.curl("/xml/jobstatus?RefName=PO-4711")
    assert (mine.status, mine.text) == (200, "queue/orders_out")
    assert mine.headers["x-jobname"] == second != first
    assert mine.headers["content-location"] == f"/xml/jobstatus?Jobname={second}"
    theirs = site.curl("/xml/jobstatus?RefName=PO-4711", user="bob")
    assert theirs.headers["x-jobname"] == bobs
    # It follows the job: downloaded, it is in bak.
    assert site.curl(f"/xml/job?Jobname={second}").status == 200
    assert site.curl("/xml/jobstatus?RefName=PO-4711").text == "bak/orders_out"
    # A rejected upload is found too; its log is in joberrors.
    job = site.dir / "invalid.xml"
    job.write_bytes(INVALID)
    rejected = site.curl("/xml/upload?Interfacename=orders_in&RefName=PO%20bad", "-H",
                         "Content-Type: text/xml", "--data-binary", f"@{job}")  # fmt: skip
    assert rejected.status == 400
    assert site.curl("/xml/jobstatus?RefName=PO%20bad").text == "joberrors"
    unknown = site.curl("/xml/jobstatus?RefName=PO-0000")
    assert (unknown.status, unknown.text) == (400, "no job of yours has RefName 'PO-0000'\n")
    # Bob's reference is not Alice's: she does not learn his jobs by guessing references.
    site.upload("orders_in", user="bob", RefName="bob-only")
    assert site.curl("/xml/jobstatus?RefName=bob-only").status == 400
    both = site.curl(f"/xml/jobstatus?Jobname={first}&RefName=PO-4711")
    assert both.status == 400 and "either Jobname= or RefName=" in both.text
