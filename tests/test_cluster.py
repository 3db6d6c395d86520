"""Several daemons, one spool, on a real GlusterFS volume mounted by two hosts.

Each host is a network namespace with its own FUSE mount of the volume
(``tests.kit.dfs``); each runs its own ``jobspool daemon`` with a
``cluster:`` section, on the same spool seen through its own mount. What is
checked is what a sysadmin would check: where every job ended, its log, the
handler runs each host recorded (in its own, local trace file), which node
holds which lease (``state/leases/``), and what each daemon said.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from jobspool import lease
from jobspool.durable import durability_of, rename_noreplace
from tests.kit import DEADLINE, Daemon, Site, order, valid_log
from tests.kit.dfs import Host, Volume

LEASE = 6.0  # seconds: short, so that take-overs are quick to test
INTERFACES = ("ifa", "ifb", "ifc", "ifd")
DROPS = 1000  # spread over both hosts and all interfaces


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volume]:
    """One GlusterFS volume and two client hosts for the whole module (up in ~2.5 s)."""
    with Volume(tmp_path_factory.mktemp("dfs"), hosts=2) as vol:
        yield vol


@pytest.fixture
def spool_path(volume: Volume, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh spool folder name on the volume for each test; the hosts' links up again."""
    name = f"spool-{request.node.name}"
    yield name
    for host in volume.hosts:
        host.restore_quietly()
    while SITES:  # whatever daemons a failed test left running
        SITES.pop().kill_all()


SITES: list[Site] = []  # the sites of the running test


def host_site(tmp_path: Path, host: Host, spool: str, handler_sleep: float = 0.0) -> Site:
    """A site of ``host``: its configuration and traces locally, its spool on its mount."""
    (tmp_path / host.name).mkdir()
    site = Site(tmp_path / host.name)
    site.root = host.mount / spool
    body = f"sleep {handler_sleep}\n" if handler_sleep else ""
    body += 'echo "$(date +%s.%N) $JOBSPOOL_INTERFACE $JOBSPOOL_JOB" >> "$T/runs"\n'
    handler = site.script("handler.sh", body)
    data: dict[str, Any] = {
        "spool": str(site.root),
        "interfaces": {name: {"command": [handler]} for name in INTERFACES},
        "daemon": {
            "watch": "poll",
            "rescan": "3s",
            "settle": "0.3s",
            "grace": "2s",
            "backoff_initial": "0.2s",
            "backoff_max": "1s",
        },
        "cluster": {"node": host.name, "lease": f"{LEASE:g}s"},
    }
    site.config.write_text(yaml.safe_dump(data, sort_keys=False))
    SITES.append(site)
    return site


def runs(sites: list[Site]) -> list[tuple[float, str, str, str]]:
    """Every handler run on every host: (time, interface, job, host), in time order."""
    out = []
    for site in sites:
        path = site.dir / "runs"
        if path.exists():
            for line in path.read_text().splitlines():
                at, iface, job = line.split()
                out.append((float(at), iface, job, site.dir.name))
    return sorted(out)


def holders(site: Site) -> dict[str, str]:
    """Interface -> the node whose lease on it is current (not released)."""
    out = {}
    for iface in INTERFACES:
        folder = site.root / "state" / "leases" / f"interface.{iface}"
        try:
            gen = max((int(n) for n in os.listdir(folder) if n.isdigit()), default=None)
            if gen is None:
                continue
            record = json.loads((folder / str(gen)).read_bytes())
        except (OSError, ValueError):  # not yet made, or being taken over this instant
            continue
        if not record["released"]:
            out[iface] = record["node"]
    return out


def drop_spread(sites: list[Site], count: int, tag: str = "j") -> dict[str, list[str]]:
    """``count`` drops, alternately on each host's mount, round robin over the interfaces."""
    dropped: dict[str, list[str]] = {i: [] for i in INTERFACES}
    for n in range(count):
        iface = INTERFACES[n % len(INTERFACES)]
        name = f"{tag}{n:05d}.xml"
        sites[n % len(sites)].drop(iface, name, order(n))
        dropped[iface].append(name)
    return dropped


