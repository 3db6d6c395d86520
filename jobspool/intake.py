"""Taking a job into the spool: name it, check it, then queue it or reject it.

``submit``, ``retry``, ``check``, the HTTP upload and the daemon's drop
folders all come here. A job is never held in memory: a submitted or
uploaded file is first staged in ``tmp/`` (written, fsynced), checked there
as it streams through the parser, and then renamed into its queue or into
joberrors; a drop is checked where it lies and renamed. Each new name enters
the spool under the spool's names lock, held only for "is this name free,
put it there", so two submitters can never take one name; the job is durable
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
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, NamedTuple

from jobspool import check as checking
from jobspool import content, joblog, names, reuse
from jobspool.config import Config, Interface
from jobspool.durable import fsync_file, os_errors, write_staged
from jobspool.errors import BadRequest, Denied, JobspoolError, Problem, Rejected
from jobspool.spool import INCOMING, JOBERRORS, QUEUE, Spool

_CHUNK = 1 << 20


def check_file(cfg: Config, iface: Interface, source: str) -> checking.Verdict:
    """Check a file against an interface without touching the spool (stdin: ``-``)."""
    if source != "-":
        with os_errors(f"cannot read {source}"):
            try:
                size = os.stat(source).st_size
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                raise BadRequest(f"cannot read {source}: {exc.strerror}") from None
            return verdict(cfg, iface, source, size)
    with tempfile.TemporaryFile() as copy:  # a stream to check is read more than once
        for chunk in _chunks(sys.stdin.buffer):
            copy.write(chunk)
        size = copy.tell()
        copy.seek(0)
        return _too_big(iface, size) or checking.check_stream(
            copy, iface.schema, size, cfg.daemon.tree_limit
        )


def verdict(
    cfg: Config, iface: Interface, path: str | os.PathLike[str], size: int
) -> checking.Verdict:
    """Check a file on disk for ``iface``: its size, then the streaming check."""
    return _too_big(iface, size) or checking.check_file(path, iface.schema, cfg.daemon.tree_limit)


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
    spool = Spool.of(cfg)
    spool.require(iface.name)
    with open_source(source) as f:
        staged = stage(spool, name, _chunks(f))
    return accept_staged(cfg, iface.name, name, staged)


def stage(spool: Spool, name: str, chunks: Iterable[bytes]) -> str:
    """Write an incoming job into the spool's ``tmp/``, durably; its staging path.

    Whatever its size, the job streams to disk in chunks and is then checked
    there: a gigabyte upload costs no memory. The caller renames it into
    place or removes it (:func:`accept_staged` does either).
    """
    staged = write_staged(spool.tmp, name, chunks)
    try:
        with os_errors(f"cannot write {name}"):
            fsync_file(staged)
    except BaseException:
        with suppress(OSError):
            os.unlink(staged)
        raise
    return staged


def accept_staged(
    cfg: Config,
    interface: str,
    name: str,
    staged: str,
    *,
    via: str = "submit",
    ref: str | None = None,
    by: str | None = None,
) -> str:
    """Check a staged job and queue it as job ``name`` (``submit``, the HTTP upload).

    The staging file is consumed: renamed into the queue, or into joberrors
    with its log (then :class:`Rejected` is raised), or removed when the
    name is in use (:class:`BadRequest`). ``ref`` is the client's own
    reference, kept in the log; ``by`` the user who uploaded it, kept in the
    log as a note (``uploaded by USER``).
    """
    spool = Spool.of(cfg)
    try:
        iface = cfg.interface(interface)
        names.check_name(name)
        spool.require(iface.name)
        # Check outside the lock: a slow check must not hold up the daemon's intake.
        result = verdict(cfg, iface, staged, os.stat(staged).st_size)
        problems = result.problems
        hexdigest = None
        if iface.same_content is not None and not problems:
            hexdigest = content.digest(staged)
        with spool.names_lock():
            found = spool.locate(name)
            if found is not None:
                raise BadRequest(
                    f"job name {name!r} is already in use ({found.place}); "
                    + ("choose another with --name" if via == "submit" else "choose another name")
                )
            log = joblog.new(name, iface.name)
            joblog.received(log, via, ref=ref)
            if by is not None:
                joblog.note(log, f"uploaded by {by}")
            same = content.judge(spool, iface, hexdigest, log)
            if same is not None:
                problems = [same]
            joblog.checked(log, problems, result.schema)
            if problems:
                _reject(spool, name, log, staged, problems)
            joblog.moved(log, "outside", f"{QUEUE}/{iface.name}")
            pending = spool.pending_log(name)
            spool.write(pending, [joblog.to_bytes(log)], replace=True)
            try:
                stamp = spool.stamp()
                spool.place(staged, spool.dir(QUEUE, iface.name) / name, stamp_ns=stamp)
            except BaseException:
                spool.remove(pending)  # the job is not there: its history must not be either
                raise
            content.remember(spool, iface, hexdigest, name, stamp)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(staged)  # still there only if it was not placed
    return name


def accept_data(
    cfg: Config,
    interface: str,
    name: str,
    data: bytes,
    *,
    via: str = "submit",
    ref: str | None = None,
    by: str | None = None,
) -> str:
    """:func:`accept_staged` of bytes in memory."""
    staged = stage(Spool.of(cfg), name, [data])
    return accept_staged(cfg, interface, name, staged, via=via, ref=ref, by=by)


def interface_for(cfg: Config, head: bytes) -> str:
    """The interface whose ``root_elements`` name this document's root (HTTP upload).

    ``head`` is the document's first bytes: enough for its root element.
    """
    qname = checking.root_name(head)
    if qname is None:
        raise BadRequest("cannot tell the interface: the document does not start as XML")
    wanted = {qname.text, qname.localname}
    hits = [i.name for i in cfg.interfaces.values() if wanted & set(i.root_elements)]
    if len(hits) != 1:
        why = "no interface accepts" if not hits else "several interfaces accept"
        raise BadRequest(f"{why} root element {qname.text!r}; name one with Interfacename=")
    return hits[0]


def retry(cfg: Config, name: str, by: str | None = None) -> str:
    """Take a job out of joberrors, check it again and queue it on its interface.

    Returns where the job now is. A job rejected again stays in joberrors,
    its log gains the new check, and :class:`Rejected` is raised.

    The order keeps a log beside the job at every instant: its history goes
    to ``state/pending`` (synced), the job moves into the queue (synced),
    and only then does its old log leave joberrors; a crash in between leaves
    a stale log beside no job, never a job without one. The daemon reads a
    retried job's history under the names lock held here throughout, so it
    cannot fail the job again, and write a new log, before the old one is gone.
    ``by`` (who asked) is kept in the log's ``retried``.
    """
    spool = Spool.of(cfg)
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
        with os_errors(f"cannot read {name}"):
            result = verdict(cfg, iface, found.path, os.lstat(found.path).st_size)
        joblog.event(log, "retried", by=by)
        joblog.checked(log, result.problems, result.schema)
        if result.problems:
            spool.write(found.log_path, [joblog.to_bytes(log)], replace=True)
            raise _rejected(name, result.problems, "again and stays in joberrors")
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


def too_big_problem(iface: Interface) -> Problem:
    """Why a file larger than the interface's ``max_size`` is rejected."""
    return Problem(
        0, 0, f"the file is larger than max_size ({iface.max_size} bytes) of {iface.name}"
    )


