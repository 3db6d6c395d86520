"""The systemd integration: the unit, sysusers and tmpfiles snippets, the notify protocol.

Everything runs the real tools of Debian's ``systemd`` package offline
(``systemd-analyze``, ``systemd-sysusers``, ``systemd-tmpfiles`` with
``--root``), and the real daemon speaking the notify protocol to a datagram
socket the test binds, as systemd would. Nothing here needs systemd as PID 1.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobspool import config
from jobspool.spool import Spool
from tests.kit import DEADLINE, JOBSPOOL, ORDER_XSD, VALID, run

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "jobspool.service"
SYSUSERS = ROOT / "systemd" / "jobspool.sysusers"
TMPFILES = ROOT / "systemd" / "jobspool.tmpfiles"
EXAMPLE = ROOT / "etc" / "jobspool.yaml"
DEPLOYMENT = ROOT / "docs" / "deployment.rst"
SPOOL = "/var/spool/jobspool"
MAX_EXPOSURE = 2.0


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


# --- the unit ----------------------------------------------------------------------


class _MultiDict(dict[str, Any]):
    """Keeps every value of a repeated key (ExecReload=, SystemCallFilter=) in file order."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False,
        interpolation=None,
        dict_type=_MultiDict,
        empty_lines_in_values=False,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def values(section: configparser.SectionProxy, key: str) -> list[str]:
    """Every assignment of ``key``, in order."""
    raw = section.get(key)
    return [] if raw is None else [v.strip() for v in raw.split("\n") if v.strip()]


