"""What a power cut keeps: a replay of traced calls into a conservative model of the disk.

The model follows every file and directory under one base directory (the
test's site: the spool, the partners' files, the fetch targets), by inode:
names are directory entries pointing at inodes, a rename moves an entry, the
data belongs to the inode. Each change is an :class:`Op`; each op becomes
*durable* ("persisted") at the end of the first successful sync that covers
it:

- data (write, pwrite, writev, truncation, O_TRUNC): an ``fsync`` or
  ``fdatasync`` of that file, or a ``syncfs``/``sync`` that *began* after
  the op returned;
- the modification time (``utimensat``: a job's place in its queue): an
  ``fsync`` of the file (not ``fdatasync``), or such a ``syncfs``/``sync``;
- a directory entry (create, mkdir, link, unlink, rmdir): an ``fsync`` of
  that directory, or such a ``syncfs``/``sync``; the fsync of the *file*
  does not count, nor does a sync of another directory;
- a rename: an ``fsync`` of the *destination* directory, or such a
  ``syncfs``/``sync``. A rename is assumed **atomic**: in every crash state
  it has happened entirely (new name present, old name gone) or not at all,
  never half; that is what journaling file systems (ext4, XFS, btrfs) give,
  and what jobspool's "one job, one place" rests on;
- a failed sync (a negative return, injected or real) makes nothing durable.

Until it is durable an op may or may not have reached the disk, independently
of the others (no ordering between unsynced ops is assumed; each unsynced
write lands whole or not at all). What the model cannot see: writes through
``mmap``; processes outside the trace (another program touching the spool);
the page cache's real behaviour (ext4 keeps far more: a journal commit every
few seconds, a directory fsync that commits everything before it), so a
finding means "not guaranteed", not "lost on ext4 today"; and after a real
I/O error the kernel may drop dirty pages, so that a later successful sync
says nothing of them: the model credits that later sync, as it is right for
injected failures only.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.crashcheck.trace import Arg, Call, Trace, absolute, iovec_data

NEVER = 1 << 62  # the persisted position of an op no sync covered (yet)


@dataclass
class Inode:
    """A file or directory; its current (trace-time) content or entries."""

    id: int
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)
    mtime: int = 0  # ns
    entries: dict[str, int] = field(default_factory=dict)


@dataclass
class Op:
    """One change the disk may or may not keep."""

    seq: int  # its place among all ops
    kind: str  # create | unlink | rename | write | trunc | mtime
    call: Call
    inode: int  # the file concerned (the moved one for a rename)
    dir: int = -1  # the entry's directory (a rename's source)
    name: str = ""
    dir2: int = -1  # a rename's destination
    name2: str = ""
    offset: int = 0
    data: bytes = b""
    value: int = 0  # trunc: the size; mtime: ns
    persisted: int = NEVER  # trace position from which it is durable

    @property
    def end(self) -> int:
        return self.call.end

    def durable(self, at: int) -> bool:
        return self.persisted <= at

    def describe(self, model: Model) -> str:
        where = model.name(self.inode)
        if self.dir >= 0:
            where = model.path_of_entry(self.dir, self.name)
        if self.kind == "rename":
            where += " -> " + model.path_of_entry(self.dir2, self.name2)
        return f"{self.kind} {where} (trace line {self.call.end}, pid {self.call.pid})"


class Model:
    """The replay: the current namespace, every op, and what each op needs to be durable."""

    def __init__(self, base: Path, trace: Trace, snapshot: bool = True) -> None:
        self.base = os.path.normpath(str(base))
        self.trace = trace
        self.inodes: dict[int, Inode] = {}
        self._ids = itertools.count()
        self.root = self._new(True).id  # the base directory, durable before the trace
        self.initial: dict[int, dict[str, int]] = {}  # entries before the trace
        self.initial_data: dict[int, bytes] = {}
        self.ops: list[Op] = []
        self.entry_ops: dict[tuple[int, str], list[Op]] = {}
        self.data_ops: dict[int, list[Op]] = {}
        self._pending_file: dict[int, list[Op]] = {}  # data and mtime ops, by file
        # entry ops, by the directory whose fsync counts
        self._pending_dir: dict[int, list[Op]] = {}
        self._pending_all: list[Op] = []
        # (process, fd) -> [inode, position, O_APPEND, O_CLOEXEC]
        self.fds: dict[tuple[int, int], list[int]] = {}
        self.cwd: dict[int, str] = {}
        self.parent_of: dict[int, tuple[int, str]] = {}  # inode -> (dir, name), its current entry
        self.surprises: list[str] = []  # what the model had to guess
        self.syncs = 0
        self.failed_syncs = 0
        if snapshot:
            self._snapshot()

    # --- the namespace ------------------------------------------------------------

    def _new(self, is_dir: bool) -> Inode:
        node = Inode(next(self._ids), is_dir)
        self.inodes[node.id] = node
        return node

    def _snapshot(self) -> None:
        """What is under the base before the trace: durable, with its content."""
        stack = [(self.base, self.root)]
        while stack:
            path, ino = stack.pop()
            with os.scandir(path) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        node = self._new(True)
                        stack.append((entry.path, node.id))
                    elif entry.is_file(follow_symlinks=False):
                        node = self._new(False)
                        with open(entry.path, "rb") as f:
                            node.data = bytearray(f.read())
                        node.mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        self.initial_data[node.id] = bytes(node.data)
                    else:
                        continue
                    self.inodes[ino].entries[entry.name] = node.id
                    self.parent_of[node.id] = (ino, entry.name)
        self.initial = {i: dict(n.entries) for i, n in self.inodes.items() if n.is_dir}

    def inside(self, path: str) -> bool:
        return path == self.base or path.startswith(self.base + "/")

    def lookup(self, path: str) -> int | None:
        """The inode at an absolute path now, None if there is none (or it is outside)."""
        if not self.inside(path):
            return None
        ino = self.root
        rel = path[len(self.base) + 1 :]
        for part in rel.split("/") if rel else []:
            node = self.inodes[ino]
            if not node.is_dir or part not in node.entries:
                return None
            ino = node.entries[part]
        return ino

    def where(self, path: str) -> tuple[int, str] | None:
        """(directory inode, name) of an absolute path whose directory exists now."""
        if not self.inside(path) or path == self.base:
            return None
        parent, name = os.path.split(path)
        d = self.lookup(parent)
        return (d, name) if d is not None and self.inodes[d].is_dir else None

    def name(self, ino: int) -> str:
        """An inode's current path (relative to the base), for messages."""
        parts: list[str] = []
        while ino != self.root:
            if ino not in self.parent_of:
                return "(unlinked file " + "/".join(reversed(parts)) + ")"
            ino, part = self.parent_of[ino]
            parts.append(part)
        return "/".join(reversed(parts)) or "."

    def path_of_entry(self, d: int, name: str) -> str:
        return f"{self.name(d)}/{name}"

    # --- replay -----------------------------------------------------------------------

    def apply(self, call: Call) -> list[Op]:
        """Replay one call; return the ops it made."""
        if not call.ok:
            if call.name in ("fsync", "fdatasync", "syncfs", "sync"):
                self.failed_syncs += 1
            return []
        handler = getattr(self, f"_do_{call.name}", None)
        if handler is None:
            return []
        ops: list[Op] = handler(call, self.trace.leader(call.pid)) or []
        return ops

    def _op(self, kind: str, call: Call, inode: int, **kw: object) -> Op:
        op = Op(len(self.ops), kind, call, inode, **kw)  # type: ignore[arg-type]
        self.ops.append(op)
        self._pending_all.append(op)
        if kind in ("write", "trunc", "mtime"):
            self.data_ops.setdefault(inode, []).append(op)
            self._pending_file.setdefault(inode, []).append(op)
        else:
            self.entry_ops.setdefault((op.dir, op.name), []).append(op)
            if kind == "rename":
                self.entry_ops.setdefault((op.dir2, op.name2), []).append(op)
                self._pending_dir.setdefault(op.dir2, []).append(op)
            else:
                self._pending_dir.setdefault(op.dir, []).append(op)
        return op

    def _path(self, proc: int, dirfd: Arg | None, arg: Arg, call: Call) -> str:
        """An absolute path from a path argument (and its directory descriptor)."""
        assert arg.path is not None, call
        if arg.path.startswith("/"):
            return os.path.normpath(arg.path)
        if dirfd is not None and dirfd.path is not None:
            if dirfd.fd == -100:
                self.cwd[proc] = dirfd.path
            return absolute(arg.path, dirfd.path)
        return absolute(arg.path, self._cwd(proc))

    def _cwd(self, proc: int) -> str:
        p: int | None = proc
        while p is not None:
            if p in self.cwd:
                return self.cwd[p]
            parent = self.trace.clones.get(p)
            p = self.trace.leader(parent[0]) if parent else None
        self.surprises.append(f"no working directory known for pid {proc}")
        return self.base

    def _file(self, proc: int, arg: Arg) -> int | None:
        """The inode behind a descriptor argument (by our table, else by strace's path)."""
        assert arg.fd is not None
        known = self.fds.get((proc, arg.fd))
        if known is not None:
            return known[0]
        return self.lookup(arg.path) if arg.path else None

    # file creation and opening

    def _do_open(self, call: Call, proc: int) -> list[Op]:
        return self._opened(call, proc, None, call.args[0], call.args[1].text)

    def _do_openat(self, call: Call, proc: int) -> list[Op]:
        return self._opened(call, proc, call.args[0], call.args[1], call.args[2].text)

    def _do_creat(self, call: Call, proc: int) -> list[Op]:
        return self._opened(call, proc, None, call.args[0], "O_CREAT|O_WRONLY|O_TRUNC")

    def _opened(self, call: Call, proc: int, dirfd: Arg | None, arg: Arg, flags: str) -> list[Op]:
        assert call.ret is not None
        path = self._path(proc, dirfd, arg, call)
        if call.ret_path:  # what the kernel opened, after links
            path = os.path.normpath(call.ret_path)
        if not self.inside(path):
            self.fds.pop((proc, call.ret), None)
            return []
        ops = []
        ino = self.lookup(path)
        if ino is None:
            spot = self.where(path)
            if spot is None:
                self.surprises.append(f"opened {path} in a directory the model does not know")
                return []
            d, name = spot
            if "O_CREAT" not in flags:
                self.surprises.append(f"opened {path}, which the model did not know")
            node = self._new("O_DIRECTORY" in flags)
            node.mtime = int(call.time * 1e9)
            ino = node.id
            self.inodes[d].entries[name] = ino
            self.parent_of[ino] = (d, name)
            ops.append(self._op("create", call, ino, dir=d, name=name))
        elif "O_TRUNC" in flags and not self.inodes[ino].is_dir and self.inodes[ino].data:
            self.inodes[ino].data.clear()
            ops.append(self._op("trunc", call, ino, value=0))
        self.fds[(proc, call.ret)] = [ino, 0, int("O_APPEND" in flags), int("O_CLOEXEC" in flags)]
        return ops

    def _do_close(self, call: Call, proc: int) -> None:
        fd = call.args[0].fd
        if fd is not None:
            self.fds.pop((proc, fd), None)

    # data

    def _write(self, call: Call, proc: int, data: bytes, offset: int | None) -> list[Op]:
        fdarg = call.args[0]
        if fdarg.fd is None or (fdarg.path is not None and not self.inside(fdarg.path)):
            return []
        ino = self._file(proc, fdarg)
        if ino is None or self.inodes[ino].is_dir:
            return []
        node = self.inodes[ino]
        slot = self.fds.get((proc, fdarg.fd))
        if offset is None:
            if slot is None:  # inherited (a child's stdout): writes at its end
                offset = len(node.data)
            else:
                offset = len(node.data) if slot[2] else slot[1]
                slot[1] = offset + len(data)
        if len(node.data) < offset:
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        return [self._op("write", call, ino, offset=offset, data=data)]

    def _do_write(self, call: Call, proc: int) -> list[Op]:
        data = (call.args[1].data or b"")[: call.ret]
        return self._write(call, proc, data, None)

    def _do_pwrite64(self, call: Call, proc: int) -> list[Op]:
        data = (call.args[1].data or b"")[: call.ret]
        return self._write(call, proc, data, int(call.args[3].text))

    def _do_writev(self, call: Call, proc: int) -> list[Op]:
        return self._write(call, proc, iovec_data(call.args[1])[: call.ret], None)

    def _do_ftruncate(self, call: Call, proc: int) -> list[Op]:
        ino = self._file(proc, call.args[0]) if self.inside(call.args[0].path or "/") else None
        if ino is None:
            return []
        size = int(call.args[1].text)
        data = self.inodes[ino].data
        del data[size:]
        data.extend(b"\0" * (size - len(data)))
        return [self._op("trunc", call, ino, value=size)]

    def _do_utimensat(self, call: Call, proc: int) -> list[Op]:
        dirfd, target = call.args[0], call.args[1]
        if target.text == "NULL":
            if dirfd.path is None or not self.inside(dirfd.path):
                return []
            ino = self._file(proc, dirfd)
        else:
            ino = self.lookup(self._path(proc, dirfd, target, call))
        if ino is None:
            return []
        mtime = _mtime(call.args[2].text, call.time)
        if mtime is None:
            return []
        self.inodes[ino].mtime = mtime
        return [self._op("mtime", call, ino, value=mtime)]

    # directory entries

    def _do_mkdir(self, call: Call, proc: int) -> list[Op]:
        return self._mkdir(call, self._path(proc, None, call.args[0], call))

    def _do_mkdirat(self, call: Call, proc: int) -> list[Op]:
        return self._mkdir(call, self._path(proc, call.args[0], call.args[1], call))

    def _mkdir(self, call: Call, path: str) -> list[Op]:
        spot = self.where(path)
        if spot is None:
            return []
        node = self._new(True)
        self.inodes[spot[0]].entries[spot[1]] = node.id
        self.parent_of[node.id] = spot
        return [self._op("create", call, node.id, dir=spot[0], name=spot[1])]

    def _do_unlink(self, call: Call, proc: int) -> list[Op]:
        return self._unlink(call, self._path(proc, None, call.args[0], call))

    def _do_rmdir(self, call: Call, proc: int) -> list[Op]:
        return self._unlink(call, self._path(proc, None, call.args[0], call))

    def _do_unlinkat(self, call: Call, proc: int) -> list[Op]:
        return self._unlink(call, self._path(proc, call.args[0], call.args[1], call))

    def _unlink(self, call: Call, path: str) -> list[Op]:
        spot = self.where(path)
        if spot is None:
            return []
        d, name = spot
        ino = self.inodes[d].entries.pop(name, None)
        if ino is None:
            self.surprises.append(f"unlinked {path}, which the model did not know")
            return []
        if self.parent_of.get(ino) == spot:
            del self.parent_of[ino]
        return [self._op("unlink", call, ino, dir=d, name=name)]

    def _do_link(self, call: Call, proc: int) -> list[Op]:
        src = self._path(proc, None, call.args[0], call)
        return self._link(call, src, self._path(proc, None, call.args[1], call))

    def _do_linkat(self, call: Call, proc: int) -> list[Op]:
        src = self._path(proc, call.args[0], call.args[1], call)
        return self._link(call, src, self._path(proc, call.args[2], call.args[3], call))

    def _link(self, call: Call, src: str, dest: str) -> list[Op]:
        ino, spot = self.lookup(src), self.where(dest)
        if ino is None or spot is None:
            return []
        self.inodes[spot[0]].entries[spot[1]] = ino
        return [self._op("create", call, ino, dir=spot[0], name=spot[1])]

    def _do_rename(self, call: Call, proc: int) -> list[Op]:
        src = self._path(proc, None, call.args[0], call)
        return self._rename(call, src, self._path(proc, None, call.args[1], call))

    def _do_renameat(self, call: Call, proc: int) -> list[Op]:
        src = self._path(proc, call.args[0], call.args[1], call)
        return self._rename(call, src, self._path(proc, call.args[2], call.args[3], call))

    def _do_renameat2(self, call: Call, proc: int) -> list[Op]:
        if len(call.args) > 4 and "RENAME_EXCHANGE" in call.args[4].text:
            raise NotImplementedError(f"RENAME_EXCHANGE is not modelled: {call}")
        return self._do_renameat(call, proc)

    def _rename(self, call: Call, src: str, dest: str) -> list[Op]:
        a, b = self.where(src), self.where(dest)
        if a is None and b is None:
            return []
        if b is None:  # moved out of the model: as far as it goes, an unlink
            return self._unlink(call, src)
        ino = self.inodes[a[0]].entries.get(a[1]) if a is not None else None
        if ino is None:
            self.surprises.append(f"renamed {src}, which the model did not know, to {dest}")
            return []
        assert a is not None
        if a == b:
            return []
        del self.inodes[a[0]].entries[a[1]]
        self.inodes[b[0]].entries[b[1]] = ino
        self.parent_of[ino] = b
        return [self._op("rename", call, ino, dir=a[0], name=a[1], dir2=b[0], name2=b[1])]

    def _do_chdir(self, call: Call, proc: int) -> None:
        self.cwd[proc] = self._path(proc, None, call.args[0], call)

    def _do_fchdir(self, call: Call, proc: int) -> None:
        if call.args[0].path:
            self.cwd[proc] = call.args[0].path

    def _do_clone(self, call: Call, proc: int) -> None:
        assert call.ret is not None
        child = call.ret
        if self.trace.leader(child) == proc:
            return  # a thread: it shares our table
        for (p, fd), slot in list(self.fds.items()):
            if p == proc:
                self.fds[(child, fd)] = list(slot)
        if proc in self.cwd:
            self.cwd.setdefault(child, self.cwd[proc])

    _do_clone3 = _do_clone
    _do_fork = _do_clone
    _do_vfork = _do_clone

    def _do_execve(self, call: Call, proc: int) -> None:
        for key, slot in list(self.fds.items()):
            if key[0] == proc and slot[3]:
                del self.fds[key]

    # syncs

    def _covered(self, pending: list[Op], call: Call, kinds: Iterable[str] | None = None) -> None:
        keep = []
        for op in pending:
            if op.persisted != NEVER:
                continue
            if op.end < call.start and (kinds is None or op.kind in kinds):
                op.persisted = call.end
            else:
                keep.append(op)
        pending[:] = keep

    def _do_fsync(self, call: Call, proc: int) -> None:
        self._fsync(call, proc, None)

    def _do_fdatasync(self, call: Call, proc: int) -> None:
        self._fsync(call, proc, ("write", "trunc"))

    def _fsync(self, call: Call, proc: int, kinds: tuple[str, ...] | None) -> None:
        self.syncs += 1
        arg = call.args[0]
        if arg.path is None or not self.inside(arg.path):
            return
        ino = self._file(proc, arg)
        if ino is None:
            return
        if self.inodes[ino].is_dir:
            self._covered(self._pending_dir.get(ino, []), call)
        self._covered(self._pending_file.get(ino, []), call, kinds)

    def _do_syncfs(self, call: Call, proc: int) -> None:
        # The whole file system: the base is taken to be on one (a test's tmp_path).
        self.syncs += 1
        self._covered(self._pending_all, call)
        for pending in (*self._pending_dir.values(), *self._pending_file.values()):
            pending[:] = [op for op in pending if op.persisted == NEVER]

    _do_sync = _do_syncfs

    # --- what a crash could keep ----------------------------------------------------------

    def pending(self, at: int) -> list[Op]:
        """The ops made up to trace position ``at`` that no sync had covered by then."""
        return [op for op in self.ops if op.end <= at and not op.durable(at)]

    def entry(self, d: int, name: str, at: int) -> tuple[int | None, list[Op]]:
        """The durable value of an entry at ``at`` and the ops on it still pending then."""
        value = self.initial.get(d, {}).get(name)
        waiting = []
        for op in self.entry_ops.get((d, name), []):
            if op.end > at:
                break
            if not op.durable(at):
                waiting.append(op)
                continue
            value = _entry_after(op, d, name, value)
        return value, waiting

    def content(self, ino: int, at: int) -> tuple[bytes, int | None, list[Op]]:
        """The durable data and mtime of a file at ``at``, and its ops still pending then."""
        data = bytearray(self.initial_data.get(ino, b""))
        mtime: int | None = None
        waiting = []
        for op in self.data_ops.get(ino, []):
            if op.end > at:
                break
            if not op.durable(at):
                waiting.append(op)
                continue
            mtime = _data_after(op, data, mtime)
        return bytes(data), mtime, waiting

    def state(self, at: int, keep: set[int]) -> dict[int, Inode]:
        """A crash state at trace position ``at``: the ops durable then, and those in ``keep``.

        ``keep`` holds the seq of pending ops that reached the disk anyway.
        The result is a fresh set of inodes (those reachable from the base
        are the tree).
        """
        out: dict[int, Inode] = {}
        for i, node in self.inodes.items():
            if i in self.initial or i in self.initial_data or i == self.root:
                copy = Inode(i, node.is_dir)
                copy.entries = dict(self.initial.get(i, {}))
                copy.data = bytearray(self.initial_data.get(i, b""))
                copy.mtime = node.mtime if i in self.initial_data else 0
                out[i] = copy
        for op in self.ops:
            if op.end > at:
                break
            if not op.durable(at) and op.seq not in keep:
                continue
            if op.inode not in out:
                out[op.inode] = Inode(op.inode, self.inodes[op.inode].is_dir)
                out[op.inode].mtime = int(op.call.time * 1e9)
            node = out[op.inode]
            if op.kind in ("write", "trunc", "mtime"):
                m = _data_after(op, node.data, None)
                node.mtime = m if m is not None else int(op.call.time * 1e9)
                continue
            for d in {op.dir, op.dir2} - {-1}:
                if d not in out:
                    out[d] = Inode(d, True)
            _apply_entry(op, out)
        return out

    def materialise(self, state: dict[int, Inode], inode: int, dest: Path) -> int:
        """Write the tree under ``inode`` of a crash state into ``dest``; how many files."""
        dest.mkdir(parents=True, exist_ok=True)
        files = 0
        for name, child in sorted(state[inode].entries.items()):
            node = state.get(child)
            if node is None:
                continue
            path = dest / name
            if node.is_dir:
                files += self.materialise(state, child, path)
            else:
                path.write_bytes(bytes(node.data))
                os.utime(path, ns=(node.mtime, node.mtime))
                files += 1
        return files

    def locate(self, rel: str) -> int | None:
        """The inode at a path relative to the base, now."""
        return self.lookup(os.path.join(self.base, rel))

    def walk(self, ino: int, prefix: str = "") -> Iterator[tuple[str, int]]:
        for name, child in sorted(self.inodes[ino].entries.items()):
            yield prefix + name, child
            if self.inodes[child].is_dir:
                yield from self.walk(child, prefix + name + "/")


