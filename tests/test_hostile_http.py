"""Hostile XML through the HTTPS front: the table of :data:`tests.kit.hostile.HOSTILE`
uploaded to a real ``jobspool serve`` (``POST /xml/upload?Interfacename=orders_in``).

Every document is refused within 2 s with a short text answer naming the
reason, without the local secret showing up in the answer, the server's log or
any file under the spool, and without a connection to the loopback listener the
documents point at. A document that fails its check is 400 and kept byte for
byte in ``joberrors`` with its log; one larger than ``max_size`` is 413 and
nothing is stored (docs/http.rst); an empty body is 400 and nothing is stored
(there is no job to keep). A valid upload afterwards is still 201.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.kit import (
    HOSTILE,
    Bait,
    Hostile,
    Listener,
    Server,
    Site,
    assert_every_log_valid,
    assert_ok,
    free_port,
    kinds,
    make_certificates,
    make_site,
    order,
    reason_ok,
    snapshot,
)

MAX_SIZE = 256_000
WITHIN = 2.0  # seconds a hostile upload may take to be answered
SHORT = 4096  # characters an answer may have
USER, PASSWORD = "partner", "partner-Secret-9"

CONFIG = f"""\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [/bin/true]
    max_size: {MAX_SIZE}
    root_elements: [order]
http:
  listen: 127.0.0.1:{{port}}
  cert: cert.pem
  key: key.pem
  users: htpasswd
  grants:
    {USER}: [orders_in]
  timeout: 10s
"""

# What the server does with each case besides a rejection into joberrors.
TOO_LARGE = {"over-max-size"}  # 413, nothing stored
EMPTY = {"empty"}  # 400 "the body is empty", nothing stored

CASES = [pytest.param(case, id=case.id) for case in HOSTILE]


@dataclass
class HostileFront:
    site: Site
    server: Server
    listener: Listener
    bait: Bait

    def client(self) -> httpx.Client:
        return self.server.client(USER, PASSWORD)

    def nothing_leaked(self, *texts: str) -> None:
        marker = self.bait.marker
        for text in texts:
            assert marker not in text
        for path in self.site.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert marker.encode() not in path.read_bytes(), f"the secret leaked into {path}"
        assert marker not in self.server.stderr.read_text(errors="replace")

    def no_connection(self) -> None:
        time.sleep(0.05)  # a connection attempt in flight is accepted by now
        assert self.listener.connections == [], "an upload opened a connection"


@pytest.fixture(scope="module")
def hfront(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileFront]:
    site = make_site(tmp_path_factory.mktemp("hostile-http"))
    make_certificates(site.dir)
    port = free_port()
    site.config.write_text(CONFIG.format(port=port))
    assert_ok(site.run("init"))
    add = ["user", "add", USER, "--password-stdin", "--cost", "4"]
    assert_ok(site.run(*add, input=PASSWORD + "\n"))
    listener = Listener()
    bait = Bait.make(site.dir, listener.url)
    server = Server(site.config, port, site.dir / "ca.pem", site.env()).start()
    front = HostileFront(site, server, listener, bait)
    try:
        yield front
        front.nothing_leaked()
        front.no_connection()
    finally:
        status = server.stop()
        listener.close()
    assert status == 0, server.stderr.read_text()[-3000:]
    assert_every_log_valid(site.dir)


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_upload_is_refused(hfront: HostileFront, case: Hostile) -> None:
    data = case.data(hfront.bait, MAX_SIZE)
    before = snapshot(hfront.site.root)
    errors_before = set((hfront.site.root / "joberrors").iterdir())

    with hfront.client() as c:
        c.get("/xml/jobqueue", params={"Interfacename": "orders_in"})  # TLS and login first
        start = time.monotonic()
        r = c.post(
            "/xml/upload",
            params={"Interfacename": "orders_in"},
            content=data,
            headers={"Content-Type": "text/xml"},
        )
        took = time.monotonic() - start

    assert took < WITHIN, took
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    assert len(r.text) < SHORT, r.text[:500]
    assert "Traceback" not in r.text
    assert all(line.isprintable() for line in r.text.splitlines()), r.text[:500]
    hfront.nothing_leaked(r.text)
    hfront.no_connection()

    if case.id in TOO_LARGE:
        assert r.status_code == 413, r.text
        assert f"larger than max_size ({MAX_SIZE} bytes)" in r.text
        assert r.headers["connection"] == "close"
        assert reason_ok(case, r.text), r.text
        assert snapshot(hfront.site.root) == before  # nothing stored
        return
    assert r.status_code == 400, r.text
    if case.id in EMPTY:
        assert r.text == "the body is empty: send the job as the request body\n"
        assert reason_ok(case, r.text), r.text
        assert snapshot(hfront.site.root) == before  # nothing stored
        return

    headline, *errors = r.text.splitlines()
    name = headline.split()[0]
    assert name.startswith("orders_in-") and name.endswith(".xml"), headline
    assert "rejected into joberrors" in headline, headline
    assert errors, r.text
    assert reason_ok(case, errors[0]), errors[0]
    # In joberrors with its log, all of it; queued nowhere.
    assert set((hfront.site.root / "joberrors").iterdir()) - errors_before == {
        hfront.site.root / "joberrors" / name,
        hfront.site.root / "joberrors" / f"{name},log.xml",
    }
    assert (hfront.site.root / "joberrors" / name).read_bytes() == data
    log = (hfront.site.root / "joberrors" / f"{name},log.xml").read_bytes()
    assert kinds(log) == ["received", "note", "checked", "moved"]  # note: uploaded by USER
    assert b'via="upload"' in log
    assert not (hfront.site.root / "queue" / "orders_in" / name).exists()


def test_a_valid_upload_still_gets_201(hfront: HostileFront) -> None:
    data = order("after-the-hostiles")
    with hfront.client() as c:
        r = c.post(
            "/xml/upload",
            params={"Interfacename": "orders_in"},
            content=data,
            headers={"Content-Type": "text/xml"},
        )
    assert r.status_code == 201, r.text
    assert (hfront.site.root / "queue" / "orders_in" / r.text).read_bytes() == data
    assert hfront.server.proc is not None and hfront.server.proc.poll() is None
    hfront.nothing_leaked(r.text)
    hfront.no_connection()
