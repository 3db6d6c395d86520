"""Cluster mode's leases (``jobspool.lease``), with the time in the test's hands.

Two or three coordinators, as nodes, share a spool's ``state/`` in
``tmp_path``; each turn is given its monotonic time, so take-overs are
checked to the second without waiting for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobspool import config, lease
from jobspool.durable import durability_of, rename_noreplace
from jobspool.errors import ConfigError

LEASE = 10.0
KEYS = [lease.interface_key(f"if{n}") for n in range(8)]


def store(tmp_path: Path) -> lease.Store:
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    s = lease.Store(tmp_path / "state", tmp_path / "tmp")
    s.init()
    return s


def node(tmp_path: Path, name: str, pid: int) -> lease.Coordinator:
    return lease.Coordinator(store(tmp_path), name, LEASE, KEYS, pid=pid, alive=lambda p: True)


def idle(key: str) -> bool:
    return True


def test_rendezvous_is_stable_and_moves_only_the_leavers_share() -> None:
    two = {k: lease.owner(k, ["a", "b"]) for k in KEYS}
    three = {k: lease.owner(k, ["a", "b", "c"]) for k in KEYS}
    assert set(two.values()) == {"a", "b"}
    # A joining node takes keys only for itself; no key moves between a and b.
    assert all(three[k] in (two[k], "c") for k in KEYS)
    assert {k: lease.owner(k, ["b", "a"]) for k in KEYS} == two  # order does not matter
    assert lease.owner("x", []) is None


def test_a_lone_node_takes_every_lease_and_may_move(tmp_path: Path) -> None:
    a = node(tmp_path, "a", 1)
    turn = a.turn(0.0, 1000.0, idle)
    assert sorted(turn.acquired) == sorted(KEYS)
    assert all(a.may_move(k, 1.0) for k in KEYS)
    holders = a.store.holders()
    assert {r.node for r in holders.values()} == {"a"}
    assert {r.generation for r in holders.values()} == {1}


def test_a_joining_node_gets_its_share_after_a_drain(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a", 1), node(tmp_path, "b", 2)
    a.turn(0.0, 0.0, idle)
    b.turn(0.0, 0.0, idle)  # b is seen by a from its next turn
    busy = {True}
    turn = a.turn(1.0, 1.0, lambda key: not busy)
    theirs = {k for k in KEYS if lease.owner(k, ["a", "b"]) == "b"}
    assert set(turn.draining) == theirs  # handlers still running: not released yet
    assert all(a.may_move(k, 1.0) for k in theirs)
    assert b.turn(1.5, 1.5, idle).acquired == []
    busy.clear()
    turn = a.turn(2.0, 2.0, idle)
    assert set(turn.lost) == theirs  # released
    assert set(b.turn(2.5, 2.5, idle).acquired) == theirs
    assert set(b.held) == theirs and set(a.held) == set(KEYS) - theirs
    assert {r.generation for k, r in b.store.holders().items() if k in theirs} == {2}


def test_a_silent_node_is_taken_over_after_the_lease_and_cannot_move(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a", 1), node(tmp_path, "b", 2)
    for t in (0.0, 1.0):
        a.turn(t, t, idle)
        b.turn(t, t, idle)
    a.turn(2.0, 2.0, idle)
    theirs = set(b.held)
    assert theirs and not theirs & set(a.held)
    # b goes silent (killed, or cut off) at t=1: a waits a lease time, by its own clock.
    t = 2.0
    while t < 1.0 + LEASE:
        assert a.turn(t, t, idle).acquired == [], t
        t += 2.5
    # First b's beat is stale (b leaves the live set), then its leases are free.
    taken: set[str] = set()
    while t < 1.0 + 2 * LEASE and taken != theirs:
        taken |= set(a.turn(t, t, idle).acquired)
        t += 2.5
    assert taken == theirs
    # b stopped moving well before: two thirds of a lease after its last renewal...
    assert not any(b.may_move(k, 1.0 + LEASE * lease.SAFE) for k in theirs)
    # ... and its generation is superseded, whatever its clock says.
    assert not any(b.store.still_ours(k, b.held[k].generation) for k in theirs)
    turn = b.turn(1.5, t, idle)  # back: it renews, finds the leases gone
    assert set(turn.lost) == theirs and not b.held


def test_two_nodes_taking_one_generation_one_wins(tmp_path: Path) -> None:
    s = store(tmp_path)
    key = KEYS[0]
    (s.leases / key).mkdir()
    first = lease.Record("a", 1, 1, 0.0, 10.0, 1)
    second = lease.Record("b", 2, 1, 0.0, 10.0, 1)
    assert s.take(key, first)
    assert not s.take(key, second)
    assert lease.decode(s.current(key)[1]) == first


def test_a_renewal_never_brings_back_a_superseded_generation(tmp_path: Path) -> None:
    s = store(tmp_path)
    key = KEYS[0]
    s.current(key)
    s.take(key, lease.Record("a", 1, 1, 0.0, 10.0, 1))
    s.take(key, lease.Record("b", 2, 2, 0.0, 10.0, 1))
    assert not (s.leases / key / "1").exists()
    with pytest.raises(FileNotFoundError):
        s.renew(key, lease.Record("a", 1, 1, 5.0, 15.0, 2))
    assert not s.still_ours(key, 1) and s.still_ours(key, 2)


def test_a_restarted_daemon_of_the_same_node_takes_its_leases_at_once(tmp_path: Path) -> None:
    old = node(tmp_path, "a", 1)
    old.turn(0.0, 0.0, idle)
    new = lease.Coordinator(store(tmp_path), "a", LEASE, KEYS, pid=2, alive=lambda p: p == 2)
    assert sorted(new.turn(0.5, 0.5, idle).acquired) == sorted(KEYS)


def test_cluster_and_durability_settings(tmp_path: Path) -> None:
    path = tmp_path / "jobspool.yaml"
    base = "spool: s\ninterfaces: {a: {command: [/bin/true]}}\n"
    path.write_text(base + "cluster: {node: alpha, lease: 20s}\ndaemon: {durability: fsync}\n")
    cfg = config.load(str(path))
    assert cfg.cluster == config.Cluster("alpha", 20.0)
    assert cfg.daemon.durability == "fsync"
    path.write_text(base)
    assert config.load(str(path)).cluster is None  # no section: one daemon, the spool lock
    for bad in (
        "cluster: {lease: 20s}",
        "cluster: {node: a, lease: 1s}",
        "daemon: {durability: x}",
    ):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError):
            config.load(str(path))


def test_durability_follows_the_file_system(tmp_path: Path) -> None:
    assert durability_of(Path("/proc")) == "syncfs"  # proc: not a network file system
    assert durability_of(tmp_path) == "syncfs"


def test_a_move_never_replaces_a_file(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("mine")
    (tmp_path / "dest").write_text("theirs")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dest")
    assert (tmp_path / "dest").read_text() == "theirs"