def _too_big(iface: Interface, size: int) -> checking.Verdict | None:
    if size > iface.max_size:  # unread: its size alone rejects it
        return checking.Verdict([too_big_problem(iface)], schema=iface.schema)
    return None


def _reject(spool: Spool, name: str, log: joblog.Log, staged: str, errors: list[Problem]) -> None:
    """Put a rejected staged job into joberrors: its log first, then the job."""
    joblog.moved(log, "outside", JOBERRORS)
    log_path = spool.joberrors / names.log_name(name)
    spool.write(log_path, [joblog.to_bytes(log)], replace=True)
    try:
        spool.place(staged, spool.joberrors / name)
    except BaseException:
        spool.remove(log_path)  # no log without its job
        raise
    raise _rejected(name, errors, "into joberrors")


def _rejected(name: str, errors: list[Problem], where: str) -> Rejected:
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


def _chunks(f: BinaryIO) -> Iterator[bytes]:
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
    copied: bool = False  # queued as a synced copy (the drop was not ours to stamp)


class Screened(NamedTuple):
    """A whole drop with a usable name, to be checked where it lies."""

    path: Path
    st: os.stat_result  # as it was seen before its check: a change means "look again"


def take_drop(
    spool: Spool, iface: Interface, filename: str, *, sync: bool = True, tree_limit: int = 64 << 20
) -> Taken | None:
    """Take one whole file from ``incoming/IFACE`` into the queue or joberrors, checked here.

    :func:`screen_drop`, the check, then :func:`settle_drop`; the daemon does
    the same with the check in a worker process. None when the file is gone
    (or changed while it was checked: look again).
    """
    screened = screen_drop(spool, iface, filename)
    if not isinstance(screened, Screened):
        return screened
    size = screened.st.st_size
    if size > iface.max_size:
        problems = [too_big_problem(iface)]
    else:
        with os_errors(f"cannot read dropped file {screened.path}"):
            problems = checking.check_file(screened.path, iface.schema, tree_limit).problems
    return settle_drop(spool, iface, screened, problems, sync=sync)


