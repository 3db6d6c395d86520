"""Cluster mode: which daemon serves which interface, by leases kept in the spool.

Several daemons (nodes) may serve one spool on a shared file system
(docs/deployment.rst, "Several daemons, one spool"). Every live node takes
drops; each interface's queue, and the schedules, are served by exactly one
node at a time, the holder of its *lease*:

- a lease is a folder ``state/leases/KEY/`` (``KEY`` is ``interface.NAME`` or
  ``schedules``) holding one file per *generation*, named by its number.
  Taking a lease over is creating the next generation's file with ``link()``,
  which fails if it exists: of two nodes taking it at once, exactly one wins,
  without any lock a cut-off host could keep. The winner then removes the
  older generations, oldest first;
- the holder renews its generation's file every :data:`RENEW` of the lease
  time, in place (a removed file is never brought back), and checks before
  every move it makes for the interface that its file is there and the next
  generation's is not (:meth:`Store.still_ours`), and that its last renewal
  is recent enough (:meth:`Held.valid`): a lease lost means stop, move
  nothing more;
- a lease is free when released, or when its file has not changed for the
  lease time *as seen by the node that wants it* (its own monotonic clock:
  no clock of two hosts is ever compared). The holder stops using it a
  third of the lease time before that (:data:`SAFE`), however the renewals
  went, so two nodes never move for one interface at once.

Each node also beats its own file ``state/nodes/NODE`` at the same cadence;
the live nodes are those whose beat changed within the lease time. Keys go to
live nodes by rendezvous hashing (:func:`owner`): stable, and only the keys
of a node that joins or leaves change hands. A node that is no longer a key's
owner drains it (takes no new job) and releases it once nothing runs.

The logic (:class:`Coordinator`, :class:`Staleness`, :func:`owner`) takes the
time as an argument; :class:`Store` is the small file edge.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from jobspool.durable import fsync_dir, fsync_file, write_staged

RENEW = 0.25  # of the lease time: how often leases and beats are renewed
SAFE = 2 / 3  # of the lease time: how long after its last renewal a holder still moves
SIZE = 256  # bytes of a lease or beat file: rewritten in place, always whole
SCHEDULES = "schedules"


def interface_key(name: str) -> str:
    """The lease key of interface ``name``."""
    return f"interface.{name}"


class Record(NamedTuple):
    """What a lease (or a node's beat) file says."""

    node: str
    pid: int
    generation: int
    renewed: float  # wall-clock time of the last renewal, for people (never compared)
    expires: float  # renewed + lease, for people and ``jobspool interfaces``
    serial: int  # counts renewals, so that every renewal changes the file
    released: bool = False
    since: float = 0.0  # wall-clock time this node took this generation, for people

    def encode(self) -> bytes:
        data = json.dumps(self._asdict(), separators=(",", ":")).encode()
        if len(data) >= SIZE:
            raise ValueError("lease record too long")
        return data.ljust(SIZE - 1) + b"\n"


def decode(data: bytes | None) -> Record | None:
    """A record from a file's bytes; None for an empty, torn or foreign file."""
    if not data:
        return None
    try:
        raw = json.loads(data)
        return Record(**raw)
    except (ValueError, TypeError):
        return None


def owner(key: str, nodes: Iterable[str]) -> str | None:
    """The node that should hold ``key``: rendezvous (highest random weight) hashing."""
    return max(
        nodes,
        key=lambda node: hashlib.sha256(f"{node}\0{key}".encode()).digest(),
        default=None,
    )


class Staleness:
    """How long each file's content has stayed the same, by the observer's own clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[bytes | None, float]] = {}

    def unchanged_for(self, what: str, content: bytes | None, now: float) -> float:
        """Seconds ``what`` has shown ``content``, as far as this observer knows."""
        seen = self._seen.get(what)
        if seen is None or seen[0] != content:
            self._seen[what] = (content, now)
            return 0.0
        return now - seen[1]


class Held(NamedTuple):
    """A lease this process holds: its generation, and when its last renewal began."""

    generation: int
    renewed_at: float  # monotonic, taken before the renewal was written
    serial: int
    since: float  # wall clock: when this node took it

    def valid(self, now: float, lease: float) -> bool:
        """Whether the holder may still move for it: a third of the lease before anyone else."""
        return now < self.renewed_at + lease * SAFE


class Turn(NamedTuple):
    """What one :meth:`Coordinator.turn` changed: keys taken, lost and being drained."""

    acquired: list[str]
    lost: list[str]
    draining: list[str]


class Store:
    """The leases and beats in ``state/`` of a spool: the file edge of cluster mode."""

    def __init__(self, state: Path, tmp: Path) -> None:
        self.leases = state / "leases"
        self.nodes = state / "nodes"
        self.tmp = tmp

    def init(self) -> None:
        for d in (self.leases, self.nodes):
            d.mkdir(exist_ok=True)

    def _dir(self, key: str) -> Path:
        return self.leases / key

    def current(self, key: str) -> tuple[int, bytes | None]:
        """The newest generation of ``key`` and its file's bytes (0, None: never taken)."""
        folder = self._dir(key)
        try:
            gens = [int(n) for n in os.listdir(folder) if n.isdigit()]
        except FileNotFoundError:
            folder.mkdir(exist_ok=True)
            return 0, None
        if not gens:
            return 0, None
        gen = max(gens)
        try:
            return gen, (folder / str(gen)).read_bytes()
        except FileNotFoundError:  # taken over this instant: seen on the next turn
            return gen, None

    def take(self, key: str, record: Record) -> bool:
        """Create generation ``record.generation`` of ``key``; False if another node did."""
        folder = self._dir(key)
        staged = write_staged(self.tmp, f"lease.{key}", [record.encode()])
        try:
            fsync_file(staged)
            try:
                os.link(staged, folder / str(record.generation))
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staged)
        fsync_dir(folder)
        for gen in sorted(int(n) for n in os.listdir(folder) if n.isdigit()):
            if gen < record.generation:  # oldest first: see still_ours
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / str(gen))
        fsync_dir(folder)
        return True

    def renew(self, key: str, record: Record) -> None:
        """Rewrite our generation's file in place; FileNotFoundError if it was taken over."""
        _rewrite(self._dir(key) / str(record.generation), record.encode(), create=False)

    def still_ours(self, key: str, generation: int) -> bool:
        """Our generation's file is there and the next one's is not.

        Generations are removed oldest first, so once ours is gone a newer
        one exists; if the file system cannot answer, the answer is no.
        """
        folder = self._dir(key)
        try:
            os.lstat(folder / str(generation))
        except OSError:
            return False
        try:
            os.lstat(folder / str(generation + 1))
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return False

    def beat(self, node: str, record: Record) -> None:
        """Say that ``node`` is alive."""
        _rewrite(self.nodes / node, record.encode(), create=True)

    def beats(self) -> dict[str, bytes]:
        """Every node's beat file, by node name."""
        out = {}
        for name in os.listdir(self.nodes):
            if not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    out[name] = (self.nodes / name).read_bytes()
        return out

    def leave(self, node: str) -> None:
        """A node stopping: its beat goes, so the others rebalance at once."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.nodes / node)
        fsync_dir(self.nodes)

    def holders(self) -> dict[str, Record]:
        """Every key's newest record, for ``jobspool interfaces`` and the tests."""
        out: dict[str, Record] = {}
        if not self.leases.is_dir():
            return out
        for key in sorted(os.listdir(self.leases)):
            record = decode(self.current(key)[1])
            if record is not None:
                out[key] = record
        return out


