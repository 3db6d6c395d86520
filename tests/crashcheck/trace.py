"""Recording real processes under strace, and reading the trace back as calls in order.

:func:`record` runs a command (and every process it starts) under
``strace -f`` with the file-system calls that change what a power cut keeps,
the calls that say something to a user (writes, exit; ``sendto`` and
``sendmsg``, which a server answers with), and the process calls that tell
threads and programs apart (clone, execve). Every string is
printed in hex (``-xx``) and whole (a large ``-s``), so a write's data and a
path with any byte in it read back exactly; ``-y`` names the file behind
every descriptor. One output file for the whole tree: strace writes its lines
in the order it sees the calls, across processes, which is the order the
model replays.

:func:`parse` turns that file into :class:`Call` objects. A call that another
process interrupted appears as two lines (``<unfinished ...>``, then
``<... resumed>``); it is joined, and keeps both positions: ``start`` (its
entry) and ``end`` (its return). A sync covers what *ended* before it
*started*.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What the model needs (see model.py) and what acknowledges something.
FILE_CALLS = (
    "open,openat,creat,write,pwrite64,writev,rename,renameat,renameat2,link,linkat,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir,fsync,fdatasync,syncfs,sync,close,ftruncate,"
    "utimensat,chdir,fchdir"
)
PROCESS_CALLS = "clone,clone3,fork,vfork,execve,exit_group"
# What a server answers with (write is traced already): -yy names the connection.
SOCKET_CALLS = "sendto,sendmsg"
STRING_LIMIT = 1 << 22  # bytes of each string printed: every job and log here is smaller


def strace_argv(output: Path, inject: Sequence[str] = ()) -> list[str]:
    """The strace command line that records into ``output`` (``inject``: ``-e inject=`` specs)."""
    argv = [
        "strace", "-f", "-ttt", "-y", "-yy", "-xx", "-s", str(STRING_LIMIT),
        "--seccomp-bpf", "-e", f"trace={FILE_CALLS},{PROCESS_CALLS},{SOCKET_CALLS}",
        "-e", "signal=none", "-qq", "-o", str(output),
    ]  # fmt: skip
    for spec in inject:
        argv += ["-e", f"inject={spec}"]
    return argv


def record(
    argv: Sequence[str],
    output: Path,
    *,
    inject: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under strace, recording into ``output``; its exit status and output."""
    return subprocess.run(
        [*strace_argv(output, inject), "--", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


# --- reading a trace ---------------------------------------------------------------


@dataclass
class Arg:
    """One argument as printed: its text, and, for a descriptor, its number and path."""

    text: str
    fd: int | None = None  # a descriptor (AT_FDCWD is -100)
    path: str | None = None  # the file behind it (-y), or the string's value as a path
    data: bytes | None = None  # a string argument's bytes


@dataclass
class Call:
    """One system call, joined from its lines: where it began and ended in the trace."""

    pid: int
    name: str
    args: list[Arg]
    ret: int | None  # None: it never returned (exit_group, a process killed)
    ret_path: str | None  # the path of a returned descriptor (-y)
    start: int  # position of its entry in the trace
    end: int  # position of its return
    time: float  # seconds since the epoch, at its return
    error: str | None = None  # ENOENT, EIO...
    injected: bool = False

    @property
    def ok(self) -> bool:
        return self.ret is not None and self.ret >= 0

    def __str__(self) -> str:
        shown = ", ".join(a.path if a.path is not None else a.text[:60] for a in self.args)
        res = f"{self.ret}" + (f" {self.error}" if self.error else "")
        return f"[{self.start}] pid {self.pid} {self.name}({shown}) = {res}"


@dataclass
class Trace:
    """A parsed trace: every call in the order of its return, and who each pid was."""

    calls: list[Call]
    clones: dict[int, tuple[int, bool]] = field(default_factory=dict)  # child -> (parent, thread)
    # pid -> [(position, argv)] of each successful execve
    execs: dict[int, list[tuple[int, list[str]]]] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)  # process (leader) -> exit status
    unparsed: list[str] = field(default_factory=list)

    def leader(self, pid: int) -> int:
        """The thread-group leader of ``pid`` (the process a thread belongs to)."""
        while pid in self.clones and self.clones[pid][1]:
            pid = self.clones[pid][0]
        return pid

    def argv(self, pid: int, at: int) -> list[str]:
        """The command line ``pid``'s process was running at trace position ``at``."""
        pid = self.leader(pid)
        while True:
            runs = [argv for pos, argv in self.execs.get(pid, []) if pos <= at]
            if runs:
                return runs[-1]
            if pid not in self.clones:
                return []
            pid = self.leader(self.clones[pid][0])

    def exit_status(self, pid: int) -> int | None:
        return self.exits.get(self.leader(pid))


_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)$", re.S)
_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$", re.S)
_RESULT = re.compile(
    r"^(.*)\) += (-?\d+|\?|0x[0-9a-f]+)(<[^>]*>)?(?: (E[A-Z0-9]+) \(.*?\))?(.*)$", re.S
)
_HEX = re.compile(r"(?:\\x[0-9a-f]{2})+")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<((?:\\x[0-9a-f]{2})*)>$")


