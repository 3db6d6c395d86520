"""Notifications, end to end: real servers receive what the real daemon sends.

A real SMTP server (aiosmtpd, with STARTTLS and a login, on the test's
certificate) gets the mails, a local HTTPS server (the standard library's,
same certificate) the webhooks, and a shell script stands for a command
route and for ``sendmail -t``, recording what it was given. A burst of 500
rejected drops must come out as a handful of notifications that count all
500, while every job still ends in exactly one place; a route that hangs or
fails must not hold up a job. The ``notify:`` section is checked as strictly
as the rest of the configuration.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from jobspool import alerts, config, notices
from tests.kit import DEADLINE, FAST, Site, assert_fails, free_port, make_certificates, wait_for

# --- the servers ------------------------------------------------------------------------


class Inbox:
    """An SMTP server that takes mail only over STARTTLS from user jobspool, password s3cret."""

    def __init__(self, directory: Path) -> None:
        self.ca, cert, key = make_certificates(directory)
        self.messages: list[tuple[str, list[str], Message, bool]] = []
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        self.port = free_port()
        self.controller = Controller(
            self, hostname="127.0.0.1", port=self.port, tls_context=tls, require_starttls=True,
            auth_required=True, authenticator=self.authenticate,
        )  # fmt: skip
        self.controller.start()

    @staticmethod
    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"jobspool",
            b"s3cret",
        )
        return AuthResult(success=ok)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg,
                              session.authenticated))  # fmt: skip
        return "250 OK"

    def stop(self) -> None:
        self.controller.stop()


class Hooks:
    """An HTTPS server that records each POST; answers ``failures`` 503s before a 200."""

    def __init__(self, directory: Path, failures: int = 0) -> None:
        self.ca, cert, key = make_certificates(directory)
        self.posts: list[tuple[dict[str, str], Any, int]] = []
        self.answers = [503] * failures
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = hooks.answers.pop(0) if hooks.answers else 200
                hooks.posts.append((dict(self.headers), json.loads(body), status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}/hooks/T0K3N"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def received(self) -> list[Any]:
        return [body for _, body, status in self.posts if status == 200]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    (tmp_path / "smtp-certs").mkdir()
    box = Inbox(tmp_path / "smtp-certs")
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
def hooks(tmp_path: Path) -> Iterator[Hooks]:
    (tmp_path / "hook-certs").mkdir()
    h = Hooks(tmp_path / "hook-certs", failures=1)
    try:
        yield h
    finally:
        h.stop()


# --- a site with routes ---------------------------------------------------------------------


# Written under hidden names, then renamed (the .env first): a test reads only whole records.
RECORD = (
    'n=$(date +%s%N); cat > "$T/.$1-$n.json"; env | grep ^JOBSPOOL_ | sort > "$T/.$1-$n.env"; '
    'mv "$T/.$1-$n.env" "$T/$1-$n.env"; mv "$T/.$1-$n.json" "$T/$1-$n.json"'
)


def write_config(site: Site, routes: dict[str, Any], **notify: Any) -> None:
    handler = site.script("handler", 'case "$1" in *bad*) exit 3;; *later*) exit 75;; esac')
    data = {
        "spool": "spool",
        "interfaces": {
            "orders_in": {"schema": "schemas/order.xsd", "command": [handler]},
        },
        "daemon": FAST,
        "notify": {"gather": "1s", "interval": "10s", **notify, "routes": routes},
    }
    site.config.write_text(yaml.safe_dump(data, sort_keys=False))


def smtp_route(site: Site, inbox: Inbox, **extra: Any) -> dict[str, Any]:
    creds = site.dir / "smtp-credentials"
    creds.write_text("jobspool\ns3cret\n")
    creds.chmod(0o600)
    return {
        "mail": {
            "to": ["ops@example.com", "oncall@example.com"],
            "from": "jobspool@example.com",
            "smtp": f"127.0.0.1:{inbox.port}",
            "credentials": str(creds),
            "ca": str(inbox.ca),
        },
        **extra,
    }


def recorded(site: Site, prefix: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """What a recording command route was given: (stdin JSON, JOBSPOOL_* variables)."""
    out = []
    for path in sorted(site.dir.glob(f"{prefix}-*.json")):
        env_file = path.with_suffix(".env")
        if not env_file.exists():
            continue
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        out.append((json.loads(path.read_text()), env))
    return out


# --- jobspool notify test -----------------------------------------------------------------


def test_notify_test_goes_through_every_route(
    site: Site, inbox: Inbox, hooks: Hooks, tmp_path: Path
) -> None:
    sendmail = site.script(
        "fake-sendmail", 'echo "$@" > "$T/sendmail.args"; cat > "$T/sendmail.eml"'
    )
    write_config(
        site,
        {
            "script": {"command": [site.script("record", RECORD), "script"]},
            "relay": smtp_route(site, inbox),
            "local-mta": {"mail": {"to": "root@localhost", "sendmail": [sendmail, "-t", "-oi"]}},
            "chat": {
                "webhook": {"url": hooks.url, "ca": str(hooks.ca), "headers": {"X-Token": "abc"}}
            },
        },
    )
    site.init()
    result = site.run("notify", "test")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["script: sent", "relay: sent", "local-mta: sent",
                                          "chat: sent"]  # fmt: skip

    [(stdin, env)] = recorded(site, "script")
    assert stdin["counts"] == {"test": 1}
    assert stdin["events"][0]["kind"] == "test"
    assert env["JOBSPOOL_EVENT"] == "test"
    assert env["JOBSPOOL_COUNT"] == "1"
    assert env["JOBSPOOL_SPOOL"] == str(site.root)

    [(sender, rcpts, msg, authenticated)] = inbox.messages
    assert (sender, rcpts, authenticated) == (
        "jobspool@example.com",
        ["ops@example.com", "oncall@example.com"],
        True,
    )
    assert msg["Subject"].startswith(f"jobspool on {socket.gethostname()}: test")
    assert msg["Auto-Submitted"] == "auto-generated"

    assert (site.dir / "sendmail.args").read_text() == "-t -oi\n"
    eml = message_from_bytes((site.dir / "sendmail.eml").read_bytes())
    assert eml["To"] == "root@localhost"
    assert "From" not in eml  # the MTA sets it, as for cron's mail

    # The webhook was answered 503 once, then taken on the retry.
    assert [status for _, _, status in hooks.posts] == [503, 200]
    headers, body = hooks.posts[-1][0], hooks.received()[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Token"] == "abc"
    assert body["text"].startswith("jobspool on ")
    assert body["counts"] == {"test": 1}


def test_notify_test_says_which_route_failed(site: Site, tmp_path: Path) -> None:
    write_config(
        site,
        {
            "fine": {"command": ["/bin/true"]},
            "broken": {"command": ["/bin/sh", "-c", "echo mailbox full >&2; exit 4"]},
            "nowhere": {
                "webhook": {"url": f"https://127.0.0.1:{free_port()}/x", "retries": 0},
                "timeout": "2s",
            },
        },
    )
    site.init()
    result = site.run("notify", "test")
    assert result.returncode == 75, result
    lines = result.stdout.splitlines()
    assert lines[0] == "fine: sent"
    assert lines[1] == "broken: NOT SENT: /bin/sh exited 4: mailbox full"
    assert lines[2].startswith("nowhere: NOT SENT: https://127.0.0.1:")
    assert "1 tries" in lines[2]
    only = site.run("notify", "test", "--route", "fine")
    assert (only.returncode, only.stdout) == (0, "fine: sent\n")
    assert_fails(site.run("notify", "test", "--route", "nope"), 2)


# --- the daemon -------------------------------------------------------------------------------


def test_a_burst_of_500_rejections_and_failures_is_a_handful_of_mails(
    site: Site, inbox: Inbox
) -> None:
    write_config(site, {"ops": smtp_route(site, inbox, events=["job-rejected", "job-failed"])},
                 gather="2s", interval="10s")  # fmt: skip
    site.init()
    daemon = site.start()
    broken = [f"broken-{n:03d}.xml" for n in range(480)]
    bad = [f"bad-{n:03d}.xml" for n in range(20)]
    for n, name in enumerate(broken):
        site.drop("orders_in", name, b"<order>")
        if n % 24 == 0:
            site.drop("orders_in", bad[n // 24])

    def counted(what: str) -> int:
        total = 0
        for _, _, msg, _ in inbox.messages:
            found = re.search(rf"(\d+) job\(s\) {what}", msg["Subject"])
            total += int(found.group(1)) if found else 0
        return total

    site.wait_for(lambda: (counted("rejected"), counted("failed")) == (480, 20),
                  "mails counting all 480 rejections and 20 failures", timeout=120)  # fmt: skip
    time.sleep(3)  # nothing more comes
    assert (counted("rejected"), counted("failed")) == (480, 20)
    assert 1 <= len(inbox.messages) <= 5, [m["Subject"] for _, _, m, _ in inbox.messages]
    payload = inbox.messages[0][2].get_payload(decode=True)
    assert isinstance(payload, bytes)
    body = payload.decode()
    assert "First events:" in body
    assert "orders_in: broken-000.xml job-rejected (" in body
    assert "journalctl -t jobspool -p warning" in body
    # Every job is in exactly one place: joberrors.
    places = site.places()
    assert sorted(places) == sorted(broken + bad)
    assert all(places[n] == ["joberrors"] for n in places)
    assert daemon.stop() == 0


def test_a_failed_job_reaches_the_webhook_and_the_command(site: Site, hooks: Hooks) -> None:
    write_config(
        site,
        {
            "chat": {"webhook": {"url": hooks.url, "ca": str(hooks.ca)}, "events": "job-failed"},
            "script": {"command": [site.script("record", RECORD), "script"], "events": "all"},
        },
    )
    site.init()
    daemon = site.start()
    site.drop("orders_in", "bad-7.xml")
    site.drop("orders_in", "good-7.xml")
    site.wait_in("bad-7.xml", "joberrors")
    site.wait_in("good-7.xml", "bak/orders_in")
    [body] = site.wait_for(hooks.received, "the webhook")
    assert body["counts"] == {"job-failed": 1}
    event = body["events"][0]
    assert (event["kind"], event["job"], event["interface"], event["reason"]) == (
        "job-failed", "bad-7.xml", "orders_in", "exit 3",
    )  # fmt: skip
    assert (
        body["text"]
        == f"jobspool on {socket.gethostname()}: orders_in: bad-7.xml job-failed (exit 3)"
    )
    [(stdin, env)] = site.wait_for(lambda: recorded(site, "script"), "the command")
    assert stdin["events"][0]["job"] == "bad-7.xml"
    assert (env["JOBSPOOL_EVENT"], env["JOBSPOOL_JOB"], env["JOBSPOOL_INTERFACE"]) == (
        "job-failed", "bad-7.xml", "orders_in",
    )  # fmt: skip
    assert env["JOBSPOOL_REASON"] == "exit 3"
    assert daemon.stop() == 0


def test_a_hanging_route_holds_up_no_job(site: Site) -> None:
    write_config(site, {"stuck": {"command": ["/bin/sleep", "60"], "timeout": "2s"}},
                 gather="0s", interval="0s")  # fmt: skip
    site.init()
    daemon = site.start()
    started = time.monotonic()
    for n in range(20):
        site.drop("orders_in", f"bad-{n}.xml")
    for n in range(20):
        site.wait_in(f"bad-{n}.xml", "joberrors")
    assert time.monotonic() - started < DEADLINE
    failed = site.wait_for(lambda: daemon.said("cannot send a notification", route="stuck"),
                           "the route's failure logged")  # fmt: skip
    assert failed[0]["level"] == "error"
    assert failed[0]["error"] == "/bin/sleep timed out after 2s"
    assert daemon.stop() == 0


def test_a_job_blocking_its_interface_and_a_stuck_queue_are_told(site: Site) -> None:
    write_config(site, {"script": {"command": [site.script("record", RECORD), "script"]}},
                 blocking_after="1s", gather="0.5s", interval="1s")  # fmt: skip
    data = yaml.safe_load(site.config.read_text())
    data["schedules"] = {
        "stuck": {"every": "0:00:01", "template": "stuck-queue", "with": {"older_than": "1s"}},
    }
    site.config.write_text(yaml.safe_dump(data))
    site.init()
    daemon = site.start()
    site.drop("orders_in", "later-1.xml")

    def kinds() -> set[str]:
        return {e["kind"] for stdin, _ in recorded(site, "script") for e in stdin["events"]}

    site.wait_for(lambda: {"job-blocking", "queue-stuck"} <= kinds(), "both events")
    events = [e for stdin, _ in recorded(site, "script") for e in stdin["events"]]
    blocking = [e for e in events if e["kind"] == "job-blocking"]
    assert blocking[0]["job"] == "later-1.xml"
    assert blocking[0]["reason"].startswith("blocks the queue since ")
    assert len(blocking) == 1  # told once, not at every try
    stuck = [e for e in events if e["kind"] == "queue-stuck"]
    assert stuck[0]["schedule"] == "stuck"
    assert stuck[0]["reason"].startswith("stuck queue: orders_in: oldest job")
    assert site.where("later-1.xml") == ["queue/orders_in"]
    assert daemon.stop() == 0


# --- the notifier itself, in process ------------------------------------------------------------


class Recording:
    def __init__(self) -> None:
        self.sent: list[tuple[str, notices.Notice]] = []
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, route: Any, notice: notices.Notice) -> None:
        self.sent.append((route.name, notice))

    def error(self, event: str, **kw: Any) -> None:
        self.lines.append(("error", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))


def settings(**values: Any) -> config.Notify:
    route = config.CommandRoute("r", frozenset(config.EVENTS), ("/bin/true",))
    return config.Notify(routes={"r": route}, **values)


def test_a_fault_episode_is_one_start_and_one_end() -> None:
    rec = Recording()
    a = alerts.Alerts(settings(gather=0.1, interval=0.2, fault_quiet=1.0), rec, "/spool", rec)
    try:
        for n in range(50):
            a.fault(f"cannot sync the spool: No space left on device ({n})")
        wait_for(lambda: any("fault-end" in n.counts for _, n in rec.sent), "the episode's end")
        kinds = [k for _, n in rec.sent for k, c in n.counts.items() for _ in range(c)]
        assert kinds == ["fault-start", "fault-end"]
        end = next(n for _, n in rec.sent if "fault-end" in n.counts).events[0]
        assert end.reason is not None and end.reason.startswith("50 fault(s) since ")
    finally:
        a.stop(5)


def test_a_full_queue_counts_what_it_cannot_hold() -> None:
    rec = Recording()
    a = alerts.Alerts(settings(gather=0.5, interval=0.5, queue=10), rec, "/spool", rec)
    try:
        for n in range(1000):
            a.emit(notices.Event("job-rejected", f"j{n}.xml", "orders_in", reason="bad"))
        wait_for(lambda: sum(n.total for _, n in rec.sent) >= 1000, "every event counted")
        assert sum(n.total for _, n in rec.sent) == 1000
        assert sum(n.unrecorded for _, n in rec.sent) > 0
        assert all(len(n.events) <= notices.ITEMIZED for _, n in rec.sent)
    finally:
        a.stop(5)


def test_emit_without_routes_costs_nothing_and_starts_no_thread() -> None:
    before = threading.active_count()
    a = alerts.Alerts(config.Notify(), Recording(), "/spool")
    a.emit(notices.Event("job-failed", "x.xml", "orders_in"))
    assert a.thread is None and threading.active_count() == before
    a.stop(1)


# --- the configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "message"),
    [
        pytest.param({"routes": {"r": {"command": ["/bin/true"]}}, "bogus": 1},
                     "notify.bogus: unknown key", id="unknown-key"),
        pytest.param({"routes": {"r": {"command": ["/bin/true"], "mail": {}}}},
                     "notify.routes.r: expected exactly one of command:, mail: or webhook:",
                     id="two-kinds"),
        pytest.param({"routes": {"r": {"command": ["/bin/true"], "events": ["job-lost"]}}},
                     "notify.routes.r.events: expected all, or a list of job-rejected",
                     id="unknown-event"),
        pytest.param({"routes": {"r": {"mail": {"to": "not an address"}}}},
                     "notify.routes.r.mail.to: expected a list of mail addresses", id="bad-to"),
        pytest.param({"routes": {"r": {"mail": {"to": "a@b", "smtp": "h:25", "pass": "x"}}}},
                     "notify.routes.r.mail.pass: unknown key", id="mail-unknown-key"),
        pytest.param({"routes": {"r": {"mail": {"to": "a@b", "smtp": "h:587",
                                                "credentials": "missing"}}}},
                     "notify.routes.r.mail.credentials: expected an existing file",
                     id="missing-credentials"),
        pytest.param({"routes": {"r": {"webhook": {"url": "http://example.com/x"}}}},
                     "notify.routes.r.webhook.url: expected an https:// URL, got "
                     "'http://example.com/x'", id="plain-http"),
        pytest.param({"routes": {"r": {"webhook": {"url": "https://h/x", "retries": "3"}}}},
                     "notify.routes.r.webhook.retries: expected a whole number", id="retries"),
        pytest.param({"routes": {"r": {"command": ["/bin/true"]}}, "interval": "soon"},
                     "notify.interval: expected a duration", id="interval"),
        pytest.param({"routes": {"r": {"command": ["/bin/true"]}}, "queue": 0},
                     "notify.queue: expected a whole number of at least 1", id="queue"),
        pytest.param({"gather": "1s"}, "notify.routes: expected at least one route",
                     id="no-routes"),
    ],
)  # fmt: skip
def test_the_notify_section_is_checked_strictly(site: Site, notify: Any, message: str) -> None:
    data = {"spool": "spool", "interfaces": {"orders_out": {}}, "notify": notify}
    site.config.write_text(yaml.safe_dump(data))
    line = assert_fails(site.run("daemon", "--check"), 78)
    assert line.startswith(f"jobspool: {site.config}: {message}"), line


def test_no_notify_section_means_no_routes(site: Site) -> None:
    site.config.write_text(yaml.safe_dump({"spool": "spool", "interfaces": {"orders_out": {}}}))
    assert_fails(site.run("notify", "test"), 78)


def test_the_example_configurations_notify_block_is_valid(tmp_path: Path) -> None:
    """etc/jobspool.yaml's commented notify: section, uncommented, passes the checks."""
    example = (Path(__file__).resolve().parents[1] / "etc" / "jobspool.yaml").read_text()
    block = example[example.index("# notify:") :]
    text = "\n".join(line[2:] if line.startswith("# ") else line for line in block.splitlines())
    creds = tmp_path / "smtp-credentials"
    creds.write_text("jobspool\nsecret\n")
    text = text.replace("/etc/jobspool/smtp-credentials", str(creds))
    cfg = config.parse("spool: spool\ninterfaces: {orders_out: {}}\n" + text, tmp_path / "x.yaml")
    assert set(cfg.notify.routes) == {"ops", "chat", "pager"}
    ops = cfg.notify.routes["ops"]
    assert isinstance(ops, config.MailRoute)
    assert (ops.smtp_host, ops.smtp_port, ops.credentials) == ("mail.example.com", 587, creds)
    assert "fault-end" in ops.events and "job-rejected" not in ops.events
    assert cfg.notify.interval == 300