def screen_drop(
    spool: Spool, iface: Interface, filename: str, seen: os.stat_result | None = None
) -> Taken | Screened | None:
    """The first look at a whole drop, before its check.

    ``seen`` is the drop's ``lstat`` when the caller has just made one.

    None when the file is gone. An unreadable file raises :class:`Denied` and
    stays where it is. A name that is invalid, or something other
    than a plain file, sends it to joberrors unread, under a safe unique name;
    the log keeps the original (a :class:`Taken`). Anything else, a name in
    use too, is to be checked (a :class:`Screened`); :func:`settle_drop`
    gives a name in use a derived one (:mod:`jobspool.reuse`).
    """
    src = spool.dir(INCOMING, iface.name) / filename
    try:
        st = os.lstat(src) if seen is None else seen
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or not names.is_valid(filename):
        # A name enters joberrors: under the names lock, and looked at again there.
        with spool.names_lock():
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(st.st_mode):
                why = f"not a regular file ({_kind(st)})"
                return _to_errors(spool, iface, src, spool.stamp(), why)
            if not names.is_valid(filename):
                why = f"invalid job name: {names.why_invalid(filename)}"
                return _to_errors(spool, iface, src, spool.stamp(), why)
    # A name in use is no reason to refuse: settle_drop gives it a derived name.
    with os_errors(f"cannot read dropped file {src}"):  # unreadable: reported, left in place
        os.close(os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
    return Screened(src, st)


class Settled(NamedTuple):
    """What :func:`settle_drops` made of one drop."""

    taken: Taken | None  # None: gone, or changed while it was checked (look again)
    error: JobspoolError | OSError | None = None  # not settled now (a full disk, EIO...)


def settle_drop(
    spool: Spool,
    iface: Interface,
    screened: Screened,
    problems: list[Problem],
    *,
    sync: bool = True,
) -> Taken | None:
    """After its check: a drop into its queue (no problems) or into joberrors.

    Under the names lock, only for "is the name free, put it there". A drop
    that changed while it was checked (another size, mtime or inode: a
    writer came back) is left where it is and None returned: the verdict was
    about other bytes, so it is looked at again once it has settled. None too
    when it is gone. With ``sync=False`` an accepted job's rename is made
    durable by the caller's group commit; rejections are synced at once,
    the job's own bytes first, then its log, then the move.
    """
    (settled,) = settle_drops(spool, [(iface, screened, problems)], sync=sync)
    if settled.error is not None:
        raise settled.error
    return settled.taken


def settle_drops(
    spool: Spool,
    drops: Sequence[tuple[Interface, Screened, list[Problem]]],
    *,
    sync: bool = True,
    owned: Callable[[str], bool] | None = None,
) -> list[Settled]:
    """:func:`settle_drop` for checked drops in their order, the names lock held across them.

    A burst pays for the lock and the stamps once, not per drop. The lock
    is let go after a drop that had to be synced at once (a rejection, a
    copy of a file not ours), so that a ``submit`` waits for no more than
    one drop's syncs. A drop that cannot be settled now (a failed digest,
    an I/O error, a lock that cannot be taken) has its error in its
    :class:`Settled`, and the others go on. ``owned(interface)`` is asked
    for each drop under the lock (cluster mode): one whose interface is no
    longer this node's is left in place, as a drop that changed is.
    """
    settled = [Settled(None)] * len(drops)
    digests: list[str | None] = [None] * len(drops)
    todo = []
    for i, (iface, screened, problems) in enumerate(drops):
        try:  # outside the lock: a big job's digest holds up nobody
            digests[i] = _digest(iface, problems, screened.path)
        except (JobspoolError, OSError) as exc:
            settled[i] = Settled(None, exc)
        else:
            todo.append(i)
    while todo:
        try:
            with spool.names_lock():
                stamps = iter(spool.stamps(len(todo)))
                while todo:
                    i = todo.pop(0)
                    iface, screened, problems = drops[i]
                    if owned is not None and not owned(iface.name):
                        continue  # another node's now: left in place
                    try:
                        taken = _settle(
                            spool, iface, screened, problems, digests[i], next(stamps), sync
                        )
                    except (JobspoolError, OSError) as exc:  # this drop waits; the others go on
                        settled[i] = Settled(None, exc)
                        break  # (it may have synced part of its way)
                    settled[i] = Settled(taken)
                    if taken is not None and (taken.place == JOBERRORS or taken.copied):
                        break  # synced at once: a waiting submitter goes before the next
        except (JobspoolError, OSError) as exc:  # the lock itself: the rest wait
            for i in todo:
                settled[i] = Settled(None, exc)
            todo = []
    return settled


def _digest(iface: Interface, problems: list[Problem], path: Path) -> str | None:
    """The content digest a ``same_content`` interface compares, outside the lock."""
    if iface.same_content is None or problems:
        return None
    with suppress(Denied):  # unreadable now: its check said otherwise; look again later
        return content.digest(path)
    return None


def _settle(
    spool: Spool,
    iface: Interface,
    screened: Screened,
    problems: list[Problem],
    hexdigest: str | None,
    stamp: int,
    sync: bool,
) -> Taken | None:
    """One drop, the names lock held: see :func:`settle_drop`."""
    src = screened.path
    filename = src.name
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return None
    before = screened.st
    if (st.st_ino, st.st_size, st.st_mtime_ns) != (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    ):
        return None
    name, original = filename, None
    if spool.locate(filename, besides=src) is not None:
        # The partner sends orders.xml every day: each is a job of its own.
        name = reuse.free_name(filename, stamp, lambda n: spool.locate(n) is not None)
        original = filename
    log = joblog.new(name, iface.name)
    joblog.received(log, "drop", original_name=original)
    same = content.judge(spool, iface, hexdigest, log)
    if same is not None:
        problems = [same]
    joblog.checked(log, problems, iface.schema)
    if original is not None:
        reuse.remember(spool, original, name, sync=sync)
    if problems:
        sync_dropped(spool, src)  # it is reported as kept: it must be whole on disk
        joblog.moved(log, f"{INCOMING}/{iface.name}", JOBERRORS)
        spool.write(spool.joberrors / names.log_name(name), [joblog.to_bytes(log)], replace=True)
        spool.move(src, spool.joberrors, new_name=name)
        return Taken(name, JOBERRORS, stamp, log, str(problems[0]))
    queue = spool.dir(QUEUE, iface.name)
    joblog.moved(log, f"{INCOMING}/{iface.name}", f"{QUEUE}/{iface.name}")
    if iface.outbound:
        # It waits for a fetch, maybe for days, not for a handler in this
        # process: its history goes to disk now, like a submitted job's.
        pending = spool.pending_log(name)
        spool.write(pending, [joblog.to_bytes(log)], replace=True, sync=sync)
    copied = False
    try:
        spool.move(src, queue, stamp_ns=stamp, new_name=name, sync=sync)
    except Denied:
        # Not the file's owner, so its mtime (the queue order) cannot be
        # set: queue a copy we own instead, then drop the original.
        # Synced at once whatever the caller batches: the original goes,
        # so the copy must be on disk first.
        with os_errors(f"cannot read dropped file {src}"), open(src, "rb") as f:
            spool.write(queue / name, _chunks(f), stamp_ns=stamp)
        spool.remove(src, sync=sync)
        copied = True
    content.remember(spool, iface, hexdigest, name, stamp)
    return Taken(name, f"{QUEUE}/{iface.name}", stamp, log, copied=copied)


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