def done_everywhere(site: Site, dropped: dict[str, list[str]]) -> bool:
    return all(set(site.ls("bak", i)) >= set(names) for i, names in dropped.items())


def check_outcome(site: Site, dropped: dict[str, list[str]], sites: list[Site]) -> int:
    """Every job once in bak with its log, every run recorded, order kept; duplicate runs."""
    places = site.places()
    ran = runs(sites)
    first: dict[str, float] = {}
    for at, _iface, job, _host in ran:
        first.setdefault(job, at)
    for iface, names in dropped.items():
        for name in names:
            assert places.get(name) == [f"bak/{iface}"], (name, places.get(name))
            log = etree.fromstring(valid_log(site.log(name, iface)))
            assert log.get("job") == name
            assert name in first, f"{name} is in bak but no handler run was recorded"
        # Acceptance order is each job's stamp (its mtime): the handlers ran in it.
        by_stamp = sorted(names, key=lambda n: os.stat(site.dir_of("bak", iface) / n).st_mtime_ns)
        assert sorted(names, key=first.__getitem__) == by_stamp, iface
    return len(ran) - len(first)


def two_serving(
    tmp_path: Path, volume: Volume, spool_path: str, handler_sleep: float = 0.0
) -> tuple[list[Site], list[Daemon], list[str]]:
    """Both hosts' daemons started and holding leases; the interfaces host2 serves."""
    sites = [host_site(tmp_path, host, spool_path, handler_sleep) for host in volume.hosts]
    sites[0].init()
    daemons = [site.start() for site in sites]
    sites[0].wait_for(
        lambda: len(set(holders(sites[0]).values())) == 2,
        "both nodes to hold leases",
        timeout=4 * LEASE + DEADLINE,
    )
    return sites, daemons, [i for i, node in holders(sites[0]).items() if node == "host2"]


def test_two_daemons_share_one_spool(tmp_path: Path, volume: Volume, spool_path: str) -> None:
    sites = [host_site(tmp_path, host, spool_path) for host in volume.hosts]
    sites[0].init()
    daemons = [site.start() for site in sites]
    # Both nodes serve: the interfaces are spread over them as documented
    # (rendezvous hashing of node and interface names).
    spread = {i: lease.owner(lease.interface_key(i), ["host1", "host2"]) for i in INTERFACES}
    assert set(spread.values()) == {"host1", "host2"}
    sites[0].wait_for(
        lambda: holders(sites[0]) == spread,
        "the interfaces spread over both nodes",
        timeout=4 * LEASE + DEADLINE,
    )
    # Any host's `jobspool interfaces` says which node serves what, since when.
    table = sites[1].ok("interfaces").splitlines()
    assert table[0].split()[:3] == ["INTERFACE", "NODE", "SINCE"]
    assert {row.split()[0]: row.split()[1] for row in table[1:]} == spread
    shown = json.loads(sites[0].ok("interfaces", "--json"))
    assert {r["interface"]: r["node"] for r in shown} == spread
    assert all(r["since"] for r in shown)
    began = time.monotonic()
    dropped = drop_spread(sites, DROPS)
    sites[0].wait_for(
        lambda: done_everywhere(sites[0], dropped), "every job done", timeout=10 * DEADLINE
    )
    elapsed = time.monotonic() - began
    duplicates = check_outcome(sites[0], dropped, sites)
    assert duplicates == 0  # no failure, no hand-over: each handler ran once
    # Each daemon takes the drops (from both hosts) of the interfaces it serves,
    # and runs only their handlers.
    owner = holders(sites[0])
    for daemon, node in zip(daemons, ("host1", "host2"), strict=True):
        mine = {n for i, names in dropped.items() if owner[i] == node for n in names}
        assert {line["job"] for line in daemon.said("accepted")} == mine
    for _at, iface, _job, host in runs(sites):
        assert owner[iface] == host
    accepted = [len(d.said("accepted")) for d in daemons]
    print(f"\n{DROPS} jobs on 2 daemons over GlusterFS in {elapsed:.1f}s; accepted {accepted}")
    for d in daemons:
        assert d.stop() == 0