def seconds(span: str) -> float:
    """A systemd time span as used in the unit: ``90``, ``60s``, ``1min 30s``, ``500ms``."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|s|min|m|h|)\b", span)
    assert parts, span
    return sum(float(n) * units[u] for n, u in parts)


def exposure(path: Path) -> float:
    result = tool("systemd-analyze", "security", "--offline=yes", str(path))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def test_security_exposure_is_low_and_documented() -> None:
    figure = exposure(UNIT)
    assert figure <= MAX_EXPOSURE
    # The deployment guide quotes the measured figure: keep it true.
    assert f"exposure level of {figure:.1f}" in " ".join(DEPLOYMENT.read_text().split())


def test_unit_is_a_notify_service_with_a_checked_reload() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert values(service, "ExecStart") == ["/usr/bin/jobspool daemon"]
    # Check first, then SIGHUP: a broken configuration fails the reload before any signal
    # (test_reload_checks_refuse_a_broken_configuration runs the checks).
    *checks, signal_it = values(service, "ExecReload")
    assert signal_it == "/bin/kill -HUP $MAINPID"
    assert checks == ["/usr/bin/jobspool daemon --check"]
    # A failing ExecStartPre= is not covered by RestartPreventExitStatus= (which looks
    # at the main process only) and would restart-loop; the daemon checks at start.
    assert "ExecStartPre" not in service
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert seconds(service["WatchdogSec"]) > 0
    assert "JOBSPOOL_CONFIG=/etc/jobspool/jobspool.yaml" in service["Environment"].split()


def test_unit_stops_after_the_grace_period_and_signals_the_daemon_only() -> None:
    service = unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # handlers must not get SIGTERM directly
    grace = config.DaemonSettings().grace
    assert seconds(service["TimeoutStopSec"]) >= grace + 20


def test_unit_keeps_the_spool_out_of_systemds_hands() -> None:
    service = unit()["Service"]
    # StateDirectory= would chown the spool, partners' files included, to jobspool.
    assert not [k for k in service if k.endswith("Directory") and k != "WorkingDirectory"]
    assert values(service, "ReadWritePaths") == [SPOOL]
    assert service["ProtectSystem"] == "strict"
    assert service["User"] == "jobspool"
    assert service["AmbientCapabilities"].split() == ["CAP_LEASE"]
    assert service["CapabilityBoundingSet"].split() == ["CAP_LEASE"]
    # Capabilities do not reach partners' files from inside a user namespace.
    assert service.get("PrivateUsers", "no") == "no"
    assert service["UMask"] == "0027"


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    # Where the command is installed is the one thing a venv install changes
    # (docs/deployment.rst): point the unit at this one, and nothing else is left.
    copy = tmp_path / "jobspool.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/jobspool", str(JOBSPOOL)))
    # --man=no: Documentation= names man pages that only the Debian package installs
    # (tests/test_deb.py verifies the installed units with them).
    result = tool("systemd-analyze", "verify", "--man=no", str(copy))
    # (/bin/kill, of ExecReload=, comes with Debian's procps package.)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "jobspool" in line] == []


# --- sysusers and tmpfiles ---------------------------------------------------------


def ids(root: Path, table: str, name: str) -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {root}/etc/{table}")


def test_sysusers_creates_the_jobspool_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = tool("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    entry = next(
        line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        if line.startswith("jobspool:")
    )
    uid, gid, shell = int(entry[2]), int(entry[3]), entry[6]
    assert 0 < uid < 1000  # a system user
    assert gid == ids(tmp_path, "group", "jobspool")
    assert shell.endswith("nologin")


EXAMPLE_INTERFACES = ("orders_in", "orders_out")  # those of etc/jobspool.yaml


def _tree() -> dict[str, tuple[int, str]]:
    """What jobspool.tmpfiles promises: path under the spool -> (mode, owner); group jobspool."""
    group_dirs = ["", "incoming", "queue", "bak", "joberrors", "tmp", "state"]
    group_dirs += ["state/paused", "state/pending", "state/blocked", "state/schedules"]
    group_dirs += [f"{s}/{i}" for s in ("incoming", "queue", "bak") for i in EXAMPLE_INTERFACES]
    tree = {d: (0o2770, "root") for d in group_dirs}
    tree[""] = (0o2750, "root")
    tree["state/names.lock"] = (0o660, "jobspool")
    tree["state/fetch.lock"] = (0o660, "jobspool")
    return tree


def test_tmpfiles_creates_the_spool_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = tool("systemd-sysusers", f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    snippet = TMPFILES
    if os.geteuid() != 0:
        # Only root may give files away: check the modes with our own ownership.
        snippet = tmp_path / "jobspool.tmpfiles"
        lines = [
            re.sub(r"^(\S+\s+\S+\s+\S+)\s+\S+\s+\S+", r"\1 - -", line)
            if line.strip() and not line.startswith("#")
            else line
            for line in TMPFILES.read_text().splitlines()
        ]
        snippet.write_text("\n".join(lines) + "\n")
    result = tool("systemd-tmpfiles", "--create", f"--root={root}", str(snippet))
    # The ACL line names the group jobspool, which the host (not --root) resolves:
    # on a host without that group it is skipped with a message, not an error.
    assert result.returncode == 0, result.stderr
    spool = root / SPOOL.lstrip("/")
    numeric = {"root": 0, "jobspool": ids(root, "passwd", "jobspool")}
    group = ids(root, "group", "jobspool")
    for rel, (mode, owner) in _tree().items():
        st = (spool / rel).lstat()
        assert stat.S_IMODE(st.st_mode) == mode, (rel, oct(st.st_mode))
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (numeric[owner], group), rel
    # The tree is exactly what the daemon would make for etc/jobspool.yaml: it
    # never has to create a directory (partners could not write to one it made).
    interfaces = yaml.safe_load(EXAMPLE.read_text())["interfaces"]
    for path in Spool(spool, interfaces).dirs():
        assert path.is_dir(), path

    # Running it again changes nothing and fails nothing.
    def look() -> dict[Path, tuple[int, int, int]]:
        stats = {p: p.lstat() for p in spool.rglob("*")}
        return {p: (st.st_mode, st.st_uid, st.st_gid) for p, st in stats.items()}

    before = look()
    result = tool("systemd-tmpfiles", "--create", f"--root={root}", str(snippet))
    assert result.returncode == 0, result.stderr
    assert look() == before


# --- the example configuration -------------------------------------------------------


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """etc/jobspool.yaml installed as ``tmp_path/etc/jobspool/jobspool.yaml`` with its schema."""
    folder = tmp_path / "etc" / "jobspool"
    (folder / "schemas").mkdir(parents=True)
    (folder / "schemas" / "order.xsd").write_text(ORDER_XSD)
    shutil.copy(EXAMPLE, folder / "jobspool.yaml")
    return folder / "jobspool.yaml"


def test_example_configuration_is_valid_with_the_defaults_spelled_out(etc: Path) -> None:
    cfg = config.parse(etc.read_text(), etc)
    assert cfg.spool == Path(SPOOL)
    assert set(cfg.interfaces) == {"orders_in", "orders_out"}
    assert cfg.interfaces["orders_in"].schema == etc.parent / "schemas" / "order.xsd"
    assert cfg.interfaces["orders_out"].outbound
    assert cfg.daemon == config.DaemonSettings()  # every value the default ...
    daemon = yaml.safe_load(etc.read_text())["daemon"]
    assert set(daemon) == set(config.DaemonSettings._fields)  # ... and every key spelled out


def reload_checks() -> list[list[str]]:
    """The unit's ExecReload= commands before the SIGHUP, run with this venv's jobspool."""
    *checks, _ = values(unit()["Service"], "ExecReload")
    return [
        [str(JOBSPOOL) if arg == "/usr/bin/jobspool" else arg for arg in shlex.split(check)]
        for check in checks
    ]


@pytest.mark.parametrize(
    "breakage",
    [
        None,
        ("  grace: 30s", "  grace: soon"),  # the configuration's shape
        ('cron: "0 3 * * *"', 'cron: "0 3 * *"'),  # a schedule (checked beyond the shape)
        ("template: purge", "template: purge-all"),
    ],
)
def test_reload_checks_refuse_a_broken_configuration(
    etc: Path, tmp_path: Path, breakage: tuple[str, str] | None
) -> None:
    """What the daemon would refuse on SIGHUP fails the reload first: no signal is sent."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JOBSPOOL_CONFIG": str(etc)}
    good = etc.read_text().replace(f"spool: {SPOOL}", f"spool: {tmp_path / 'spool'}")
    etc.write_text(good)
    init = subprocess.run([str(JOBSPOOL), "init"], env=env, capture_output=True, timeout=60)
    assert init.returncode == 0, init
    if breakage is not None:
        assert breakage[0] in good
        etc.write_text(good.replace(*breakage))
    codes = []
    for argv in reload_checks():
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        codes.append(result.returncode)
        if result.returncode != 0:  # systemd stops at the first failing command
            assert result.stderr.startswith("jobspool: "), result
            break
    if breakage is None:
        assert codes == [0] * len(reload_checks()), codes
    else:
        assert codes[-1] == 78, codes


