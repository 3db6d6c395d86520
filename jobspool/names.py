"""What a job or interface name may be: the only gate from user text to a path.

A name is 1-200 characters of ``A-Z a-z 0-9 . _ -`` and does not start with
``.`` or ``-`` (docs/spec.rst, "Jobs"). Such a name can never be ``.``/``..``, contain a
slash, look like an option, or hide from ``ls``; so once a name has passed
:func:`check_name` it is safe to join onto a spool directory.

Logs sit beside their jobs as ``NAME,log.xml``: the comma is outside the name
alphabet, so no job can ever be named like another job's log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from jobspool.errors import BadRequest

MAX_LEN = 200
LOG_SUFFIX = ",log.xml"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")

# Names an SFTP/scp/rsync client uses while a file is still being written.
# rsync writes ".NAME.XXXXXX" (caught by the leading dot), WinSCP
# "NAME.filepart", browsers and many tools ".part"/".tmp", editors "~".
_PARTIAL_SUFFIXES = (".part", ".filepart", ".tmp", "~", ".crdownload", ".partial")


def is_valid(name: str) -> bool:
    """True when ``name`` is a valid job or interface name."""
    return _NAME.fullmatch(name) is not None


def valid(candidates: Iterable[str]) -> list[str]:
    """The valid names among ``candidates``, in their order.

    One pass in C (``filter`` over the compiled pattern): a queue folder can
    hold a million names, and a Python call per name is a tenth of a listing.
    """
    return list(filter(_NAME.fullmatch, candidates))


def check_name(name: str, what: str = "job") -> str:
    """Return ``name`` unchanged if valid; raise :class:`BadRequest` saying why not."""
    if is_valid(name):
        return name
    raise BadRequest(f"invalid {what} name {_shown(name)}: {why_invalid(name)}")


def why_invalid(name: str) -> str:
    """A short reason a name is not valid (empty string when it is)."""
    if not name:
        return "it is empty"
    if len(name) > MAX_LEN:
        return f"it is {len(name)} characters long, the limit is {MAX_LEN}"
    if name[0] in ".-":
        return f"it may not start with {name[0]!r}"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad) + "; allowed are A-Z a-z 0-9 . _ -"
    return ""


def is_partial_upload(filename: str) -> bool:
    """True for names a client uses while an upload is in progress (never taken)."""
    return filename.startswith(".") or filename.endswith(_PARTIAL_SUFFIXES)


def log_name(job: str) -> str:
    """The file name of a job's XML log, which sits beside the job."""
    return job + LOG_SUFFIX


def _shown(name: str) -> str:
    # Hostile names may hold newlines or escapes; repr keeps the error one
    # printable line, and the cut keeps it short.
    shown = repr(name)
    return shown if len(shown) <= 60 else shown[:57] + "...'"
