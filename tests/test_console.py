"""The operator console, used in a real browser: Debian's chromium, headless, via Playwright.

A real ``jobspool serve`` and a real ``jobspool daemon`` run on the module's
site. The browser logs in with HTTP Basic (as the front authenticates), finds
a failed job and its reason, retries it and watches it reach ``bak/``; runs,
disables and then fails to run a schedule; and the front refuses a forged
form and a user without the console role. Screenshots of the main pages are
taken on the way (``JOBSPOOL_SCREENSHOTS=docs`` also writes them into
``docs/`` for the documentation).

Playwright drives ``/usr/bin/chromium`` (installed by ``.ci/run``); it never
downloads a browser of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.kit import (
    COMMAND,
    DEADLINE,
    VALID,
    Server,
    assert_every_log_valid,
    assert_ok,
    free_port,
    make_certificates,
    make_site,
    run,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PASSWORDS = {"ops": "ops-Secret-1", "acme": "acme-Secret-2"}
WAIT_MS = int(DEADLINE * 1000)
# The pages poll every 5 s: assertions wait as long as any other wait in the suite.
expect.set_options(timeout=WAIT_MS)

# Fails until the operator has fixed the cause (the file "fixed" beside it).
FLAKY = """\
#!/bin/sh
[ -e "{dir}/fixed" ] && exit 0
echo "customer 42 is unknown to the ERP" >&2
exit 1
"""

CONFIG = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [{dir}/flaky]
  orders_out:
    schema: schemas/order.xsd
schedules:
  report:
    name: Nightly report
    cron: "0 3 * * *"
    command: [/bin/echo, 42 orders sent]
daemon: {{settle: 0.3s, rescan: 2s, backoff_initial: 0.2s, backoff_max: 1s, grace: 5s}}
http:
  listen: 127.0.0.1:{port}
  cert: cert.pem
  key: key.pem
  users: htpasswd
  grants:
    ops: ["*", console]
    acme: [orders_in]
"""


@dataclass
class Console:
    dir: Path
    config: Path
    spool: Path
    env: dict[str, str]
    server: Server
    browser: Browser
    shots: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run("-c", str(self.config), *args, env=self.env)

    def context(self, user: str = "ops") -> BrowserContext:
        ctx = self.browser.new_context(
            http_credentials={"username": user, "password": PASSWORDS[user]},
            ignore_https_errors=True,  # the test's own CA; the browser has no way to know it
            viewport={"width": 1100, "height": 640},
        )
        ctx.set_default_timeout(WAIT_MS)
        return ctx

    def url(self, path: str) -> str:
        return f"{self.server.url}{path}"

    def shot(self, page: Page, name: str) -> None:
        path = self.shots / f"console-{name}.png"
        page.screenshot(path=str(path))
        assert path.read_bytes().startswith(b"\x89PNG")
        target = os.environ.get("JOBSPOOL_SCREENSHOTS")
        if target:  # for the documentation: a 64-colour palette keeps the files small
            from PIL import Image

            with Image.open(path) as image:
                image.convert("RGB").quantize(colors=64).save(
                    ROOT / target / path.name, optimize=True
                )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    directory = tmp_path_factory.mktemp("console")
    make_site(directory)
    (directory / "flaky").write_text(FLAKY.format(dir=directory))
    (directory / "flaky").chmod(0o755)
    make_certificates(directory)
    port = free_port()
    config = directory / "jobspool.yaml"
    config.write_text(CONFIG.format(dir=directory, port=port))
    env = {"XDG_CACHE_HOME": str(directory / "xdg-cache")}
    assert_ok(run("-c", str(config), "init", env=env))
    for user, password in PASSWORDS.items():
        assert_ok(run("-c", str(config), "user", "add", user, "--password-stdin", "--cost", "4",
                      input=password + "\n", env=env))  # fmt: skip
    server = Server(config, port, directory / "ca.pem", env).start()
    with open(directory / "daemon.log", "wb") as err:
        daemon = subprocess.Popen([*COMMAND, "-c", str(config), "daemon"], stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err, env={**os.environ, **env})  # fmt: skip
    shots = directory / "shots"
    shots.mkdir()
    try:
        wait_for(lambda: b'"ready"' in (directory / "daemon.log").read_bytes(), "the daemon")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Console(directory, config, directory / "spool", env, server, browser, shots)
            finally:
                browser.close()
    finally:
        daemon.terminate()
        daemon.wait(DEADLINE)
        assert server.stop() == 0, server.stderr.read_text()[-3000:]
    assert_every_log_valid(directory)


def audit(site: Console) -> list[dict[str, Any]]:
    path = site.spool / "state" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- jobs ----------------------------------------------------------------------------------


