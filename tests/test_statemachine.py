"""Commands racing a running daemon: a hypothesis state machine.

Each example starts a real daemon on a fresh spool, with a Python handler
that takes a little while (so that commands land while jobs are being
handled) and fails the jobs whose ``sku`` is ``FAIL``. Hypothesis then runs a
sequence of real command-line subprocesses against it: ``submit`` (valid,
invalid and failing jobs, on the inbound and the outbound interface, and
names already in use), ``retry`` (with and without repairing the job first),
``pause``, ``resume``, ``fetch`` (everything, or one named job), and drops.

After every step, on a listing that two looks in a row agree on (a job being
renamed at the very moment of one look cannot fool it), every job is in
exactly one place, a place its kind allows, nothing unknown is there, and
every log (in ``bak``, ``joberrors`` and ``state/pending``) is valid against
the log schema. At the end the interface is resumed and every job must reach
the place its kind ends in: none lost.

The promises tested here are in ``docs/spec.rst`` ("Jobs", "Commands and exit codes").
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from jobspool import joblog
from tests.kit import BROKEN, Daemon, Site, order, wait_for

HANDLER = """
import os
import time


def handle(job):
    time.sleep(0.15)
    with open(os.path.join(os.environ["T"], "ledger"), "a") as f:
        f.write(job.name + "\\n")
    if job.tree.getroot().findtext("sku") == "FAIL":
        raise ValueError("the partner's system says no")