def _rewrite(path: Path, data: bytes, *, create: bool) -> None:
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short write", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


class Coordinator:
    """One node's view of the cluster: its beat, the leases it holds, those it should hold."""

    def __init__(
        self,
        store: Store,
        node: str,
        lease: float,
        keys: Iterable[str],
        pid: int | None = None,
        alive: Callable[[int], bool] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.lease = lease
        self.keys = list(keys)
        self.pid = os.getpid() if pid is None else pid
        self.alive = alive or _pid_alive
        self.held: dict[str, Held] = {}
        self.staleness = Staleness()
        self.serial = 0
        self.live: list[str] = [node]

    def may_move(self, key: str, now: float) -> bool:
        """Whether this node may still move a job for ``key``: checked before every move."""
        held = self.held.get(key)
        return (
            held is not None
            and held.valid(now, self.lease)
            and self.store.still_ours(key, held.generation)
        )

    def _record(
        self, generation: int, wall: float, released: bool = False, since: float | None = None
    ) -> Record:
        self.serial += 1
        since = wall if since is None else since
        lease = self.lease
        return Record(
            self.node, self.pid, generation, wall, wall + lease, self.serial, released, since
        )

    def live_nodes(self, now: float) -> list[str]:
        """This node and those whose beat changed within the lease time."""
        live = {self.node}
        for node, data in self.store.beats().items():
            if self.staleness.unchanged_for(f"node {node}", data, now) < self.lease:
                live.add(node)
        return sorted(live)

    def turn(self, now: float, wall: float, idle: Callable[[str], bool]) -> Turn:
        """Beat, renew, drain, release and take leases; ``idle(key)``: nothing runs for it."""
        acquired: list[str] = []
        lost: list[str] = []
        draining: list[str] = []
        try:
            self.store.beat(self.node, self._record(0, wall))
            self.live = self.live_nodes(now)
        except OSError:  # cut off: keep what we hold until it is no longer valid
            pass
        for key in self.keys:
            want = owner(key, self.live) == self.node
            held = self.held.get(key)
            try:
                if held is not None:
                    if not want and idle(key):
                        released = self._record(held.generation, wall, True, held.since)
                        self.store.renew(key, released)
                        del self.held[key]
                        lost.append(key)
                        continue
                    if not want:
                        draining.append(key)
                    self._renew(key, held, now, wall)  # (a lost one is no longer valid)
                elif self._free(key, now) and want:
                    # _free is asked even when not wanted: should the owner
                    # die, the lease's staleness has been counting all along.
                    gen, _ = self.store.current(key)
                    record = self._record(gen + 1, wall)
                    if self.store.take(key, record):
                        self.held[key] = Held(record.generation, now, record.serial, wall)
                        acquired.append(key)
            except OSError:
                pass  # the file system is away: validity runs out by itself
            if key in self.held and not self.held[key].valid(now, self.lease):
                del self.held[key]
                lost.append(key)
        return Turn(acquired, lost, draining)

    def _renew(self, key: str, held: Held, now: float, wall: float) -> None:
        record = self._record(held.generation, wall, since=held.since)
        try:
            self.store.renew(key, record)
        except FileNotFoundError:
            self.held[key] = held._replace(renewed_at=float("-inf"))  # taken over: lost now
            return
        if self.store.still_ours(key, held.generation):
            self.held[key] = held._replace(renewed_at=now, serial=record.serial)
        else:
            self.held[key] = held._replace(renewed_at=float("-inf"))

    def _free(self, key: str, now: float) -> bool:
        """Whether ``key`` may be taken: never taken, released, or not renewed for a lease."""
        _, data = self.store.current(key)
        unchanged = self.staleness.unchanged_for(f"lease {key}", data, now)
        record = decode(data)
        if data is None or (record is not None and record.released):
            return True
        mine = record is not None and record.node == self.node and record.pid != self.pid
        if mine and record is not None and not self.alive(record.pid):
            return True  # this node's daemon before a restart, dead: no need to wait
        return unchanged >= self.lease

    def release_all(self, wall: float) -> None:
        """A clean stop: every lease released, the beat removed; the others take over at once."""
        for key, held in list(self.held.items()):
            with contextlib.suppress(OSError):
                self.store.renew(key, self._record(held.generation, wall, released=True))
            del self.held[key]
        with contextlib.suppress(OSError):
            self.store.leave(self.node)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