def test_a_failed_job_is_seen_with_its_reason_retried_and_reaches_bak(site: Console) -> None:
    job = site.dir / "order-4711.xml"
    job.write_bytes(VALID)
    assert_ok(site.run("submit", "orders_in", str(job)))
    wait_for(lambda: (site.spool / "joberrors" / "order-4711.xml").exists(), "the job to fail")

    with site.context() as ctx:
        page = ctx.new_page()
        page.goto(site.url("/console/"))
        row = page.locator("tr[data-interface='orders_in']")
        expect(row.locator(".errors")).to_have_text("1")
        expect(page.locator("tr[data-interface='orders_out'] .queued")).to_have_text("0")
        site.shot(page, "interfaces")

        row.locator(".errors a").click()
        expect(page).to_have_url(site.url("/console/errors"))
        failed = page.locator("tr[data-job='order-4711.xml']")
        expect(failed.locator(".reason")).to_have_text("exit 1: customer 42 is unknown to the ERP")
        site.shot(page, "errors")

        (site.dir / "fixed").write_text("the customer exists now\n")
        failed.get_by_role("button", name="Retry").click()
        expect(page.locator(".flash.ok")).to_have_text(
            re.compile(r"order-4711\.xml retried: it is in (queue|bak)/orders_in")
        )
        wait_for(lambda: (site.spool / "bak" / "orders_in" / "order-4711.xml").exists(), "bak")
        assert assert_ok(site.run("status", "order-4711.xml")) == "bak/orders_in\n"

        # The job's page shows its whole story, the two runs included.
        page.goto(site.url("/console/job/order-4711.xml"))
        expect(page.locator("#status")).to_have_text("bak/orders_in")
        expect(page.locator("tr.ev-ran")).to_have_count(2)
        expect(page.locator("tr.ev-retried")).to_have_count(1)
        site.shot(page, "job")

    (entry,) = [e for e in audit(site) if e["action"] == "retry"]
    assert (entry["who"], entry["target"], entry["detail"]["outcome"]) == (
        "ops", "order-4711.xml", "ok")  # fmt: skip


def test_an_open_page_updates_itself(site: Console) -> None:
    with site.context() as ctx:
        page = ctx.new_page()
        page.goto(site.url("/console/queue/orders_out"))
        expect(page.locator("#jobs")).to_have_count(0)
        job = site.dir / "out-1.xml"
        job.write_bytes(VALID)
        assert_ok(site.run("submit", "orders_out", str(job)))
        # No reload: the page's script notices the change and swaps the page in.
        expect(page.locator("#jobs")).to_contain_text("out-1.xml")
        expect(page.locator("#live")).to_contain_text("as of")


# --- schedules -----------------------------------------------------------------------------


def test_a_schedule_runs_shows_its_output_and_once_disabled_refuses_to_run(site: Console) -> None:
    with site.context() as ctx:
        page = ctx.new_page()
        page.goto(site.url("/console/schedules"))
        row = page.locator("tr[data-schedule='report']")
        expect(row).to_contain_text("Nightly report")
        expect(row).to_contain_text("never")
        row.get_by_role("button", name="Run now").click()
        expect(page.locator(".flash.ok")).to_have_text("report: ok")
        expect(row.locator(".tag.ok")).to_have_text("ok")
        site.shot(page, "schedules")

        row.get_by_role("link", name="Nightly report").click()
        history = page.locator("#history tbody tr")
        expect(history).to_have_count(1)
        # Filtered by outcome: no failed run.
        page.select_option("select[name=outcome]", "failed")
        page.get_by_role("button", name="Filter").click()
        expect(page).to_have_url(re.compile(r"outcome=failed"))
        expect(history).to_have_count(0)
        page.select_option("select[name=outcome]", "ok")
        page.fill("input[name=from]", "2000-01-01")
        page.get_by_role("button", name="Filter").click()
        expect(history).to_have_count(1)
        site.shot(page, "schedule")
        history.first.get_by_role("link").click()
        expect(page.locator("#stdout")).to_have_text("42 orders sent\n")

        page.goto(site.url("/console/schedules"))
        row.get_by_role("button", name="Disable").click()
        expect(page.locator(".flash.ok")).to_have_text("report disabled")
        expect(row).to_contain_text("disabled")
        with page.expect_response(re.compile(r"/console/do/schedule\.run$")) as answer:
            row.get_by_role("button", name="Run now").click()
        assert answer.value.status == 400
        expect(page.locator("#refusal")).to_contain_text("schedule report is disabled")
    assert (
        json.loads(assert_ok(site.run("schedule", "show", "report", "--json")))["enabled"] is False
    )
    runs = [e["detail"]["outcome"] for e in audit(site) if e["action"] == "schedule.run"]
    assert runs == ["ok", "refused"]
    assert [e["who"] for e in audit(site) if e["action"].startswith("schedule.")] == ["ops"] * 3