def _entry_after(op: Op, d: int, name: str, value: int | None) -> int | None:
    if op.kind == "create":
        return op.inode
    if op.kind == "unlink":
        return None
    # a rename: this key is its source, its destination, or both
    if (op.dir2, op.name2) == (d, name):
        return op.inode
    return None if value == op.inode else value


def _apply_entry(op: Op, out: dict[int, Inode]) -> None:
    if op.kind == "create":
        out[op.dir].entries[op.name] = op.inode
    elif op.kind == "unlink":
        if out[op.dir].entries.get(op.name) == op.inode:
            del out[op.dir].entries[op.name]
    else:
        if out[op.dir].entries.get(op.name) == op.inode:
            del out[op.dir].entries[op.name]
        out[op.dir2].entries[op.name2] = op.inode


def _data_after(op: Op, data: bytearray, mtime: int | None) -> int | None:
    if op.kind == "write":
        if len(data) < op.offset:
            data.extend(b"\0" * (op.offset - len(data)))
        data[op.offset : op.offset + len(op.data)] = op.data
    elif op.kind == "trunc":
        del data[op.value :]
        data.extend(b"\0" * (op.value - len(data)))
    else:
        return op.value
    return mtime


_TIMES = re.compile(r"tv_sec=(\d+), tv_nsec=(\d+|UTIME_NOW|UTIME_OMIT)")


def _mtime(text: str, now: float) -> int | None:
    """The mtime a ``utimensat`` sets (its second timespec), None if it leaves it."""
    if text == "NULL":
        return int(now * 1e9)
    found = _TIMES.findall(text)
    if len(found) < 2:
        return None
    sec, nsec = found[1]
    if nsec == "UTIME_OMIT":
        return None
    if nsec == "UTIME_NOW":
        return int(now * 1e9)
    return int(sec) * 1_000_000_000 + int(nsec)
