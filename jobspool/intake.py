"""Taking a job into the spool: name it, check it, then queue it or reject it.

``submit``, ``retry`` and ``check`` live here (the daemon's drop folders will
too). Each new name enters the spool under the spool's names lock, so two
submitters can never take one name, and the job file is written durably
before the command says it is there.

A queued job has no log of its own yet; what happened to it before the queue
(received, checked, retried) is kept in ``state/pending/NAME,log.xml`` and
becomes the start of its log when it is done.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import BinaryIO, NamedTuple

from jobspool import check as checking
from jobspool import joblog, names
from jobspool.config import Config, Interface
from jobspool.errors import BadRequest, CheckError, Denied, Rejected
from jobspool.spool import INCOMING, JOBERRORS, QUEUE, Spool, os_errors

_CHUNK = 1 << 20


def spool_of(cfg: Config) -> Spool:
    return Spool(cfg.spool, cfg.interfaces)


def check_file(iface: Interface, source: str) -> checking.Result:
    """Check a file against an interface without touching the spool."""
    with open_source(source) as f:
        head = f.read(iface.max_size + 1)
    return _check(iface, head)


def submit(cfg: Config, interface: str, source: str, name: str | None = None) -> str:
    """Check a file and queue it on ``interface``; return the job's name.

    A job that fails its check is put into joberrors with its log and
    :class:`Rejected` is raised. A name already in use anywhere in the spool
    is a :class:`BadRequest`, and nothing changes.
    """
    iface = cfg.interface(interface)
    if name is None:
        if source == "-":
            raise BadRequest("reading the job from stdin needs --name NAME")
        name = os.path.basename(source)
    names.check_name(name)
    spool_of(cfg).require(iface.name)
    with open_source(source) as f:
        head = f.read(iface.max_size + 1)
        return accept_data(cfg, iface.name, name, head, rest=_rest(f))


def accept_data(
    cfg: Config,
    interface: str,
    name: str,
    data: bytes,
    *,
    rest: Iterable[bytes] = (),
    via: str = "submit",
    ref: str | None = None,
) -> str:
    """Check ``data`` and queue it as job ``name`` (``submit``, the HTTP upload).

    ``rest`` is what follows ``data`` when the input was larger than
    ``max_size``: it is only read to keep the whole file in joberrors. ``ref``
    is the client's own reference, kept in the log.
    """
    iface = cfg.interface(interface)
    names.check_name(name)
    spool = spool_of(cfg)
    spool.require(iface.name)
    # Check outside the lock: a slow client must not hold up the daemon's intake.
    result = _check(iface, data)
    with spool.names_lock():
        found = spool.locate(name)
        if found is not None:
            raise BadRequest(
                f"job name {name!r} is already in use ({found.place}); "
                + ("choose another with --name" if via == "submit" else "choose another name")
            )
        log = joblog.new(name, iface.name)
        joblog.received(log, via, ref=ref)
        joblog.checked(log, result.errors, result.schema)
        if result.errors:
            _reject(spool, name, log, chain([data], rest), result.errors)
        joblog.moved(log, "outside", f"{QUEUE}/{iface.name}")
        pending = spool.pending_log(name)
        spool.write(pending, [joblog.to_bytes(log)], replace=True)
        try:
            spool.write(spool.dir(QUEUE, iface.name) / name, [data], stamp_ns=spool.stamp())
        except BaseException:
            spool.remove(pending)  # the job is not there: its history must not be either
            raise
    return name


def interface_for(cfg: Config, data: bytes) -> str:
    """The interface whose ``root_elements`` name this document's root (HTTP upload)."""
    from lxml import etree

    largest = max(i.max_size for i in cfg.interfaces.values())
    try:
        root = checking.parse(data[: largest + 1]).getroot()
    except etree.XMLSyntaxError as exc:
        raise BadRequest(f"cannot tell the interface: the document is not XML ({exc})") from None
    qname = etree.QName(root)
    wanted = {qname.text, qname.localname}
    hits = [i.name for i in cfg.interfaces.values() if wanted & set(i.root_elements)]
    if len(hits) != 1:
        why = "no interface accepts" if not hits else "several interfaces accept"
        raise BadRequest(f"{why} root element {qname.text!r}; name one with Interfacename=")
    return hits[0]