"""


# Where a job of each kind may be seen, and where it ends once the daemon is done.
MAY_BE = {
    "in": {"queue/orders_in", "bak/orders_in"},
    "fails": {"queue/orders_in", "joberrors"},
    "invalid": {"joberrors"},
    "repaired": {"joberrors", "queue/orders_in", "bak/orders_in"},
    "out": {"queue/orders_out", "bak/orders_out"},
}
ENDS_IN = {
    "in": "bak/orders_in",
    "fails": "joberrors",
    "invalid": "joberrors",
    "repaired": "bak/orders_in",
}


class SpoolMachine(RuleBasedStateMachine):
    """The model: every job's name and kind; the spool is asked where each one is."""

    base: ClassVar[Path]
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.site = Site(Path(tempfile.mkdtemp(prefix="machine-", dir=self.base)))
        self.site.module("slow_handler", HANDLER)
        iface = {"schema": "schemas/order.xsd"}
        self.site.configure(
            {"orders_in": {**iface, "handler": "slow_handler:handle"}, "orders_out": iface}
        )
        self.site.init()
        self.daemon: Daemon = self.site.start()
        self.kinds: dict[str, str] = {}
        self.fetched: set[str] = set()
        self.outbox = self.site.dir / "outbox"
        self.outbox.mkdir()
        self.n = 0

    # --- helpers ---

    def run(self, *args: str) -> Any:
        result = self.site.run(*args)
        assert "Traceback" not in result.stderr, result.stderr
        if result.returncode != 0:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("jobspool: "), result.stderr
        return result

    def file(self, name: str, data: bytes) -> str:
        path = self.site.outside / name
        path.write_bytes(data)
        return str(path)

    def content(self, kind: str, name: str) -> bytes:
        if kind == "invalid":
            return BROKEN
        return order(name, sku="FAIL" if kind == "fails" else "HAM-1")

    def new_name(self) -> str:
        self.n += 1
        return f"job-{self.n:03d}.xml"

    def stable(self) -> dict[str, list[str]]:
        """Where every job is, on two looks in a row that agree."""

        def look() -> tuple[dict[str, list[str]], list[str]]:
            return self.site.places(), sorted(os.listdir(self.site.root / "tmp"))

        last = look()

        def settled() -> bool:
            nonlocal last
            time.sleep(0.03)
            now = look()
            same = now == last
            last = now
            return same

        wait_for(settled, "the spool to hold still for a moment", show=self.site.describe)
        return last[0]

    # --- rules ---

    @rule(
        target=jobs,
        kind=st.sampled_from(["in", "in", "fails", "invalid", "out"]),
        how=st.sampled_from(["submit", "drop"]),
    )
    def bring(self, kind: str, how: str) -> str:
        name = self.new_name()
        data = self.content(kind, name)
        iface = "orders_out" if kind == "out" else "orders_in"
        if how == "drop":
            self.site.drop(iface, name, data)
        else:
            result = self.run("submit", iface, self.file(name, data))
            assert result.returncode == (65 if kind == "invalid" else 0), result.stderr
            assert result.stdout == ("" if kind == "invalid" else name + "\n")
        self.kinds[name] = kind
        return name

    @rule(name=jobs, iface=st.sampled_from(["orders_in", "orders_out"]))
    def submit_a_name_in_use(self, name: str, iface: str) -> None:
        result = self.run("submit", iface, self.file("other.xml", order(9)), "--name", name)
        # A dropped job may still be in incoming: its name is in use there too.
        assert result.returncode == 2, result.stderr
        assert "in use" in result.stderr

    @rule(name=jobs, repair=st.booleans())
    def retry(self, name: str, repair: bool) -> None:
        where = self.stable().get(name)
        if repair and where == ["joberrors"] and self.kinds[name] == "invalid":
            (self.site.root / "joberrors" / name).write_bytes(order(name))  # fixed by hand
            self.kinds[name] = "repaired"
        result = self.run("retry", name)
        kind = self.kinds[name]
        in_joberrors = 65 if kind == "invalid" else 0  # what a retry from joberrors answers
        if where == ["joberrors"]:
            allowed = {in_joberrors}
        elif (where and where[0].startswith("incoming/")) or kind == "fails":
            allowed = {2, in_joberrors}  # it may reach joberrors meanwhile
        else:
            allowed = {2}
        assert result.returncode in allowed, (where, kind, result.stderr)

    @rule()
    def pause(self) -> None:
        assert self.run("pause", "orders_in").returncode == 0

    @rule()
    def resume(self) -> None:
        assert self.run("resume", "orders_in").returncode == 0

    @rule()
    def fetch_all(self) -> None:
        result = self.run("fetch", "orders_out", "--to", str(self.outbox))
        assert result.returncode == 0, result.stderr
        for name in result.stdout.split():
            assert self.kinds[name] == "out"
            assert (self.outbox / name).read_bytes() == self.content("out", name)
            (self.outbox / name).unlink()
            self.fetched.add(name)
        assert os.listdir(self.outbox) == []

    @rule(name=jobs)
    def fetch_one(self, name: str) -> None:
        where = self.stable().get(name)
        result = self.run("fetch", "orders_out", "--to", str(self.outbox), name)
        may_be_queued_by_now = where == ["incoming/orders_out"]
        if where == ["queue/orders_out"] or (may_be_queued_by_now and result.returncode == 0):
            assert result.returncode == 0, result.stderr
            assert result.stdout == name + "\n"
            (self.outbox / name).unlink()
            self.fetched.add(name)
        else:
            assert result.returncode == 2, result.stderr

    # --- what must hold after every step ---

    @invariant()
    def every_job_is_in_exactly_one_place(self) -> None:
        assert self.daemon.running(), self.site.describe()
        places = self.stable()
        # A drop may wait in incoming a moment before it is taken.
        unknown = set(places) - set(self.kinds)
        assert not unknown, unknown
        for name, kind in self.kinds.items():
            where = places.get(name, [])
            assert len(where) == 1, (name, where)
            allowed = MAY_BE[kind] | {f"incoming/{'orders_out' if kind == 'out' else 'orders_in'}"}
            assert where[0] in allowed, (name, kind, where)
            if name in self.fetched:
                assert where == ["bak/orders_out"]

    @invariant()
    def every_log_is_valid(self) -> None:
        root = self.site.root
        for folder in [root / "joberrors", root / "state/pending", *(root / "bak").iterdir()]:
            for log in folder.glob("*,log.xml"):
                problems = joblog.validate(log.read_bytes())
                assert problems == [], (log, problems)
        for folder in [root / "joberrors", *(root / "bak").iterdir()]:
            for job in os.listdir(folder):
                if not job.endswith(",log.xml") and not job.startswith("."):
                    assert (folder / f"{job},log.xml").exists(), f"{folder / job} has no log"

    def teardown(self) -> None:
        try:
            if self.daemon.running():
                self.run("resume", "orders_in")
                self.run("fetch", "orders_out", "--to", str(self.outbox))
                ends = {n: ENDS_IN.get(k, "bak/orders_out") for n, k in self.kinds.items()}
                self.site.wait_for(
                    lambda: {n: w[0] for n, w in self.site.places().items() if len(w) == 1} == ends,
                    "every job where its kind ends",
                )
                assert self.daemon.running()
                assert self.daemon.stop() == 0
                self.site.check_logs()
        finally:
            self.site.kill_all()


def test_commands_racing_a_running_daemon_keep_every_job_in_one_place(tmp_path):
    SpoolMachine.base = tmp_path
    run_state_machine_as_test(
        SpoolMachine,
        settings=settings(
            max_examples=5,
            stateful_step_count=15,
            deadline=None,
            database=None,  # nothing written into the checkout
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