def test_killed_daemon_is_taken_over(tmp_path: Path, volume: Volume, spool_path: str) -> None:
    sites, daemons, theirs = two_serving(tmp_path, volume, spool_path)
    daemons[1].kill()  # SIGKILL: no release, no goodbye
    killed = time.monotonic()
    dropped = {i: [f"k{i}{n}.xml" for n in range(5)] for i in theirs}
    for iface, names in dropped.items():
        for name in names:
            sites[0].drop(iface, name)
    sites[0].wait_for(
        lambda: done_everywhere(sites[0], dropped),
        "the killed node's interfaces to be served again",
        timeout=3 * LEASE + DEADLINE,
    )
    took = time.monotonic() - killed
    assert all(host == "host1" for _at, _i, _j, host in runs(sites))
    assert set(holders(sites[0]).values()) == {"host1"}
    # Within the lease time (and a renewal period or two of polling) of the kill.
    assert took < 2 * LEASE + 5, took
    print(f"\ninterfaces of a SIGKILLed daemon served again after {took:.1f}s (lease {LEASE:g}s)")
    assert daemons[0].stop() == 0


def test_cut_off_host_moves_nothing_it_lost(
    tmp_path: Path, volume: Volume, spool_path: str
) -> None:
    sites, daemons, theirs = two_serving(tmp_path, volume, spool_path, handler_sleep=2.0)
    # A job that host2's handler is running when its cable is pulled.
    sites[1].drop(theirs[0], "cut00000.xml")
    sites[1].wait_for(lambda: _running(sites[1]), "host2 to start the job")
    volume.hosts[1].cut()
    cut = time.monotonic()
    dropped = {i: [f"cut{i}{n}.xml" for n in range(3)] for i in theirs}
    for iface, names in dropped.items():
        for name in names:
            sites[0].drop(iface, name)
    dropped[theirs[0]].append("cut00000.xml")
    everything = dropped
    sites[0].wait_for(
        lambda: done_everywhere(sites[0], everything),
        "host1 to take over the cut-off host's interfaces",
        timeout=4 * LEASE + DEADLINE,
    )
    took = time.monotonic() - cut
    volume.hosts[1].restore()
    # Back on the network: host2 gives its leases up and moves nothing.
    sites[0].wait_for(
        lambda: daemons[1].said("lease given up or lost"), "host2 to see its leases lost"
    )
    time.sleep(LEASE)  # time for any move it would still make
    duplicates = check_outcome(sites[0], everything, sites)
    done_on_host2 = {line.get("job") for line in daemons[1].lines() if line.get("event") == "done"}
    assert not done_on_host2 & {n for names in dropped.values() for n in names}
    print(f"\ncut-off host taken over after {took:.1f}s; duplicate handler runs: {duplicates}")
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        d.wait(3 * DEADLINE)


def _running(site: Site) -> bool:
    """Whether the host's handler is running now."""
    handler = os.fsencode(site.dir / "handler.sh")
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and handler in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile
            continue
    return False


def test_moves_between_hosts_never_replace(volume: Volume, spool_path: str) -> None:
    """No RENAME_NOREPLACE on FUSE: the link() move still refuses a file another host put."""
    one, two = (host.mount / spool_path for host in volume.hosts)
    one.mkdir()
    (one / "mine").write_text("host1's job")
    (two / "theirs").write_text("host2's job")
    with pytest.raises(FileExistsError):
        rename_noreplace(one / "mine", one / "theirs")
    assert (one / "theirs").read_text() == "host2's job"
    assert (two / "mine").read_text() == "host1's job"
    rename_noreplace(one / "mine", one / "moved")
    assert sorted(os.listdir(two)) == ["moved", "theirs"]
    # And a spool there syncs by fsync: syncfs would not reach the server.
    assert durability_of(one) == "fsync"
