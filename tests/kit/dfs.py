"""A real GlusterFS volume on this machine, mounted by two or three client "hosts".

:class:`Volume` starts a private ``glusterd`` (its own working directory, log
and pid file under the test's directory), one brick on a directory,
``gluster volume create ... force`` and ``start``, and one FUSE client mount
per host. Each host is a network namespace (``ip netns add``) joined to the
machine by a veth pair: the client process (``glusterfs``) runs inside it
(``nsenter --net``: the network namespace only, so its mount is visible to
every process of the machine, as on a real host), and reaches the server at
:data:`SERVER`, an address put on the machine's loopback for the test. So a
daemon whose spool is on ``host.mount`` talks to the file system through
that host's network, and :meth:`Host.cut` (the link down in its namespace)
cuts that host off, as a pulled cable would.

Every address is private to what this kit creates (10.219.0.0/16); nothing
else of the machine's network is touched. :meth:`Volume.stop` unmounts,
stops and deletes the volume, kills glusterd and the brick process, and
removes the namespaces, links and address, whatever state a failed test
left. Needs root, ``glusterfs-server`` and ``glusterfs-client`` (``.ci/run``
installs them), and ``/dev/fuse``. Only one volume at a time: glusterd's port
(24007) is the machine's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

SERVER = "10.219.0.1"  # the brick's address, on the machine's loopback
VOLUME = "jobspool-test"
PING_TIMEOUT = 5  # seconds: how soon the server frees a cut-off client's locks (default 42)


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command of the test's infrastructure; a failure says what it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def gluster(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("gluster", "--mode=script", *args, check=check)


class Host:
    """One client host: a network namespace, its veth link, its mount of the volume."""

    def __init__(self, index: int, base: Path) -> None:
        self.index = index
        self.name = f"host{index}"
        self.netns = f"jsdfs-{index}"
        self.outer = f"jsdfs{index}o"  # the machine's end of the link
        self.inner = f"jsdfs{index}i"  # the host's end, inside its namespace
        self.address = f"10.219.{index}.2"
        self.mount = base / f"mnt-{self.name}"
        self.log = base / f"client-{self.name}.log"

    def create(self) -> None:
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        sh("ip", "link", "set", self.inner, "netns", self.netns)
        sh("ip", "addr", "add", f"10.219.{self.index}.1/24", "dev", self.outer)
        sh("ip", "link", "set", self.outer, "up")
        self.ns("ip", "link", "set", "lo", "up")
        self.ns("ip", "addr", "add", f"{self.address}/24", "dev", self.inner)
        self.ns("ip", "link", "set", self.inner, "up")
        self.ns("ip", "route", "add", "default", "via", f"10.219.{self.index}.1")

    def ns(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's network namespace."""
        return sh("ip", "netns", "exec", self.netns, *cmd, check=check)

    def mount_volume(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        sh(
            "nsenter",
            f"--net=/var/run/netns/{self.netns}",
            "glusterfs",
            f"--volfile-server={SERVER}",
            f"--volfile-id={VOLUME}",
            f"--log-file={self.log}",
            str(self.mount),
        )
        deadline = time.monotonic() + 30
        while not is_mounted(self.mount):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mount} not mounted: see {self.log}")
            time.sleep(0.05)

    def cut(self) -> None:
        """Pull this host's cable: its link goes down inside its namespace."""
        self.ns("ip", "link", "set", self.inner, "down")

    def restore(self) -> None:
        """Plug the cable back in."""
        self.ns("ip", "link", "set", self.inner, "up")
        self.ns("ip", "route", "replace", "default", "via", f"10.219.{self.index}.1")

    def restore_quietly(self) -> None:
        with contextlib.suppress(Exception):  # a namespace that is gone already
            self.restore()

    def remove(self) -> None:
        if is_mounted(self.mount):
            sh("umount", str(self.mount), check=False)
            if is_mounted(self.mount):
                sh("umount", "-l", str(self.mount), check=False)
        sh("ip", "link", "del", self.outer, check=False)
        sh("ip", "netns", "del", self.netns, check=False)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


class Volume:
    """A one-brick GlusterFS volume and its client hosts; use as a context manager."""

    def __init__(self, base: Path, hosts: int = 2) -> None:
        self.base = base
        self.work = base / "glusterd"
        self.brick = base / "brick"
        self.pid_file = base / "glusterd.pid"
        self.hosts = [Host(i + 1, base) for i in range(hosts)]
        self.timings: dict[str, float] = {}  # seconds each phase of start() took
        self.mine = False  # whether start() began making things that stop() must remove

    def __enter__(self) -> Volume:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        begin = time.monotonic()
        others = [pid for pid, argv in _processes() if argv[:1] and argv[0].endswith(b"glusterd")]
        if others:  # never tear down another test's or benchmark's volume
            raise RuntimeError(f"glusterd is already running here (pid {others[0]}): one at a time")
        self.mine = True
        self.stop_leftovers()
        self.work.mkdir(parents=True, exist_ok=True)
        self.brick.mkdir(parents=True, exist_ok=True)
        # glusterd knows itself by the addresses the machine has when it starts.
        sh("ip", "addr", "add", f"{SERVER}/32", "dev", "lo")
        for host in self.hosts:
            host.create()
        vol = self.base / "glusterd.vol"
        vol.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.work}\n"
            "    option transport-type socket\n"
            "    option transport.socket.listen-port 24007\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "end-volume\n"
        )
        sh(
            "glusterd",
            "-f",
            str(vol),
            "-p",
            str(self.pid_file),
            "-l",
            str(self.base / "glusterd.log"),
        )
        self.wait_for_glusterd()
        self.timings["glusterd"] = time.monotonic() - begin
        gluster("volume", "create", VOLUME, f"{SERVER}:{self.brick}", "force")
        gluster("volume", "set", VOLUME, "network.ping-timeout", str(PING_TIMEOUT))
        gluster("volume", "start", VOLUME)
        self.timings["volume"] = time.monotonic() - begin
        for host in self.hosts:
            host.mount_volume()
        self.timings["mounted"] = time.monotonic() - begin

    def wait_for_glusterd(self) -> None:
        deadline = time.monotonic() + 30
        while gluster("volume", "list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"glusterd did not come up: see {self.base}/glusterd.log")
            time.sleep(0.1)

    def stop(self) -> None:
        """Tear everything down; safe to call in any state, and twice."""
        if not self.mine:
            return
        for host in self.hosts:
            host.restore_quietly()
        for host in self.hosts:
            host.remove()
        if self.pid_file.exists():
            gluster("volume", "stop", VOLUME, "force", check=False)
            gluster("volume", "delete", VOLUME, check=False)
            self.kill_glusterd()
        kill_bricks(self.brick)
        sh("ip", "addr", "del", f"{SERVER}/32", "dev", "lo", check=False)

    def kill_glusterd(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def stop_leftovers(self) -> None:
        """A volume of an earlier run that was killed before it could clean up."""
        for host in self.hosts:
            host.remove()
        sh("ip", "addr", "del", f"{SERVER}/32", "dev", "lo", check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is as good as dead
    return True


def _processes() -> list[tuple[int, list[bytes]]]:
    """Every live process of the machine and its argv."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            with contextlib.suppress(OSError):
                out.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")))
    return out


def kill_bricks(brick: Path) -> None:
    """The brick server (glusterfsd) outlives glusterd: kill the one serving ``brick``."""
    for pid, argv in _processes():
        if argv[:1] and argv[0].endswith(b"glusterfsd") and os.fsencode(brick) in b" ".join(argv):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
