"""The jobs in joberrors, by interface: listing them and retrying them in bulk.

``joberrors/`` holds the failed jobs of every interface in one folder; the
interface of each is in its log (``<joblog interface=...>``). ``jobspool
errors [IFACE]`` lists them with the reason of their last failure; ``jobspool
retry --interface IFACE`` and ``retry --all`` (Postfix's ``postsuper -r``)
check each again and queue it, one after another (``--dry-run`` only lists
what would be retried).
"""

from __future__ import annotations

from typing import NamedTuple

from jobspool import joblog, names
from jobspool.config import Config
from jobspool.errors import BadRequest, Rejected
from jobspool.intake import retry
from jobspool.spool import Spool


class Failed(NamedTuple):
    """One job in joberrors."""

    job: str
    interface: str | None
    stamp: int
    reason: str | None


def failed(cfg: Config, interface: str | None = None) -> list[Failed]:
    """The jobs in joberrors (of ``interface``, if given), oldest first."""
    if interface is not None:
        cfg.interface(interface)
    spool = Spool.of(cfg)
    spool.require()
    out = []
    for stamp, name in sorted(spool._jobs_in(spool.joberrors)):
        log_path = spool.joberrors / names.log_name(name)
        iface = spool.interface_of_log(log_path)
        if interface is not None and iface != interface:
            continue
        out.append(Failed(name, iface, stamp, _reason(log_path)))
    return out


def retry_all(
    cfg: Config, interface: str | None, *, dry_run: bool = False, by: str | None = None
) -> list[tuple[str, str]]:
    """Retry every job in joberrors (of ``interface``): (job, where it went or why not)."""
    done = []
    for f in failed(cfg, interface):
        if f.interface is None or f.interface not in cfg.interfaces:
            done.append((f.job, "skipped: its log names no configured interface"))
            continue
        if dry_run:
            done.append((f.job, f"would be retried on {f.interface}"))
            continue
        try:
            done.append((f.job, retry(cfg, f.job, by)))
        except Rejected as exc:
            done.append((f.job, f"rejected again: {exc}"))
        except BadRequest as exc:  # gone meanwhile, or its log is damaged
            done.append((f.job, f"skipped: {exc}"))
    return done


def _reason(log_path: object) -> str | None:
    """Why the job failed the last time: a handler's reason, the first check error, ..."""
    try:
        with open(str(log_path), "rb") as f:
            log = joblog.from_bytes(f.read())
    except (OSError, SyntaxError):
        return None
    q = f"{{{joblog.NS}}}"
    reason = None
    for el in log:
        tag = el.tag if isinstance(el.tag, str) else ""
        if tag == q + "received" and el.get("reason"):
            reason = el.get("reason")
        elif tag == q + "checked" and el.get("outcome") == "rejected":
            first = el.find(q + "error")
            reason = first.text if first is not None else "rejected by its check"
        elif tag == q + "ran" and el.get("outcome") in ("failed", "later"):
            reason = el.get("reason") or el.get("outcome")
        elif tag == q + "note" and (el.text or "").startswith("gave up"):
            reason = el.text
    return reason
