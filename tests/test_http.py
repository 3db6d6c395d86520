"""``jobspool serve``: the HTTPS front, tested through a real server and real clients.

The server is the installed command in a subprocess (``jobspool -c CONFIG
serve``) on a free loopback port, with a certificate chain made here; the
clients are httpx (verifying that chain), curl once, and raw TLS sockets for
clients that misbehave. One server serves the module; a second one runs
behind a pretend proxy (plain http), a third is reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.kit import (
    DEADLINE,
    INVALID,
    STOCK_VALID,
    VALID,
    Server,
    Site,
    assert_every_log_valid,
    assert_fails,
    assert_ok,
    basic,
    chunks,
    free_port,
    kinds,
    make_certificates,
    make_site,
    read_response,
    run,
    vm_hwm,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "jobspool-http.service"
DOC = ROOT / "docs" / "http.rst"

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "htpasswd-made"}
# Made by Apache's own tool: htpasswd -nbB -C 5 carol htpasswd-made
CAROL = "carol:$2y$05$Nz7PYqGNgFtJ.LKSxH.WhObPPduFJZbLQepHNd0yAOegBG/3C3nD."

SUMMARY_XSL = """\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="text"/>
  <xsl:template match="/order">order <xsl:value-of select="@id"/>: <xsl:value-of
    select="qty"/> x <xsl:value-of select="sku"/></xsl:template>
</xsl:stylesheet>
"""
FAILING_XSL = """\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template match="/"><xsl:message terminate="yes">no sku here</xsl:message></xsl:template>
</xsl:stylesheet>
"""

CONFIG = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [/bin/true]
    max_size: 1KB
    root_elements: [order]
  orders_out:
    schema: schemas/order.xsd
    xslt: {{summary: xslt/summary.xsl, failing: xslt/failing.xsl}}
  stock_in:
    schema: schemas/stock.rng
    command: [/bin/true]
    root_elements: [stock]
http:
{http}
  users: htpasswd
  grants:
    alice: [orders_in, orders_out, stock_in]
    bob: [orders_out]
    carol: [orders_out]
  timeout: 2s
"""
TLS = "  listen: 127.0.0.1:{port}\n  cert: cert.pem\n  key: key.pem"
BEHIND_PROXY = "  listen: 127.0.0.1:{port}\n  trusted_proxies: [127.0.0.1]"
TIMEOUT = 2.0  # http.timeout above


# --- the module's server ----------------------------------------------------------------


@dataclass
class Front:
    """The module's site and its running server."""

    site: Site
    server: Server

    def client(self, user: str = "alice", password: str | None = None) -> httpx.Client:
        return self.server.client(user, password or PASSWORDS.get(user, "x"))

    def upload(self, data: bytes = VALID, user: str = "alice", **query: str) -> str:
        with self.client(user) as c:
            r = c.post(
                "/xml/upload", params=query, content=data, headers={"Content-Type": "text/xml"}
            )
        assert r.status_code == 201, r.text
        return r.text


def write_config(directory: Path, http: str, name: str = "jobspool.yaml") -> Path:
    path = directory / name
    path.write_text(CONFIG.format(http=http))
    return path


def add_user(site: Site, user: str, password: str, cost: int = 4) -> None:
    add = ["user", "add", user, "--password-stdin", "--cost", str(cost)]
    assert_ok(site.run(*add, input=password + "\n"))


def prepare_site(directory: Path, http: str) -> Site:
    """Schemas, stylesheets, certificates, this ``http:`` section and an initialised spool."""
    site = make_site(directory)
    (directory / "xslt").mkdir()
    (directory / "xslt" / "summary.xsl").write_text(SUMMARY_XSL)
    (directory / "xslt" / "failing.xsl").write_text(FAILING_XSL)
    make_certificates(directory)
    write_config(directory, http)
    assert_ok(site.run("init"))
    return site


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    port = free_port()
    site = prepare_site(tmp_path_factory.mktemp("http"), TLS.format(port=port))
    for user in ("alice", "bob"):
        add_user(site, user, PASSWORDS[user])
    with open(site.dir / "htpasswd", "a") as f:
        f.write(CAROL + "\n")
    server = Server(site.config, port, site.dir / "ca.pem", site.env()).start()
    yield Front(site, server)
    assert server.stop() == 0, server.stderr.read_text()[-3000:]
    assert_every_log_valid(site.dir)