def test_pause_resume_rename_and_set_go_through_the_core(site: Console) -> None:
    with site.context() as ctx:
        page = ctx.new_page()
        page.goto(site.url("/console/"))
        row = page.locator("tr[data-interface='orders_out']")
        row.get_by_role("button", name="Pause").click()
        expect(page.locator(".flash.ok")).to_have_text("orders_out paused")
        expect(row.locator(".state")).to_have_text("paused")
        assert (site.spool / "state" / "paused" / "orders_out").exists()
        assert "yes" in assert_ok(site.run("interfaces")).splitlines()[2]
        row.get_by_role("button", name="Resume").click()
        expect(row.locator(".state")).to_have_text("moving")
        assert not (site.spool / "state" / "paused" / "orders_out").exists()

        page.goto(site.url("/console/schedule/report"))
        page.fill("input[name=name]", "Report to the ERP")
        page.get_by_role("button", name="Rename").click()
        expect(page.locator("h1")).to_contain_text("Report to the ERP")
        page.fill("textarea[name=changes]", "cron=30 4 * * *\ntimeout=10m")
        page.get_by_role("button", name="Set").click()
        expect(page.locator(".flash.ok")).to_contain_text("set cron=30 4 * * *, timeout=10m")
        # A value the configuration would refuse is refused the same way, and nothing changes.
        page.fill("textarea[name=changes]", "catchup=sometimes")
        with page.expect_response(re.compile(r"/console/do/schedule\.set$")) as answer:
            page.get_by_role("button", name="Set").click()
        assert answer.value.status == 400
        expect(page.locator("#refusal")).to_contain_text("catchup: expected once or skip")
    shown = json.loads(assert_ok(site.run("schedule", "show", "report", "--json")))
    assert (shown["name"], shown["timing"], shown["timeout"]) == (
        "Report to the ERP", "cron: 30 4 * * *", 600.0)  # fmt: skip
    done = [(e["action"], e["detail"]["outcome"]) for e in audit(site)
            if e["target"] in ("orders_out", "report")][-5:]  # fmt: skip
    assert done == [("pause", "ok"), ("resume", "ok"), ("schedule.rename", "ok"),
                    ("schedule.set", "ok"), ("schedule.set", "refused")]  # fmt: skip


# --- what the console refuses --------------------------------------------------------------


def test_a_forged_form_without_the_csrf_token_is_refused(site: Console) -> None:
    before = len(audit(site))
    with site.context() as ctx:
        page = ctx.new_page()
        page.goto(site.url("/console/schedules"))  # the browser has the console's cookie now
        # Another site's page posting to the console, with the user's credentials at hand.
        page.set_content(
            f'<form method="post" action="{site.url("/console/do/schedule.enable")}">'
            '<input name="schedule" value="report"><input name="csrf" value="guessed">'
            '<button type="submit">win a prize</button></form>'
        )
        with page.expect_response(re.compile(r"/console/do/schedule\.enable$")) as answer:
            page.get_by_role("button", name="win a prize").click()
        assert answer.value.status == 403
        # The same without any token, from the console's own origin.
        direct = ctx.request.post(site.url("/console/do/schedule.enable"),
                                  form={"schedule": "report"})  # fmt: skip
        assert direct.status == 403 and "CSRF token" in direct.text()
    assert len(audit(site)) == before
    assert "report" in assert_ok(site.run("schedule", "list"))


def test_a_user_without_the_console_role_gets_403(site: Console) -> None:
    with site.context("acme") as ctx:
        page = ctx.new_page()
        answer = page.goto(site.url("/console/"))
        assert answer is not None and answer.status == 403
        expect(page.locator("body")).to_contain_text("the console is not granted to acme")
        posted = ctx.request.post(site.url("/console/do/schedule.run"), form={"schedule": "report"})
        assert posted.status == 403


def test_pages_forbid_inline_script_and_the_audit_page_lists_the_actions(site: Console) -> None:
    with site.context() as ctx:
        page = ctx.new_page()
        answer = page.goto(site.url("/console/audit"))
        assert answer is not None
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        cookie = next(c for c in ctx.cookies() if c["name"] == "jobspool_csrf")
        assert (cookie["sameSite"], cookie["httpOnly"], cookie["secure"]) == ("Strict", True, True)
        expect(page.locator("#audit")).to_contain_text("schedule.disable")
        expect(page.locator("#audit")).to_contain_text("retry")
        site.shot(page, "audit")