def retry(cfg: Config, name: str) -> str:
    """Take a job out of joberrors, check it again and queue it on its interface.

    Returns where the job now is. A job rejected again stays in joberrors,
    its log gains the new check, and :class:`Rejected` is raised.

    The order keeps a log beside the job at every instant: its history goes
    to ``state/pending`` (synced), the job moves into the queue (synced),
    and only then does its old log leave joberrors; a crash in between leaves
    a stale log beside no job, never a job without one. The daemon reads a
    retried job's history under the names lock held here throughout, so it
    cannot fail the job again, and write a new log, before the old one is gone.
    """
    spool = spool_of(cfg)
    with spool.names_lock():
        found = spool.find(name)
        if found.place.state != JOBERRORS:
            raise BadRequest(f"{name} is in {found.place}, not in joberrors: nothing to retry")
        log = _read_log(found.log_path, name)
        iface_name = log.get("interface")
        if iface_name is None:
            raise BadRequest(f"the log of {name} names no interface; "
                             "resubmit it with 'jobspool submit IFACE FILE'")  # fmt: skip
        iface = cfg.interface(iface_name)
        with os_errors(f"cannot read {name}"), open(found.path, "rb") as f:
            head = f.read(iface.max_size + 1)
        result = _check(iface, head)
        joblog.event(log, "retried")
        joblog.checked(log, result.errors, result.schema)
        if result.errors:
            spool.write(found.log_path, [joblog.to_bytes(log)], replace=True)
            raise _rejected(name, result.errors, "again and stays in joberrors")
        queue = spool.dir(QUEUE, iface.name)
        joblog.moved(log, JOBERRORS, f"{QUEUE}/{iface.name}")
        spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
        # The retried job joins the end of its queue: it is accepted now,
        # and that stamp (its mtime) is synced before anyone is told.
        _stamp_durably(found.path, spool.stamp())
        spool.move(found.path, queue)
        spool.remove(found.log_path)
    return f"{QUEUE}/{iface.name}"


def _stamp_durably(path: Path, stamp_ns: int) -> None:
    """Set a job's acceptance stamp (its mtime) and fsync it: a rename does not sync it."""
    with os_errors(f"cannot stamp {path.name}"):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.utime(fd, ns=(stamp_ns, stamp_ns))
            os.fsync(fd)
        finally:
            os.close(fd)


def log_so_far(spool: Spool, name: str, interface: str, stamp_ns: int) -> joblog.Log:
    """A queued job's log: its pending history, or, without one, when it was accepted.

    Jobs without a pending log were accepted by a daemon that has since
    restarted, or placed in the queue by another program.
    """
    try:
        return joblog.from_bytes(spool.pending_log(name).read_bytes())
    except (OSError, SyntaxError):  # none, or damaged by a crash: start anew
        log = joblog.new(name, interface)
        joblog.received(log, "queue", at=joblog.iso(stamp_ns / 1e9))
        return log


def _check(iface: Interface, head: bytes) -> checking.Result:
    if len(head) > iface.max_size:
        too_big = f"the file is larger than max_size ({iface.max_size} bytes) of {iface.name}"
        return checking.Result([CheckError(0, 0, too_big)], schema=iface.schema)
    return checking.check(head, iface.schema)


def _reject(
    spool: Spool,
    name: str,
    log: joblog.Log,
    content: Iterator[bytes],
    errors: list[CheckError],
) -> None:
    """Put a rejected job into joberrors: its log first, then the job."""
    joblog.moved(log, "outside", JOBERRORS)
    log_path = spool.joberrors / names.log_name(name)
    spool.write(log_path, [joblog.to_bytes(log)], replace=True)
    try:
        spool.write(spool.joberrors / name, content)
    except BaseException:
        spool.remove(log_path)  # no log without its job
        raise
    raise _rejected(name, errors, "into joberrors")