def parse(path: Path) -> Trace:
    """Read a trace written by :func:`record`."""
    calls: list[Call] = []
    trace = Trace(calls)
    pending: dict[int, tuple[str, str, int]] = {}  # pid -> (call, args so far, start)
    with open(path, encoding="ascii", errors="replace") as f:
        for pos, raw in enumerate(f):
            m = _LINE.match(raw.rstrip("\n"))
            if m is None:
                trace.unparsed.append(raw)
                continue
            pid, when, rest = int(m.group(1)), float(m.group(2)), m.group(3)
            if rest.startswith("+++") or rest.startswith("---"):
                continue  # exits are read from exit_group; signals are not traced
            if rest.endswith(" <unfinished ...>"):
                cm = _CALL.match(rest[: -len(" <unfinished ...>")])
                if cm is None:
                    trace.unparsed.append(raw)
                    continue
                pending[pid] = (cm.group(1), cm.group(2), pos)
                continue
            rm = _RESUMED.match(rest)
            if rm is not None:
                name, before, start = pending.pop(pid, (rm.group(1), "", pos))
                text = before + rm.group(2)
            else:
                cm = _CALL.match(rest)
                if cm is None:
                    trace.unparsed.append(raw)
                    continue
                name, text, start = cm.group(1), cm.group(2), pos
            call = _call(pid, name, text, start, pos, when)
            if call is None:
                trace.unparsed.append(raw)
                continue
            _note(trace, call)
            calls.append(call)
    for pid, (name, text, start) in pending.items():  # killed inside a call
        if name == "exit_group":
            call = _call(pid, name, text + ") = ?", start, start, 0.0)
            if call is not None:
                _note(trace, call)
    settle_renames(calls)
    return trace


RENAMES = ("rename", "renameat", "renameat2")


def settle_renames(calls: list[Call]) -> None:
    """Put a rename that another process's open of its new name overtook before that open.

    Calls are in the order of their returns; a rename split by another
    process's calls (a partner's upload, while the daemon scans) returns
    after them. If one of them opened the rename's new name, the rename had
    taken effect by then: replayed later, the open would find a name the
    model does not know yet. The rename keeps its own start and end.
    """
    i = 0
    while i < len(calls):
        r = calls[i]
        dest = _rename_dest(r) if r.name in RENAMES and r.ok and r.start < r.end else None
        first = None
        j = i - 1
        while dest is not None and j >= 0 and calls[j].end > r.start:
            c = calls[j]
            if c.name in ("open", "openat") and c.ok and c.pid != r.pid and c.ret_path == dest:
                first = j
            j -= 1
        if first is not None:
            calls.insert(first, calls.pop(i))
        i += 1


def _rename_dest(call: Call) -> str | None:
    """A rename's new name as an absolute path, when the call shows it."""
    if call.name == "rename":
        path = call.args[1].path if len(call.args) > 1 else None
        return os.path.normpath(path) if path and path.startswith("/") else None
    if len(call.args) < 4 or call.args[3].path is None:
        return None
    name, folder = call.args[3].path, call.args[2].path
    if name.startswith("/"):
        return os.path.normpath(name)
    return absolute(name, folder) if folder else None