# --- the notify protocol ---------------------------------------------------------------

CONFIG = """\
spool: spool
interfaces:
  orders_in:
    command: [/bin/true]
  orders_out: {}
daemon:
  settle: 0.3s
  rescan: 2s
  grace: 5s
"""


class Systemd:
    """The systemd end of the notify protocol: a datagram socket and what arrived on it."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic time, fields)

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, wanted: Callable[[dict[str, str]], bool], what: str) -> dict[str, str]:
        """The first message from now on that is ``wanted``."""
        deadline = time.monotonic() + DEADLINE
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and wanted(fields):
                return fields
        raise AssertionError(f"no {what} within {DEADLINE}s; got {self.messages}")

    def drain(self, duration: float) -> list[dict[str, str]]:
        """Everything that arrives within ``duration`` seconds."""
        out = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None:
                out.append(fields)
        return out


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, "tmp_path too long for a Unix socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Systemd(sock, path)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    conf = tmp_path / "jobspool.yaml"
    conf.write_text(CONFIG)
    return conf


@pytest.fixture
def start(
    tmp_path: Path, systemd: Systemd, conf: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start the real daemon as systemd would: $NOTIFY_SOCKET, $WATCHDOG_USEC, $WATCHDOG_PID."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(watchdog_pid: str = "$$") -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBSPOOL_", "WATCHDOG_"))}
        env.update(
            NOTIFY_SOCKET=str(systemd.path),
            WATCHDOG_USEC="200000",
            XDG_CACHE_HOME=str(tmp_path / "cache"),
        )
        with open(tmp_path / "daemon.log", "ab") as log:
            # WATCHDOG_PID is the pid systemd started; "exec" keeps it for the daemon.
            shell = ["/bin/sh", "-c", f'WATCHDOG_PID={watchdog_pid} exec "$@"', "sh"]
            proc = subprocess.Popen(
                [*shell, str(JOBSPOOL), "-c", str(conf), "daemon"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def cli(conf: Path, *args: str) -> None:
    result = run("-c", str(conf), *args, env={"XDG_CACHE_HOME": str(conf.parent / "cache")})
    assert result.returncode == 0, result


def test_notify_protocol(
    start: Callable[..., subprocess.Popen[bytes]], systemd: Systemd, conf: Path, tmp_path: Path
) -> None:
    # A job waits on a paused interface, so the status has a queue to report.
    cli(conf, "init")
    cli(conf, "pause", "orders_in")
    (tmp_path / "order-1.xml").write_bytes(VALID)
    cli(conf, "submit", "orders_in", str(tmp_path / "order-1.xml"))
    daemon = start()

    ready = systemd.wait_for(lambda m: m.get("READY") == "1", "READY=1")
    assert "orders_in: 1 queued" in ready.get("STATUS", ""), ready

    # WATCHDOG_USEC=200000: a ping every 0.1 s, each with the status.
    pings = [m for m in systemd.drain(1.0) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 4, systemd.messages
    assert all("orders_in: 1 queued" in m.get("STATUS", "") for m in pings)

    # SIGHUP: RELOADING=1 with the monotonic clock of the reload, then READY=1.
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.send_signal(signal.SIGHUP)
    reloading = systemd.wait_for(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    systemd.wait_for(lambda m: m.get("READY") == "1", "READY=1 after the reload")

    # A broken configuration on SIGHUP: refused, the daemon goes on with the old one.
    good = conf.read_text()
    conf.write_text(good.replace("rescan: 2s", "rescan: often"))
    daemon.send_signal(signal.SIGHUP)
    systemd.wait_for(lambda m: m.get("RELOADING") == "1", "RELOADING=1 (broken)")
    systemd.wait_for(lambda m: m.get("READY") == "1", "READY=1 after a refused reload")
    systemd.wait_for(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1 after a refused reload")
    assert daemon.poll() is None
    assert "reload refused" in (tmp_path / "daemon.log").read_text()

    # SIGTERM: STOPPING=1, then a clean exit.
    daemon.send_signal(signal.SIGTERM)
    systemd.wait_for(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert daemon.wait(DEADLINE) == 0, (tmp_path / "daemon.log").read_text()


def test_watchdog_pings_only_from_the_process_systemd_watches(
    start: Callable[..., subprocess.Popen[bytes]], systemd: Systemd
) -> None:
    # $WATCHDOG_PID names another process (as it does for a handler that
    # inherited the environment): that process is not to ping.
    daemon = start(watchdog_pid="1")
    systemd.wait_for(lambda m: m.get("READY") == "1", "READY=1")
    assert not [m for m in systemd.drain(1.0) if "WATCHDOG" in m], systemd.messages
    daemon.send_signal(signal.SIGTERM)
    systemd.wait_for(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert daemon.wait(DEADLINE) == 0