def same_answer(a: httpx.Response, b: httpx.Response, a_name: str, b_name: str) -> None:
    """Two 400 answers that differ in nothing but the name asked for."""
    assert a.status_code == b.status_code == 400, (a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"]
    assert a.text.replace(a_name, "NAME") == b.text.replace(b_name, "NAME"), (a.text, b.text)


# --- upload ------------------------------------------------------------------------------


def test_a_large_upload_streams_to_disk_and_is_kept_whole(front):
    # Rejected on their first stray element, after the whole body came in: it
    # goes to a staging file as it arrives, and the check streams it. A 1 MB one
    # first loads every code path.
    def upload(count: int) -> tuple[str, bytes]:
        junk = b"<junk>" + b"x" * 1000 + b"</junk>\n"
        data = b'<order id="big">\n<sku>HAM-1</sku>\n<qty>1</qty>\n' + junk * count + b"</order>\n"
        with front.client() as c:
            r = c.post(
                "/xml/upload",
                params={"Interfacename": "orders_out"},  # max_size 10 MB
                content=data,
                headers={"Content-Type": "text/xml"},
                timeout=30,
            )
        assert r.status_code == 400, r.text
        return r.text.split()[0], data

    upload(1000)
    upload(3000)  # the peak memory of an upload, whatever its size ...
    before = vm_hwm(front.server.proc.pid)
    name, data = upload(9000)  # ... three times as large costs nothing more
    assert (front.site.root / "joberrors" / name).read_bytes() == data  # kept whole
    grown = vm_hwm(front.server.proc.pid) - before
    assert grown < 4 * 1024, f"a 9 MB upload took {grown} kB more than a 3 MB one"


def test_upload_queues_the_job_and_answers_201_with_its_name(front: Front) -> None:
    with front.client() as c:
        r = c.post(
            "/xml/upload",
            params={"Interfacename": "orders_in", "RefName": "PO 4711/a"},
            content=VALID,
            headers={"Content-Type": "text/xml"},
        )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("text/plain")
    name = r.text
    assert name.startswith("orders_in-") and name.endswith(".xml") and "\n" not in name
    assert r.headers["location"] == f"/xml/job?Jobname={name}"
    assert (front.site.root / "queue" / "orders_in" / name).read_bytes() == VALID
    assert front.site.run("status", name).stdout == "queue/orders_in\n"
    # The queued job's history: received by upload, with the client's reference and user.
    pending = front.site.root / "state" / "pending" / f"{name},log.xml"
    assert kinds(pending) == ["received", "note", "checked", "moved"]
    assert b'via="upload"' in pending.read_bytes()
    assert b"uploaded by alice" in pending.read_bytes()
    assert b'ref="PO 4711/a"' in pending.read_bytes()


def test_upload_finds_the_interface_from_the_root_element(front: Front) -> None:
    assert (front.site.root / "queue" / "stock_in" / front.upload(STOCK_VALID)).is_file()
    assert (front.site.root / "queue" / "orders_in" / front.upload(VALID)).is_file()
    with front.client() as c:
        r = c.post("/xml/upload", content=b"<invoice/>", headers={"Content-Type": "text/xml"})
    assert r.status_code == 400
    assert "no interface accepts root element 'invoice'" in r.text


def test_a_rejected_upload_is_400_with_the_errors_and_lands_in_joberrors(front: Front) -> None:
    with front.client() as c:
        r = c.post(
            "/xml/upload",
            params={"Interfacename": "orders_in"},
            content=INVALID,
            headers={"Content-Type": "application/xml; charset=utf-8"},
        )
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("text/plain")
        headline, *errors = r.text.splitlines()
        name = headline.split()[0]
        assert "rejected into joberrors" in headline
        assert errors and errors[0].startswith("line 4, column")
        assert "qty" in errors[0]
        assert (front.site.root / "joberrors" / name).read_bytes() == INVALID
        assert c.get("/xml/jobstatus", params={"Jobname": name}).text == "joberrors"
        log = c.get("/xml/joblog", params={"Jobname": name})
    assert log.status_code == 200 and log.headers["content-type"] == "application/xml"
    stored = (front.site.root / "joberrors" / f"{name},log.xml").read_bytes()
    assert kinds(log.content) == kinds(stored) == ["received", "note", "checked", "moved"]
    # The partner sees the schema by its name, not where it lives on the server.
    assert f'schema="{front.site.dir}/schemas/order.xsd"'.encode() in stored
    assert b'schema="order.xsd"' in log.content and str(front.site.dir).encode() not in log.content


def test_upload_refuses_what_is_not_an_xml_job(front: Front) -> None:
    with front.client() as c:
        empty = c.post("/xml/upload", params={"Interfacename": "orders_in"}, content=b"")
        form = c.post("/xml/upload", params={"Interfacename": "orders_in"}, data={"a": "b"})
        ref = c.post(
            "/xml/upload", params={"Interfacename": "orders_in", "RefName": "a\tb"}, content=VALID
        )
    assert (empty.status_code, empty.text) == (
        400,
        "the body is empty: send the job as the request body\n",
    )
    assert form.status_code == 400 and "Content-Type must be text/xml" in form.text
    assert ref.status_code == 400 and "RefName" in ref.text


def test_an_oversized_body_is_413_and_nothing_is_kept(front: Front) -> None:
    before = sorted(p.name for p in front.site.root.rglob("*"))
    big = VALID.replace(b"<sku>", b"<sku>" + b"x" * 2000)  # orders_in takes 1KB
    with front.client() as c:
        declared = c.post("/xml/upload", params={"Interfacename": "orders_in"}, content=big)
        streamed = c.post(
            "/xml/upload",
            params={"Interfacename": "orders_in"},
            content=chunks(big[:500], big[500:]),
        )
        # Without Interfacename= the largest max_size applies first, then the chosen one's.
        detected = c.post("/xml/upload", content=big)
    for r in (declared, streamed, detected):
        assert r.status_code == 413, r.text
        assert "larger than max_size (1000 bytes)" in r.text
        assert r.headers["connection"] == "close"
    assert sorted(p.name for p in front.site.root.rglob("*")) == before


# --- jobqueue, jobstatus, joblog -----------------------------------------------------------


def test_jobqueue_lists_the_queue_in_processing_order(front: Front) -> None:
    names = [front.upload(STOCK_VALID, Interfacename="stock_in") for _ in range(3)]
    with front.client() as c:
        r = c.get("/xml/jobqueue", params={"Interfacename": "stock_in"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; charset=utf-8"
    listed = r.text.splitlines()
    assert [n for n in listed if n in names] == names
    assert r.text.endswith("\n")
    assert listed == front.site.run("queue", "stock_in").stdout.splitlines()


def test_jobstatus_answers_the_status_string(front: Front) -> None:
    name = front.upload()
    with front.client() as c:
        r = c.get("/xml/jobstatus", params={"Jobname": name})
        unknown = c.get("/xml/jobstatus", params={"Jobname": "no-such-job.xml"})
        invalid = c.get("/xml/jobstatus", params={"Jobname": "../etc/passwd"})
    assert (r.status_code, r.text) == (200, "queue/orders_in")
    assert r.headers["content-type"].startswith("text/plain")
    assert (unknown.status_code, unknown.text) == (400, "unknown job 'no-such-job.xml'\n")
    assert invalid.status_code == 400 and "invalid job name" in invalid.text


def test_joblog_of_a_queued_job_is_503_try_later(front: Front) -> None:
    name = front.upload()
    with front.client() as c:
        r = c.get("/xml/joblog", params={"Jobname": name})
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["retry-after"]
    assert "its log is written when it is processed" in r.text


def test_parameters_are_checked(front: Front) -> None:
    with front.client() as c:
        missing = c.get("/xml/jobstatus")
        unknown = c.get("/xml/jobstatus", params={"jobname": "x.xml"})
        twice = c.get("/xml/jobstatus?Jobname=a.xml&Jobname=b.xml")
        neither = c.get("/xml/job")
    assert (missing.status_code, missing.text) == (
        400,
        "missing parameter Jobname (or RefName, your reference of an upload)\n",
    )
    assert unknown.status_code == 400 and "unknown parameter 'jobname'" in unknown.text
    assert twice.status_code == 400 and "given twice" in twice.text
    assert neither.status_code == 400 and "Jobname= or Interfacename=" in neither.text


# --- download --------------------------------------------------------------------------------


def test_the_first_download_of_an_out_job_moves_it_to_bak(front: Front) -> None:
    name = front.upload(Interfacename="orders_out", RefName="ship-1")
    with front.client("bob") as c:
        assert name in c.get("/xml/jobqueue", params={"Interfacename": "orders_out"}).text
        r = c.get("/xml/job", params={"Jobname": name})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/xml"
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert r.content == VALID
        bak = front.site.root / "bak" / "orders_out"
        assert (bak / name).read_bytes() == VALID
        assert not (front.site.root / "queue" / "orders_out" / name).exists()
        assert not (front.site.root / "state" / "pending" / f"{name},log.xml").exists()
        assert name not in c.get("/xml/jobqueue", params={"Interfacename": "orders_out"}).text
        assert c.get("/xml/jobstatus", params={"Jobname": name}).text == "bak/orders_out"
        # Its log tells the whole story, the client's reference and the download included.
        log = (bak / f"{name},log.xml").read_bytes()
        assert kinds(log) == ["received", "note", "checked", "moved", "note", "moved"]
        assert b'ref="ship-1"' in log and b"downloaded by bob" in log
        assert kinds(c.get("/xml/joblog", params={"Jobname": name}).content) == kinds(log)
        # A lost answer loses nothing: the job downloads again, from bak, and stays there.
        again = c.get("/xml/job", params={"Jobname": name})
    assert again.status_code == 200 and again.content == VALID
    assert (bak / name).is_file() and (bak / f"{name},log.xml").read_bytes() == log


def test_download_by_interface_takes_the_head_of_the_queue(front: Front) -> None:
    with front.client("bob") as c:
        while c.get("/xml/job", params={"Interfacename": "orders_out"}).status_code == 200:
            pass  # take whatever earlier tests left
        first = front.upload(VALID, Interfacename="orders_out")
        second = front.upload(VALID.replace(b'id="1"', b'id="2"'), Interfacename="orders_out")
        a = c.get("/xml/job", params={"Interfacename": "orders_out"})
        b = c.get("/xml/job", params={"Interfacename": "orders_out"})
        empty = c.get("/xml/job", params={"Interfacename": "orders_out"})
    assert a.headers["content-disposition"] == f'attachment; filename="{first}"'
    assert b.headers["content-disposition"] == f'attachment; filename="{second}"'
    assert b'id="2"' in b.content
    # Nothing queued yet: the same request may succeed later.
    assert (empty.status_code, empty.text) == (503, "no job queued on orders_out\n")
    assert empty.headers["retry-after"] == "30"
    assert front.site.run("queue", "orders_out").stdout == ""


def test_xslt_transforms_the_download(front: Front) -> None:
    name = front.upload(Interfacename="orders_out")
    with front.client("bob") as c:
        unknown = c.get("/xml/job", params={"Jobname": name, "xslt": "nope"})
        failing = c.get("/xml/job", params={"Jobname": name, "xslt": "failing"})
        # Neither was a download: the job is still queued.
        assert c.get("/xml/jobstatus", params={"Jobname": name}).text == "queue/orders_out"
        r = c.get("/xml/job", params={"Jobname": name, "xslt": "summary"})
    assert unknown.status_code == 400
    assert unknown.text == "unknown xslt 'nope' for orders_out (known: failing, summary)\n"
    assert failing.status_code == 400 and "no sku here" in failing.text
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "order 1: 3 x HAM-1"
    assert (front.site.root / "bak" / "orders_out" / name).read_bytes() == VALID


# --- authentication and grants -----------------------------------------------------------------

METHODS = [
    ("GET", "/xml/jobqueue?Interfacename=orders_out"),
    ("GET", "/xml/joblog?Jobname=x.xml"),
    ("GET", "/xml/jobstatus?Jobname=x.xml"),
    ("POST", "/xml/upload?Interfacename=orders_out"),
    ("GET", "/xml/job?Interfacename=orders_out"),
]


@pytest.mark.parametrize(("method", "path"), METHODS)
def test_every_method_needs_good_credentials(front: Front, method: str, path: str) -> None:
    answers = {}
    with front.server.client() as c:
        for case, headers in {
            "none": {},
            "wrong password": {"Authorization": basic("alice", "not-her-password")},
            "unknown user": {"Authorization": basic("mallory", "alice-Secret-1")},
            "not basic": {"Authorization": "Bearer abc"},
        }.items():
            answers[case] = c.request(method, path, headers=headers, content=VALID)
    for case, r in answers.items():
        assert r.status_code == 401, case
        assert r.headers["www-authenticate"] == 'Basic realm="jobspool", charset="UTF-8"'
        assert r.headers["content-type"].startswith("text/plain")
    # A wrong password and an unknown user get the same answer.
    assert answers["wrong password"].text == answers["unknown user"].text
    assert not (front.site.root / "queue" / "orders_out").joinpath("x.xml").exists()


def test_a_good_user_is_let_in_and_htpasswd_hashes_work(front: Front) -> None:
    for user in ("alice", "bob", "carol"):  # carol's hash was made by htpasswd -B
        with front.client(user) as c:
            r = c.get("/xml/jobqueue", params={"Interfacename": "orders_out"})
        assert r.status_code == 200, (user, r.text)


def test_a_job_on_an_interface_not_granted_looks_like_an_unknown_job(front: Front) -> None:
    queued = front.upload()  # orders_in: alice's, not bob's
    with front.client() as c:
        rejected = c.post("/xml/upload", params={"Interfacename": "orders_in"}, content=INVALID)
    in_errors = rejected.text.split()[0]  # joberrors: its interface is read from its log
    with front.client("bob") as c:
        for name in (queued, in_errors):
            for path in ("/xml/jobstatus", "/xml/joblog", "/xml/job"):
                same_answer(
                    c.get(path, params={"Jobname": name}),
                    c.get(path, params={"Jobname": "no-such.xml"}),
                    name,
                    "no-such.xml",
                )
    assert front.site.run("status", queued).stdout == "queue/orders_in\n"  # untouched


def test_an_interface_not_granted_looks_like_an_unknown_interface(front: Front) -> None:
    with front.client("bob") as c:
        for method, path in [
            ("GET", "/xml/jobqueue"),
            ("GET", "/xml/job"),
            ("POST", "/xml/upload"),
        ]:
            theirs = c.request(method, path, params={"Interfacename": "orders_in"}, content=VALID)
            none = c.request(method, path, params={"Interfacename": "nowhere"}, content=VALID)
            same_answer(theirs, none, "orders_in", "nowhere")
            assert "(yours: orders_out)" in theirs.text  # and never anyone else's
        # A document whose root only an interface of someone else accepts.
        same_answer(
            c.post("/xml/upload", content=VALID),
            c.post("/xml/upload", content=VALID.replace(b"order", b"stuff")),
            "order",
            "stuff",
        )


def test_wrong_method_is_405_and_unknown_path_404(front: Front) -> None:
    name = front.upload(Interfacename="orders_out")
    with front.client() as c:
        post = c.post("/xml/jobstatus", params={"Jobname": "x.xml"})
        get = c.get("/xml/upload")
        head = c.head("/xml/job", params={"Jobname": name})  # would be a download unseen
        nothing = c.get("/xml/nothing")
        assert c.head("/xml/jobstatus", params={"Jobname": name}).status_code == 200
    assert head.status_code == 405 and head.headers["allow"] == "GET"
    assert front.site.run("status", name).stdout == "queue/orders_out\n"
    with front.server.client() as anonymous:
        hidden = anonymous.get("/xml/nothing")
    assert post.status_code == 405 and "GET" in post.headers["allow"]
    assert get.status_code == 405 and get.headers["allow"] == "POST"
    assert nothing.status_code == 404
    assert hidden.status_code == 401  # no credentials, nothing learnt


# --- plain http ---------------------------------------------------------------------------------


def test_plain_http_to_the_tls_port_gets_no_answer(front: Front) -> None:
    with httpx.Client(timeout=DEADLINE) as c, pytest.raises(httpx.HTTPError):
        c.get(
            f"http://127.0.0.1:{front.server.port}/xml/jobstatus?Jobname=x.xml",
            headers={"Authorization": basic("alice", PASSWORDS["alice"])},
        )


def test_serve_refuses_to_run_without_tls_unless_behind_a_trusted_proxy(front: Front) -> None:
    plain = write_config(front.site.dir, f"  listen: 127.0.0.1:{free_port()}", "plain.yaml")
    line = assert_fails(run("-c", str(plain), "serve", env=front.site.env()), 78)
    assert "http: needs cert: and key:" in line and "--insecure-behind-proxy" in line
    proxied = run("-c", str(plain), "serve", "--insecure-behind-proxy", env=front.site.env())
    line = assert_fails(proxied, 78)
    assert "needs http.trusted_proxies" in line
    line = assert_fails(front.site.run("serve", "--insecure-behind-proxy"), 2)
    assert "without cert: and key:" in line


def test_behind_a_proxy_plain_http_is_403_unless_the_proxy_says_https(front: Front) -> None:
    port = free_port()
    config = write_config(front.site.dir, BEHIND_PROXY.format(port=port), "proxied.yaml")
    server = Server(config, port, None, front.site.env(), ("--insecure-behind-proxy",)).start()
    try:
        with server.client("alice", PASSWORDS["alice"]) as c:
            direct = c.get("/xml/jobqueue", params={"Interfacename": "orders_out"})
            proxied = c.get(
                "/xml/jobqueue",
                params={"Interfacename": "orders_out"},
                headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"},
            )
            said_http = c.get(
                "/xml/jobqueue",
                params={"Interfacename": "orders_out"},
                headers={"X-Forwarded-Proto": "http"},
            )
        # 127.0.0.2 is loopback too, but not the trusted proxy.
        stranger = httpx.HTTPTransport(local_address="127.0.0.2")
        with server.client("alice", PASSWORDS["alice"], transport=stranger) as c:
            spoofed = c.get(
                "/xml/jobqueue",
                params={"Interfacename": "orders_out"},
                headers={"X-Forwarded-Proto": "https"},
            )
        for r in (direct, said_http, spoofed):
            assert r.status_code == 403, r.text
            assert r.text == "plain http is refused: use https\n"
            assert "www-authenticate" not in r.headers
        assert proxied.status_code == 200, proxied.text
        clients = [line["client"] for line in server.requests()]
        assert "198.51.100.7" in clients  # the proxy's X-Forwarded-For, trusted
    finally:
        assert server.stop() == 0


# --- slow and greedy clients ----------------------------------------------------------------------


def test_a_client_trickling_its_body_gets_408_and_others_are_served(front: Front) -> None:
    served: list[float] = []
    stop = threading.Event()

    def others() -> None:
        with front.client() as c:
            while not stop.is_set():
                start = time.monotonic()
                r = c.get("/xml/jobqueue", params={"Interfacename": "orders_out"})
                assert r.status_code == 200
                served.append(time.monotonic() - start)
                time.sleep(0.05)

    worker = threading.Thread(target=others)
    worker.start()
    try:
        sock = front.server.tls_socket()
        head = (
            "POST /xml/upload?Interfacename=orders_in HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {basic('alice', PASSWORDS['alice'])}\r\n"
            "Content-Type: text/xml\r\nContent-Length: 900\r\n\r\n"
        )
        sock.sendall(head.encode())
        start, answer = time.monotonic(), b""
        sock.settimeout(0.25)
        while time.monotonic() - start < TIMEOUT + 3 and not answer:
            with contextlib.suppress(OSError):
                sock.sendall(b"<")  # one byte every 0.25 s: 900 bytes would take minutes
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
        took = time.monotonic() - start
        rest, _ = read_response(sock, 2)
        sock.close()
    finally:
        stop.set()
        worker.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert TIMEOUT - 0.5 < took < TIMEOUT + 2
    assert b"connection: close" in (answer + rest).lower()
    assert served and max(served) < TIMEOUT / 2  # never held up by the slow one


def test_a_client_trickling_its_headers_is_cut_off(front: Front) -> None:
    sock = front.server.tls_socket()
    sock.sendall(b"GET /xml/jobstatus?Jobname=x.xml HTTP/1.1\r\nHost: localhost\r\n")
    sock.settimeout(0.25)
    start, closed = time.monotonic(), False
    while time.monotonic() - start < TIMEOUT + 3 and not closed:
        try:
            sock.sendall(b"X")
            closed = sock.recv(1024) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
    took = time.monotonic() - start
    sock.close()
    assert closed and took < TIMEOUT + 1.5


# --- curl, end to end ----------------------------------------------------------------------------


def test_curl_uploads_and_downloads(front: Front) -> None:
    curl = shutil.which("curl") or "/usr/bin/curl"
    job = front.site.dir / "curl-order.xml"
    job.write_bytes(VALID)
    base = [curl, "-sS", "--cacert", str(front.server.ca), "-u", f"alice:{PASSWORDS['alice']}"]
    base += ["-w", "\n%{http_code}"]
    upload = f"{front.server.url}/xml/upload?Interfacename=orders_out&RefName=curl"
    post = ["-H", "Content-Type: text/xml", "--data-binary", f"@{job}", upload]
    up = subprocess.run(
        [*base, *post], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    name, code = up.stdout.rsplit("\n", 1)
    assert code == "201" and name.startswith("orders_out-")
    down = subprocess.run(
        [*base, f"{front.server.url}/xml/job?Jobname={name}"],
        capture_output=True,
        timeout=DEADLINE,
        check=True,
    )
    assert down.stdout == VALID + b"\n200"
    assert (front.site.root / "bak" / "orders_out" / name).is_file()


# --- the access log -------------------------------------------------------------------------------


def test_every_request_leaves_one_json_access_line_and_no_password(front: Front) -> None:
    with front.client() as c:
        c.get("/xml/jobstatus", params={"Jobname": "logged.xml"}, headers={"X-Probe": "1"})
    with front.server.client() as c:
        c.get("/xml/jobstatus", headers={"Authorization": basic("alice", "Wrong-Guess-77")})
    wait_for(
        lambda: any(line.get("query") == "Jobname=logged.xml" for line in front.server.requests()),
        "the access line",
    )
    lines = front.server.requests()
    (line,) = [x for x in lines if x.get("query") == "Jobname=logged.xml"]
    assert {"user", "method", "path", "status", "bytes", "duration_ms", "client"} <= set(line)
    assert (line["user"], line["method"], line["path"], line["status"]) == (
        "alice",
        "GET",
        "/xml/jobstatus",
        400,
    )
    assert line["bytes"] == len("unknown job 'logged.xml'\n")
    assert any(
        x.get("tried") == "alice" and x["status"] == 401 and x["user"] is None for x in lines
    )
    text = front.server.stderr.read_text()
    for secret in [*PASSWORDS.values(), "Wrong-Guess-77", basic("alice", PASSWORDS["alice"])]:
        assert secret not in text
    assert all(x["event"] != "not json" for x in front.server.log())


# --- the load test --------------------------------------------------------------------------------


def test_load_50_concurrent_clients_asking_jobstatus(
    front: Front, capsys: pytest.CaptureFixture[str]
) -> None:
    """A figure for docs/http.rst, not a performance assertion: every request must succeed.

    Each client is a keep-alive TLS connection speaking HTTP/1.1 itself (a few
    lines of asyncio): httpx costs several times what the server does per
    request, and on two cores it would measure itself.
    """
    name = front.upload()
    total, clients, budget = 2000, 50, 20.0
    request = (
        f"GET /xml/jobstatus?Jobname={name} HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: {basic('alice', PASSWORDS['alice'])}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    failures: list[bytes] = []

    async def load() -> float:
        start = time.monotonic()
        sent = 0

        async def one_client() -> None:
            nonlocal sent
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                front.server.port,
                ssl=front.server.ssl_context(),
                server_hostname="localhost",
            )
            while sent < total and time.monotonic() - start < budget:
                sent += 1
                t = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                latencies.append(time.monotonic() - t)
                if not head.startswith(b"HTTP/1.1 200 ") or body != b"queue/orders_in":
                    failures.append(head + body)
            writer.close()

        await asyncio.gather(*(one_client() for _ in range(clients)))
        return time.monotonic() - start

    elapsed = asyncio.run(load())
    p99 = statistics.quantiles(latencies, n=100)[98]
    summary = (
        f"jobstatus: {len(latencies)} requests from {clients} concurrent clients "
        f"in {elapsed:.1f} s: {len(latencies) / elapsed:.0f} requests/s, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms"
    )
    with capsys.disabled():
        print(f"\n{summary}")
    (front.site.dir / "load.txt").write_text(summary + "\n")
    assert failures == []
    assert len(latencies) >= 100


# --- users ----------------------------------------------------------------------------------------


def test_user_commands_manage_the_htpasswd_file_and_the_server_follows(front: Front) -> None:
    htpasswd = front.site.dir / "htpasswd"
    # Passwords never come from the command line.
    assert front.site.run("user", "add", "erin", "Erin-Pw-1").returncode == 2
    line = assert_fails(front.site.run("user", "add", "erin"), 2)
    assert "--password-stdin" in line
    assert_fails(
        front.site.run("user", "add", "erin", "--password-stdin", input="x" * 73 + "\n"), 2
    )
    assert_fails(front.site.run("user", "add", "bad:name", "--password-stdin", input="pw\n"), 2)
    added = front.site.run("user", "add", "erin", "--password-stdin", input="Erin-Pw-1\n")
    assert added.returncode == 0 and "user erin added" in added.stdout
    assert (
        added.stderr == f"jobspool: note: no interface is granted to erin yet "
        f"(http.grants in {front.site.config})\n"
    )
    entry = next(x for x in htpasswd.read_text().splitlines() if x.startswith("erin:"))
    assert entry.startswith("erin:$2y$10$") and len(entry) == len("erin:") + 60
    assert oct(htpasswd.stat().st_mode & 0o777) == "0o640"
    assert_fails(front.site.run("user", "add", "erin", "--password-stdin", input="x\n"), 2)
    with front.client("erin", "Erin-Pw-1") as c:
        r = c.get("/xml/jobqueue", params={"Interfacename": "orders_in"})
    assert (r.status_code, r.text) == (400, "unknown interface 'orders_in' (yours: none)\n")

    assert_ok(
        front.site.run(
            "user", "passwd", "erin", "--password-stdin", "--cost", "4", input="Erin-Pw-2\n"
        )
    )
    with front.client("erin", "Erin-Pw-1") as old, front.client("erin", "Erin-Pw-2") as new:
        assert old.get("/xml/jobstatus", params={"Jobname": "a.xml"}).status_code == 401
        assert new.get("/xml/jobstatus", params={"Jobname": "a.xml"}).status_code == 400
    listed = json.loads(assert_ok(front.site.run("user", "list", "--json")))
    assert {"user": "bob", "bcrypt": True, "interfaces": ["orders_out"]} in listed
    assert [u["user"] for u in listed] == ["alice", "bob", "carol", "erin"]
    assert "alice  orders_in, orders_out, stock_in" in assert_ok(front.site.run("user", "list"))

    assert_ok(front.site.run("user", "remove", "erin"))
    assert_fails(front.site.run("user", "remove", "erin"), 2)
    assert_fails(front.site.run("user", "passwd", "erin", "--password-stdin", input="x\n"), 2)
    with front.client("erin", "Erin-Pw-2") as c:
        assert c.get("/xml/jobstatus", params={"Jobname": "a.xml"}).status_code == 401


# --- configuration, installation, reload ----------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "says"),
    [
        ("  bogus: 1", "http.bogus: unknown key"),
        ("  listen: somewhere", "http.listen: expected host:port"),
        ("  cert: missing.pem\n  key: key.pem", "http.cert: expected an existing certificate"),
        ("  cert: cert.pem", "http: expected both cert: and key:"),
        ("  grants: {alice: [orders_in, nowhere]}", "http.grants.alice: expected configured"),
        ("  grants: {'a:b': [orders_in]}", "http.grants.a:b: expected a user name"),
        ("  trusted_proxies: [proxy.example]", "http.trusted_proxies: expected IP addresses"),
        ("  timeout: soon", "http.timeout: expected a duration"),
        ("  plain_listen: 127.0.0.1:8080", "http.plain_listen: expected cert: and key: too"),
        (
            "  cert: cert.pem\n  key: key.pem\n  plain_listen: 8443",
            "http.plain_listen: expected another address than http.listen",
        ),
        ("  grants: {ops: ['*', consol]}", "or roles (console)"),
        ("  interfaces: {nowhere: {}}", "http.interfaces.nowhere: expected a configured interface"),
        (
            "  interfaces: {orders_in: {move_on_listing: true}}",
            "http.interfaces.orders_in.move_on_listing: expected an _out interface",
        ),
        (
            "  interfaces: {orders_out: {joblog_output: 'yes'}}",
            "http.interfaces.orders_out.joblog_output: expected true or false",
        ),
        (
            "  interfaces: {orders_out: {extensions: {csv: csv}}}",
            "http.interfaces.orders_out.extensions.csv: expected a stylesheet of orders_out's",
        ),
        ("  interfaces: {orders_out: {bogus: 1}}", "http.interfaces.orders_out.bogus: unknown key"),
    ],
)
def test_the_http_section_is_validated_strictly(tmp_path: Path, http: str, says: str) -> None:
    site = make_site(tmp_path)
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    site.config.write_text(site.config.read_text() + "http:\n" + http + "\n")
    line = assert_fails(site.run("interfaces"), 78)
    assert says in line, line
    assert str(site.config) in line


def test_an_interfaces_xslt_must_exist(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    text = site.config.read_text().replace(
        "  orders_out:\n", "  orders_out:\n    xslt: {summary: gone.xsl}\n"
    )
    site.config.write_text(text)
    line = assert_fails(site.run("interfaces"), 78)
    assert "interfaces.orders_out.xslt.summary: expected an existing XSLT stylesheet" in line


def test_serve_check_validates_what_serve_needs(front: Front, tmp_path: Path) -> None:
    assert_ok(front.site.run("serve", "--check"))
    broken = front.site.dir / "xslt" / "broken.xsl"
    broken.write_text(
        "<xsl:stylesheet version='1.0' xmlns:xsl='http://www.w3.org/1999/XSL"
        "/Transform'><xsl:bogus/></xsl:stylesheet>"
    )
    config = front.site.dir / "broken-xslt.yaml"
    config.write_text(front.site.config.read_text().replace("failing.xsl", "broken.xsl"))
    line = assert_fails(run("-c", str(config), "serve", "--check", env=front.site.env()), 78)
    assert "broken.xsl: not a usable XSLT stylesheet" in line
    wrong_key = front.site.dir / "wrong-key.yaml"
    (front.site.dir / "other-key.pem").write_bytes(make_other_key())
    wrong_key.write_text(front.site.config.read_text().replace("key.pem", "other-key.pem"))
    line = assert_fails(run("-c", str(wrong_key), "serve", "--check", env=front.site.env()), 78)
    assert "cannot use them as certificate and key" in line


def make_other_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_serve_without_the_http_extra_says_so_in_one_line(front: Front) -> None:
    # As if uvicorn were not installed: find_spec() sees None in sys.modules.
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from jobspool.cli import main\n"
        f"main(['-c', {str(front.site.config)!r}, 'serve'])"
    )
    env = front.site.env()
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 78
    assert result.stderr == (
        "jobspool: 'jobspool serve' needs the http extra: pip install 'jobspool[http]' "
        "(missing: uvicorn)\n"
    )


def test_sighup_reloads_grants_a_broken_file_is_refused_and_500_hides_details(
    tmp_path: Path,
) -> None:
    port = free_port()
    site = prepare_site(tmp_path, TLS.format(port=port))
    config = site.config
    add_user(site, "bob", PASSWORDS["bob"])
    server = Server(config, port, site.dir / "ca.pem", site.env()).start()
    try:
        name = "reload-me.xml"
        assert_ok(site.submit(name))
        with server.client("bob", PASSWORDS["bob"]) as c:
            assert c.get("/xml/jobstatus", params={"Jobname": name}).status_code == 400
            config.write_text(
                config.read_text().replace("bob: [orders_out]", "bob: [orders_out, orders_in]")
            )
            assert server.proc is not None
            server.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: any(x["event"] == "configuration reloaded" for x in server.log()),
                "the reload",
            )
            assert c.get("/xml/jobstatus", params={"Jobname": name}).text == "queue/orders_in"
            config.write_text(config.read_text() + "  nonsense: 1\n")
            server.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: any("reload refused" in x["event"] for x in server.log()), "the refusal"
            )
            assert c.get("/xml/jobstatus", params={"Jobname": name}).text == "queue/orders_in"
            # A users file the server cannot read is its own trouble: 500, details in its log.
            users = site.dir / "htpasswd"
            good = users.read_text()
            users.write_text(good + "garbage without a colon\n")
            broken = c.get("/xml/jobstatus", params={"Jobname": name})
            assert broken.status_code == 500
            rid = broken.text.split()[-1]
            assert broken.text == f"internal error: see the server's log for request {rid}\n"
            (failed,) = [x for x in server.log() if x["event"] == "request failed"]
            assert failed["id"] == rid and "line 2: expected user:hash" in failed["error"]
            users.write_text(good)
            assert c.get("/xml/jobstatus", params={"Jobname": name}).status_code == 200
    finally:
        assert server.stop() == 0


# --- the error mapping, the unit ------------------------------------------------------------------


def test_the_core_exceptions_map_to_status_codes_in_one_place() -> None:
    from jobspool.errors import (
        BadRequest,
        ConfigError,
        Denied,
        JobspoolError,
        Rejected,
        TryLater,
    )
    from jobspool.http.app import error_response, status_of

    cases = [
        (BadRequest("x"), 400),
        (Rejected("x"), 400),
        (TryLater("x"), 503),
        (Denied("x"), 500),
        (ConfigError("x"), 500),
        (JobspoolError("x"), 500),
        (KeyError("bug"), 500),
    ]
    assert [status_of(exc) for exc, _ in cases] == [status for _, status in cases]
    secret = Denied("cannot write /var/spool/jobspool/queue/a/x.xml: Permission denied")
    response = error_response(secret, Path("/var/spool/jobspool"), "ab12cd34")
    assert response.status_code == 500
    assert bytes(response.body) == b"internal error: see the server's log for request ab12cd34\n"
    full = error_response(
        TryLater("cannot write x: No space left on device (/var/spool/jobspool/queue/a/x)"),
        Path("/var/spool/jobspool"),
        "x",
    )
    assert bytes(full.body) == b"cannot write x: No space left on device (queue/a/x)\n"


def test_the_unit_is_sandboxed_and_its_exposure_documented() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figure = float(
        result.stdout.split("Overall exposure level for jobspool-http.service: ")[1].split()[0]
    )
    assert figure <= 2.0
    assert f"exposure level of {figure:.1f}" in " ".join(DOC.read_text().split())
    text = UNIT.read_text()
    for line in (
        "ExecStart=/usr/bin/jobspool serve",
        "ReadWritePaths=/var/spool/jobspool",
        "User=jobspool",
        "Group=jobspool",
        "PrivateNetwork=no",
        "RestartPreventExitStatus=78",
        "Type=notify",
    ):
        assert f"\n{line}\n" in text, line