def _note(trace: Trace, call: Call) -> None:
    """Keep who is who: clones, programs, exit statuses."""
    if call.name in ("clone", "clone3", "fork", "vfork") and call.ret and call.ret > 0:
        flags = " ".join(a.text for a in call.args)
        trace.clones[call.ret] = (call.pid, "CLONE_THREAD" in flags)
    elif call.name == "execve" and call.ret == 0:
        argv = _argv(call.args[1].text) if len(call.args) > 1 else []
        trace.execs.setdefault(call.pid, []).append((call.start, argv))
    elif call.name == "exit_group" and call.args:
        try:
            status = int(call.args[0].text)
        except ValueError:
            return
        trace.exits.setdefault(trace.leader(call.pid), status)


def _call(pid: int, name: str, text: str, start: int, end: int, when: float) -> Call | None:
    if name == "exit_group":
        inner = text.rsplit(")", 1)[0]
        return Call(pid, name, split_args(inner), None, None, start, end, when)
    m = _RESULT.match(text)
    if m is None:
        return None
    ret_text = m.group(2)
    ret = None if ret_text == "?" else int(ret_text, 0)
    ret_path = None
    if m.group(3) and _HEX.fullmatch(m.group(3)[1:-1]):
        ret_path = unhex(m.group(3)[1:-1]).decode("utf-8", "surrogateescape")
    call = Call(pid, name, split_args(m.group(1)), ret, ret_path, start, end, when)
    call.error = m.group(4)
    call.injected = "(INJECTED)" in m.group(5)
    return call


def unhex(text: str) -> bytes:
    """The bytes of strace's ``-xx`` string text (``\\x41\\x42``)."""
    return bytes.fromhex(text.replace("\\x", ""))


def split_args(text: str) -> list[Arg]:
    """Split a call's argument text at its top-level commas."""
    out: list[Arg] = []
    depth, quoted, i, begin = 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "<":  # a descriptor's path (hex), or -yy's socket and pipe details
            close = text.find(">", i)
            while close > 0 and text[close - 1] == "-":  # "TCP:[a->b]" has a ">" inside
                close = text.find(">", close + 1)
            i = close if close > 0 else i
        elif c == "/" and text.startswith("/*", i):
            i = text.find("*/", i) + 1
        elif c == "," and depth == 0:
            out.append(_arg(text[begin:i].strip()))
            begin = i + 1
        i += 1
    if text[begin:].strip():
        out.append(_arg(text[begin:].strip()))
    return out


def _arg(text: str) -> Arg:
    m = _FD.match(text)
    if m is not None:
        fd = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
        return Arg(text, fd=fd, path=unhex(m.group(2)).decode("utf-8", "surrogateescape"))
    if text.startswith('"') and text.endswith('"'):
        data = unhex(text[1:-1]) if text != '""' else b""
        return Arg(text, data=data, path=data.decode("utf-8", "surrogateescape"))
    if text.startswith('"') and text.endswith('"...'):
        raise ValueError(f"a string longer than strace's -s {STRING_LIMIT}: raise STRING_LIMIT")
    if re.match(r"^-?\d+<", text):  # a socket, pipe or anon inode: the number matters
        return Arg(text, fd=int(text.split("<", 1)[0]))
    return Arg(text)


def _argv(text: str) -> list[str]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        return []
    return [
        unhex(m.group(1)).decode("utf-8", "surrogateescape")
        for m in re.finditer(r'"((?:\\x[0-9a-f]{2})*)"', inner)
    ]


def iovec_data(arg: Arg) -> bytes:
    """The bytes of a ``writev`` vector, its buffers in order."""
    return b"".join(unhex(m.group(0)) for m in _HEX.finditer(arg.text))


def calls_of(trace: Trace, names: set[str]) -> Iterator[Call]:
    return (c for c in trace.calls if c.name in names)


def absolute(path: str, cwd: str) -> str:
    """``path`` made absolute against ``cwd``, normalised as the kernel would see it."""
    return os.path.normpath(path if path.startswith("/") else os.path.join(cwd, path))


_TCP = re.compile(r"TCP6?:\[(.*):(\d+)->(.*):(\d+)\]")


def connection(arg: Arg) -> tuple[int, int] | None:
    """(local port, peer port) of a TCP socket descriptor as ``-yy`` prints it, else None."""
    m = _TCP.search(arg.text)
    return (int(m.group(2)), int(m.group(4))) if m else None
