"""The Debian package, built by ``packaging/build-deb`` and used in a throwaway Debian 12 root.

The root is made by ``debootstrap`` from the Debian mirror this machine's apt
uses, while the package is built (twice: a first and a second version, to
upgrade one over the other). Every command in it runs under ``chroot`` in a
mount namespace of its own (``unshare --mount``) with private ``/proc``,
``/sys`` and ``/run``: nothing of it touches the machine's services, and no
systemd runs in it, so the maintainer scripts' ``deb-systemd-invoke`` calls
do nothing there; where systemd would stop the daemon before an upgrade
(the package's preinst asks it to), the test sends the same SIGTERM.

The tests run in order on the same root, as a sysadmin would go: install,
look, run, upgrade, remove, purge. docs/deployment.rst ("Debian and Ubuntu")
describes what they check.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.kit import DEADLINE, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("jobspool.service", "jobspool-http.service")
# What the package needs from the archive, put in by debootstrap itself (one
# download, no apt-get update in the root): the package's dependencies, and
# man-db for "man jobspool".
INCLUDE = ("python3.11", "procps", "systemd", "man-db")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
ENV |= {"DEBIAN_FRONTEND": "noninteractive", "MANWIDTH": "100", "TERM": "dumb"}
# In a fresh mount namespace: the root's own /proc, /sys, /dev and /run, then chroot.
ENTER = (
    'r=$1; shift; mount -t proc proc "$r/proc" && mount -t sysfs sysfs "$r/sys" && '
    'mount --bind /dev "$r/dev" && mount -t tmpfs -o mode=0755 tmpfs "$r/run" && '
    'exec chroot "$r" /bin/sh -c "$1"'
)
APT = "apt-get -y -q -o Dpkg::Options::=--force-confold"


class World(NamedTuple):
    root: Path
    first: Path  # the .deb of the first version
    second: Path  # the .deb of the version upgraded to
    seconds: dict[str, float]  # how long the build and the root took


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses for bookworm (the one CI can reach)."""
    texts = [p.read_text() for p in Path("/etc/apt").glob("sources.list*") if p.is_file()]
    texts += [p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*") if p.is_file()]
    for text in texts:
        for block in re.split(r"\n\s*\n", text):  # deb822 .sources stanzas
            uris = re.search(r"^URIs:\s*(\S+)", block, re.MULTILINE)
            suites = re.search(r"^Suites:(.*)$", block, re.MULTILINE)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():  # one-line format
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and fields[2] == "bookworm":
                return fields[1]
    return "http://deb.debian.org/debian"


def run_in(root: Path, script: str, check: bool = True, timeout: float = 300) -> str:
    """Run ``script`` with /bin/sh inside the root; its output (stderr included)."""
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            ENTER,
            "-",
            str(root),
            script,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"{script}: exit {proc.returncode}\n{out}"
    return out


def start_in(root: Path, script: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``script`` inside the root in the background (exec'd: its pid is the process's)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                ENTER,
                "-",
                str(root),
                script,
            ],
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Both versions built, and a fresh Debian 12 root to install them into."""
    work = tmp_path_factory.mktemp("deb")
    root = work / "root"
    started = time.monotonic()
    debootstrap = subprocess.Popen(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(INCLUDE)}",
            "bookworm",
            str(root),
            debian_mirror(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seconds = {}
    try:
        debs = []
        for version in ("0.1.0-1", "0.1.0-2"):
            t = time.monotonic()
            proc = subprocess.run(
                [
                    str(ROOT / "packaging" / "build-deb"),
                    "-f",
                    "-o",
                    str(work / "debs"),
                    "-v",
                    version,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
            seconds[f"build {version}"] = time.monotonic() - t
            debs.append(Path(proc.stdout.splitlines()[-1]))
        out, _ = debootstrap.communicate(timeout=900)
        assert debootstrap.returncode == 0, out[-5000:].decode(errors="replace")
        seconds["debootstrap (alongside)"] = time.monotonic() - started
    finally:
        if debootstrap.poll() is None:
            debootstrap.kill()
            debootstrap.wait()
    for deb in debs:
        (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
    print(f"\ntimes: {seconds}; sizes: {[d.stat().st_size for d in debs]}")
    yield World(root, Path("/tmp") / debs[0].name, Path("/tmp") / debs[1].name, seconds)


def test_the_package_installs_with_apt(world):
    out = run_in(world.root, f"apt install -y {world.first}")
    assert "Setting up jobspool (0.1.0-1)" in out
    assert run_in(world.root, "dpkg-query -W -f '${Status} ${Version}' jobspool") == (
        "install ok installed 0.1.0-1"
    )
    assert run_in(world.root, "jobspool --version").strip() == "jobspool, version 0.1.0"
    assert run_in(world.root, "readlink /usr/bin/jobspool").strip() == (
        "/opt/venvs/jobspool/bin/jobspool"
    )


def test_sysusers_and_tmpfiles_were_applied_on_install(world):
    assert run_in(world.root, "getent passwd jobspool").split(":")[5:] == [
        "/",
        "/usr/sbin/nologin\n",
    ]
    stats = run_in(
        world.root,
        "cd /var/spool/jobspool && stat -c '%n %U:%G %a' . incoming "
        "incoming/orders_in queue/orders_in bak/orders_out joberrors state/names.lock",
    )
    assert stats.splitlines() == [
        ". root:jobspool 2750",
        "incoming root:jobspool 2770",
        "incoming/orders_in root:jobspool 2770",
        "queue/orders_in root:jobspool 2770",
        "bak/orders_out root:jobspool 2770",
        "joberrors root:jobspool 2770",
        "state/names.lock jobspool:jobspool 660",
    ]
    # the drop folder's default ACL (getfacl is not in minbase: the attribute itself)
    xattrs = run_in(
        world.root,
        "python3.11 -c 'import os; print(os.listxattr("
        '"/var/spool/jobspool/incoming/orders_in"))\'',
    )
    assert "system.posix_acl_default" in xattrs


def test_the_configuration_is_a_conffile_for_the_group_to_read(world):
    conffiles = run_in(world.root, "dpkg-query -W -f '${Conffiles}' jobspool")
    assert {line.split()[0] for line in conffiles.strip().splitlines()} == {
        "/etc/jobspool/jobspool.yaml",
        "/etc/jobspool/schemas/order.xsd",
    }
    modes = run_in(world.root, "stat -c '%n %U:%G %a' /etc/jobspool /etc/jobspool/jobspool.yaml")
    assert modes.splitlines() == [
        "/etc/jobspool root:jobspool 750",
        "/etc/jobspool/jobspool.yaml root:jobspool 640",
    ]
    installed = run_in(world.root, "cat /etc/jobspool/jobspool.yaml")
    assert installed == (ROOT / "etc" / "jobspool.yaml").read_text()


def test_the_units_are_installed_unchanged_and_verify(world):
    for unit in UNITS:
        installed = world.root / "usr/lib/systemd/system" / unit
        assert installed.read_text() == (ROOT / "systemd" / unit).read_text()
    paths = " ".join(f"/usr/lib/systemd/system/{u}" for u in UNITS)
    out = run_in(world.root, f"systemd-analyze verify {paths}")
    assert out == "", out  # no warning at all: every command path exists, every key is known
    # installed disabled: the configuration must be made yours first
    assert run_in(world.root, f"systemctl is-enabled {' '.join(UNITS)}", check=False).split() == [
        "disabled",
        "disabled",
    ]


def test_the_units_documentation_points_at_installed_files(world):
    for unit in UNITS:
        text = (world.root / "usr/lib/systemd/system" / unit).read_text()
        (docs,) = re.findall(r"^Documentation=(.*)$", text, re.MULTILINE)
        for link in docs.split():
            if link.startswith("file://"):
                assert (world.root / link.removeprefix("file:///")).is_file(), link
            else:
                man = re.fullmatch(r"man:([\w.-]+)\((\d)\)", link)
                assert man is not None, link
                name, section = man.groups()
                assert (
                    run_in(world.root, f"man -w {section} {name}")
                    .strip()
                    .endswith(f"/man{section}/{name}.{section}.gz")
                )


def test_man_shows_the_pages_without_warnings(world):
    out = run_in(world.root, "man --warnings jobspool 2>&1")
    assert "jobspool - move XML jobs through a filesystem spool" in out
    assert "EXIT STATUS" in out and "jobspool schedule history" in out
    assert "warning" not in out.lower()
    out = run_in(world.root, "man --warnings -l /usr/share/man/man5/jobspool.yaml.5.gz 2>&1")
    assert "1h30m" in out and "warning" not in out.lower()


def test_bash_completion_from_the_installed_script(world):
    # as bash calls it on TAB: the function gets the command's name as $1
    script = (
        "source /usr/share/bash-completion/completions/jobspool; "
        'COMP_WORDS=(jobspool queue ""); COMP_CWORD=2; _jobspool_completion jobspool; '
        'COMP_WORDS=(jobspool schedule show ""); COMP_CWORD=3; _jobspool_completion jobspool; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = run_in(world.root, f"bash -c '{script}'")
    assert out.split() == ["orders_in", "orders_out", "disk", "purge-old", "stuck"]
    zsh = (world.root / "usr/share/zsh/vendor-completions/_jobspool").read_text()
    assert zsh.startswith("#compdef jobspool\n")
    assert "_JOBSPOOL_COMPLETE=zsh_complete" in zsh


def test_jobspool_init_and_the_example_spool_run_from_the_package(world):
    as_daemon = "setpriv --reuid=jobspool --regid=jobspool --init-groups"
    out = run_in(world.root, f"{as_daemon} jobspool init && {as_daemon} jobspool daemon --check")
    assert "spool ready at /var/spool/jobspool" in out
    out = run_in(
        world.root,
        "rm -rf /tmp/demo && cp -r /usr/share/doc/jobspool/examples /tmp/demo"
        " && sh /tmp/demo/demo.sh",
    )
    assert "[exit" in out  # the demo's rejected orders exit 65, as they should
    statuses = re.search(r"status order-1001.xml order-1002.xml .*?\n((?:.*\n){4})", out)
    assert statuses is not None, out
    assert statuses.group(1).split("\n")[:4] == [
        "order-1001.xml bak/orders_in",
        "order-1002.xml bak/orders_in",
        "order-1003-bad-qty.xml joberrors",
        "order-1004-broken.xml joberrors",
    ]


ORDER = (ROOT / "spool-example" / "jobs" / "order-1001.xml").read_text()
AS_JOBSPOOL = "setpriv --reuid=jobspool --regid=jobspool --init-groups"


def test_an_upgrade_keeps_the_queued_jobs_of_a_running_spool(world, tmp_path):
    root = world.root
    (root / "tmp" / "order.xml").write_text(ORDER)
    # the admin's own change to the conffile, which the upgrade must keep
    run_in(root, "echo '# changed by the admin' >> /etc/jobspool/jobspool.yaml")
    run_in(root, f"{AS_JOBSPOOL} jobspool pause orders_in")
    for i in range(3):
        run_in(root, f"{AS_JOBSPOOL} jobspool submit orders_in /tmp/order.xml --name up-{i}.xml")
    daemon = start_in(root, f"exec {AS_JOBSPOOL} jobspool daemon", tmp_path / "daemon.log")
    try:
        log = tmp_path / "daemon.log"
        wait_for(lambda: '"ready"' in log.read_text(), "the daemon to be ready", show=log.read_text)
        queued = run_in(root, "jobspool queue orders_in").split()
        assert queued == ["up-0.xml", "up-1.xml", "up-2.xml"]
        # The package stops the unit before an upgrade (preinst) and starts it after;
        # here no systemd runs, so the test sends what systemd sends: SIGTERM.
        preinst = run_in(
            root, "dpkg-deb --ctrl-tarfile " + str(world.second) + " | tar -xO ./preinst"
        )
        assert re.search(
            r'"\$1" = upgrade .*\n\s*deb-systemd-invoke stop .*jobspool.service', preinst
        )
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=DEADLINE * 3) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    out = run_in(root, f"{APT} install {world.second}")
    assert "Unpacking jobspool (0.1.0-2) over (0.1.0-1)" in out
    assert run_in(root, "dpkg-query -W -f '${Version}' jobspool") == "0.1.0-2"
    assert run_in(root, "tail -n1 /etc/jobspool/jobspool.yaml") == "# changed by the admin\n"
    assert run_in(root, "jobspool queue orders_in").split() == ["up-0.xml", "up-1.xml", "up-2.xml"]
    # the new version runs them, in order
    run_in(
        root,
        "install -m 0755 /usr/share/doc/jobspool/examples/handlers/import-order "
        "/usr/local/bin/import-order",
    )
    run_in(root, f"{AS_JOBSPOOL} jobspool resume orders_in")
    run_in(root, f"{AS_JOBSPOOL} jobspool daemon --once", timeout=DEADLINE * 6)
    statuses = run_in(root, "jobspool status up-0.xml up-1.xml up-2.xml")
    assert statuses.splitlines() == [f"up-{i}.xml bak/orders_in" for i in range(3)]


def test_remove_keeps_the_spool_and_the_configuration_and_purge_the_spool(world):
    root = world.root
    out = run_in(root, f"{APT} remove jobspool")
    assert "Removing jobspool (0.1.0-2)" in out
    assert "not empty so not removed" not in out  # the venv leaves nothing behind
    assert not (root / "opt/venvs/jobspool").exists()
    assert not (root / "usr/bin/jobspool").is_symlink()
    assert (root / "var/spool/jobspool/bak/orders_in/up-0.xml").is_file()  # the spool is kept
    assert (root / "etc/jobspool/jobspool.yaml").is_file()  # conffiles stay until purge
    assert run_in(root, "dpkg-query -W -f '${db:Status-Abbrev}' jobspool").strip() == "rc"
    out = run_in(root, f"{APT} purge jobspool")
    assert "Purging configuration files for jobspool" in out
    assert not (root / "etc/jobspool/jobspool.yaml").exists()
    assert (root / "var/spool/jobspool/bak/orders_in/up-0.xml").is_file()  # still: never lost
    assert run_in(root, "getent passwd jobspool").startswith("jobspool:")  # Debian keeps users
    assert "no packages found" in run_in(root, "dpkg-query -W jobspool", check=False).lower()
