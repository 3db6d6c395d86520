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

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import BinaryIO

from jobspool import check as checking
from jobspool import joblog, names
from jobspool.config import Config, Interface
from jobspool.errors import BadRequest, CheckError, Rejected
from jobspool.spool import JOBERRORS, QUEUE, Spool, os_errors

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
    spool = spool_of(cfg)
    with open_source(source) as f, spool.names_lock():
        found = spool.locate(name)
        if found is not None:
            raise BadRequest(f"job name {name!r} is already in use ({found.place}); "
                             "choose another with --name")  # fmt: skip
        head = f.read(iface.max_size + 1)
        result = _check(iface, head)
        log = joblog.new(name, iface.name)
        joblog.received(log, "submit")
        joblog.checked(log, result.errors, result.schema)
        if result.errors:
            _reject(spool, name, log, chain([head], _rest(f)), result.errors)
        joblog.moved(log, "outside", f"{QUEUE}/{iface.name}")
        spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
        spool.write(spool.dir(QUEUE, iface.name) / name, [head], stamp_ns=spool.stamp())
    return name


def retry(cfg: Config, name: str) -> str:
    """Take a job out of joberrors, check it again and queue it on its interface.

    Returns where the job now is. A job rejected again stays in joberrors,
    its log gains the new check, and :class:`Rejected` is raised.
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
            raise _rejected(name, result.errors, "stays in joberrors")
        queue = spool.dir(QUEUE, iface.name)
        joblog.moved(log, JOBERRORS, f"{QUEUE}/{iface.name}")
        spool.write(spool.pending_log(name), [joblog.to_bytes(log)], replace=True)
        # The retried job joins the end of its queue: it is accepted now.
        spool.move(found.path, queue, stamp_ns=spool.stamp())
        with os_errors(f"cannot remove the old log of {name}"):
            found.log_path.unlink(missing_ok=True)
    return f"{QUEUE}/{iface.name}"


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
    spool.write(spool.joberrors / names.log_name(name), [joblog.to_bytes(log)], replace=True)
    spool.write(spool.joberrors / name, content)
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