def _rejected(name: str, errors: list[CheckError], where: str) -> Rejected:
    more = f" (and {len(errors) - 1} more: jobspool log {name})" if len(errors) > 1 else ""
    return Rejected(f"{name} rejected {where}: {errors[0]}{more}", errors)


def _read_log(path: os.PathLike[str], name: str) -> joblog.Log:
    try:
        with open(path, "rb") as f:
            return joblog.from_bytes(f.read())
    except FileNotFoundError:
        return joblog.new(name, None)
    except Exception as exc:  # a damaged log must not block a retry forever
        raise BadRequest(f"the log of {name} cannot be read ({exc}); "
                         "resubmit it with 'jobspool submit IFACE FILE'") from None  # fmt: skip


@contextmanager
def open_source(source: str) -> Iterator[BinaryIO]:
    """Open a file to submit or check (``-`` is stdin); errors name the file."""
    if source == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below, after the caller is done
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise BadRequest(f"cannot read {source}: {exc.strerror}") from None
    except OSError as exc:
        with os_errors(f"cannot read {source}"):
            raise exc from None
    with f:
        yield f


def _rest(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


# --- drop folders ----------------------------------------------------------------


class Taken(NamedTuple):
    """What became of a dropped file."""

    name: str  # its job name in the spool (a safe new one if its own was unusable)
    place: str  # "queue/IFACE" or "joberrors"
    stamp: int
    log: joblog.Log  # its log so far; the daemon finishes it
    reason: str | None = None  # why it went to joberrors


def take_drop(spool: Spool, iface: Interface, filename: str, *, sync: bool = True) -> Taken | None:
    """Take one whole file from ``incoming/IFACE`` into the queue or joberrors.

    None when the file is gone. An unreadable file raises :class:`Denied`
    and stays where it is. A name that is invalid or in use sends the file
    to joberrors under a safe unique name; the log keeps the original.
    With ``sync=False`` an accepted job's rename into the queue is made
    durable by the caller's :meth:`Spool.sync` of the batch; rejections are
    always synced at once (log first, then the job).
    """
    src = spool.dir(INCOMING, iface.name) / filename
    with spool.names_lock():
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return None
        stamp = spool.stamp()
        if not stat.S_ISREG(st.st_mode):
            return _to_errors(spool, iface, src, stamp, f"not a regular file ({_kind(st)})")
        if not names.is_valid(filename):
            why = f"invalid job name: {names.why_invalid(filename)}"
            return _to_errors(spool, iface, src, stamp, why)
        found = spool.locate(filename, besides=src)
        if found is not None:
            return _to_errors(spool, iface, src, stamp, f"job name in use ({found.place})")
        data = read_drop(src, iface.max_size, st.st_size)
        result = _check(iface, data)
        log = joblog.new(filename, iface.name)
        joblog.received(log, "drop")
        joblog.checked(log, result.errors, result.schema)
        if result.errors:
            sync_dropped(spool, src)  # it is reported as kept: it must be whole on disk
            joblog.moved(log, f"{INCOMING}/{iface.name}", JOBERRORS)
            spool.write(spool.joberrors / names.log_name(filename), [joblog.to_bytes(log)],
                        replace=True)  # fmt: skip
            spool.move(src, spool.joberrors)
            return Taken(filename, JOBERRORS, stamp, log, str(result.errors[0]))
        queue = spool.dir(QUEUE, iface.name)
        joblog.moved(log, f"{INCOMING}/{iface.name}", f"{QUEUE}/{iface.name}")
        if iface.outbound:
            # It waits for a fetch, maybe for days, not for a handler in this
            # process: its history goes to disk now, like a submitted job's.
            pending = spool.pending_log(filename)
            spool.write(pending, [joblog.to_bytes(log)], replace=True, sync=sync)
        try:
            spool.move(src, queue, stamp_ns=stamp, sync=sync)
        except Denied:
            # Not the file's owner, so its mtime (the queue order) cannot be
            # set: queue a copy we own instead, then drop the original.
            # Synced at once whatever the caller batches: the original goes,
            # so the copy must be on disk first.
            spool.write(queue / filename, [data], stamp_ns=stamp)
            spool.remove(src, sync=sync)
        return Taken(filename, f"{QUEUE}/{iface.name}", stamp, log)


def take_stray(spool: Spool, iface: Interface, filename: str) -> Taken | None:
    """A file another program put in ``queue/IFACE`` under a name no job can have.

    It goes to joberrors under a safe name (files still being written there,
    named like uploads in progress, are left alone by the caller).
    """
    src = spool.dir(QUEUE, iface.name) / filename
    with spool.names_lock():
        if not os.path.lexists(src):
            return None
        return _to_errors(spool, iface, src, spool.stamp(), "invalid job name: "
                          + names.why_invalid(filename), f"{QUEUE}/{iface.name}")  # fmt: skip


def read_drop(path: Path, max_size: int, size_hint: int = 0) -> bytes:
    """Read at most ``max_size + 1`` bytes of a dropped file, never following a link."""
    with os_errors(f"cannot read dropped file {path}"):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return read_up_to(fd, max_size + 1, size_hint)
        finally:
            os.close(fd)


def read_up_to(fd: int, limit: int, size_hint: int = 0) -> bytes:
    """At most ``limit`` bytes of ``fd``; one ``read`` for a file of ``size_hint`` bytes.

    Plain ``read(limit)`` would reserve ``limit`` bytes (max_size, megabytes)
    for every small job; a file object would add its own system calls.
    """
    chunks, total = [], 0
    want = min(limit, size_hint + 1 if size_hint > 0 else 65536)
    while total < limit:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total == size_hint and len(chunk) < want:
            break  # all that stat saw and not a byte more: its end, without one more read
        want = min(limit - total, 65536)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def safe_name(original: str, stamp: int) -> str:
    """A valid, unique name for a file whose own name cannot be a job's."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", original).lstrip(".-")[:150] or "unnamed"
    return f"{base}.{stamp}"


def _to_errors(
    spool: Spool, iface: Interface, src: Path, stamp: int, reason: str, came_from: str = ""
) -> Taken:
    """Into joberrors under a safe name, untouched and unread, its log saying why."""
    came_from = came_from or f"{INCOMING}/{iface.name}"
    name = src.name if names.is_valid(src.name) else safe_name(src.name, stamp)
    if name != src.name or spool.locate(name, besides=src) is not None:
        name = safe_name(src.name, stamp)
    log = joblog.new(name, iface.name)
    original = src.name if name != src.name else None
    via = "queue" if came_from.startswith(QUEUE) else "drop"
    joblog.received(log, via, original_name=original, reason=reason)
    joblog.moved(log, came_from, JOBERRORS)
    sync_dropped(spool, src)  # before its log: a failed sync leaves nothing half done
    spool.write(spool.joberrors / names.log_name(name), [joblog.to_bytes(log)], replace=True)
    spool.move(src, spool.joberrors, new_name=name)
    return Taken(name, JOBERRORS, stamp, log, reason)


def sync_dropped(spool: Spool, path: Path) -> None:
    """Make a dropped file's data durable before it is reported anywhere.

    Whoever wrote it never synced it (SFTP clients do not), and a renamed,
    unsynced file can come back empty after a power cut. A file that cannot
    be opened (not ours to read) is covered by a sync of the whole file
    system instead; one that is not a regular file has no data to sync.
    """
    with os_errors(f"cannot sync dropped file {path.name}"):
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return  # never opened: a device or a pipe is left untouched
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # gone: the move that follows says so
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM):
                raise
            spool.sync()
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)
        finally:
            os.close(fd)


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):  # fmt: skip
        if test(mode):
            return kind
    return "not a file"
