"""How a notification leaves the machine: a command, mail (sendmail or SMTP), a webhook.

Imported by the notifier's thread when it first sends, never at start.
Each sender takes a route (``config.CommandRoute``, ``MailRoute``,
``WebhookRoute``) and a :class:`~jobspool.notices.Notice`, and returns once
it is delivered, or raises with the reason. Every one has a timeout. Only
the standard library: ``subprocess``, ``smtplib`` (STARTTLS, always), and
``urllib`` for HTTPS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from jobspool.config import CommandRoute, MailRoute, Route, WebhookRoute

if TYPE_CHECKING:
    import ssl
    from email.message import EmailMessage

    from jobspool.notices import Notice

# The daemon's own systemd variables are not a command's business.
_PRIVATE = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class NotSent(Exception):
    """The route did not take the notification; the message says why."""


def deliver(route: Route, notice: Notice) -> None:
    """Send ``notice`` through ``route``; :class:`NotSent` (or OSError) if it did not go."""
    if isinstance(route, CommandRoute):
        run_command(route, notice)
    elif isinstance(route, MailRoute):
        send_mail(route, notice)
    else:
        post_webhook(route, notice)


# --- a command ----------------------------------------------------------------------


def environment(notice: Notice) -> dict[str, str]:
    """``JOBSPOOL_*`` variables: the first event's fields, the count and the subject."""
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE}
    first = notice.events[0] if notice.events else None
    env.update(
        JOBSPOOL_EVENT=first.kind if first else next(iter(notice.counts), ""),
        JOBSPOOL_JOB=(first and first.job) or "",
        JOBSPOOL_INTERFACE=(first and first.interface) or "",
        JOBSPOOL_SCHEDULE=(first and first.schedule) or "",
        JOBSPOOL_REASON=(first and first.reason) or "",
        JOBSPOOL_COUNT=str(notice.total),
        JOBSPOOL_SUBJECT=notice.subject(),
        JOBSPOOL_SPOOL=notice.spool,
        JOBSPOOL_HOST=notice.host,
    )
    return env


def run_command(route: CommandRoute, notice: Notice) -> None:
    """Run the route's program with the notification as JSON on stdin; its own process group."""
    data = json.dumps(notice.as_json(), ensure_ascii=False).encode()
    try:
        proc = subprocess.Popen(
            route.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment(notice),
            start_new_session=True,  # its children go with it on a timeout
            close_fds=True,
        )
    except OSError as exc:
        raise NotSent(f"cannot run {route.argv[0]}: {exc.strerror}") from None
    try:
        out, _ = proc.communicate(data, timeout=route.timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise NotSent(f"{route.argv[0]} timed out after {route.timeout:g}s") from None
    if proc.returncode != 0:
        said = out.decode("utf-8", "replace").strip().splitlines()
        tail = f": {said[-1][:200]}" if said else ""
        raise NotSent(f"{route.argv[0]} exited {proc.returncode}{tail}")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


# --- mail -----------------------------------------------------------------------------


def message(route: MailRoute, notice: Notice, sender: str | None) -> EmailMessage:
    """The mail: a plain text body, marked as automatic (RFC 3834) so nobody auto-replies."""
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    msg = EmailMessage()
    msg["Subject"] = notice.subject()
    msg["To"] = ", ".join(route.to)
    if sender:
        msg["From"] = sender
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=notice.host or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(notice.text())
    return msg


def send_mail(route: MailRoute, notice: Notice) -> None:
    if route.smtp_host is None:
        _sendmail(route, message(route, notice, route.sender))
    else:
        import socket

        sender = route.sender or f"jobspool@{socket.getfqdn()}"
        _smtp(route, message(route, notice, sender), sender)


def _sendmail(route: MailRoute, msg: EmailMessage) -> None:
    """``sendmail -t -oi``, as cron does: the recipients come from the To: header."""
    try:
        proc = subprocess.run(
            route.sendmail,
            input=msg.as_bytes(),
            capture_output=True,
            timeout=route.timeout,
            env={k: v for k, v in os.environ.items() if k not in _PRIVATE},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NotSent(f"{route.sendmail[0]} timed out after {route.timeout:g}s") from None
    except OSError as exc:
        raise NotSent(f"cannot run {route.sendmail[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise NotSent(f"{route.sendmail[0]} exited {proc.returncode}"
                      + (f": {said[-1][:200]}" if said else ""))  # fmt: skip


def _smtp(route: MailRoute, msg: EmailMessage, sender: str) -> None:
    """SMTP with STARTTLS, always: credentials never cross the network in the clear."""
    import smtplib

    assert route.smtp_host is not None
    try:
        with smtplib.SMTP(route.smtp_host, route.smtp_port, timeout=route.timeout) as smtp:
            smtp.starttls(context=_tls(route.ca))
            if route.credentials is not None:
                user, password = _credentials(route)
                smtp.login(user, password)
            smtp.send_message(msg, from_addr=sender, to_addrs=list(route.to))
    except smtplib.SMTPNotSupportedError:
        raise NotSent(f"{route.smtp_host}:{route.smtp_port} offers no STARTTLS") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise NotSent(f"SMTP {route.smtp_host}:{route.smtp_port}: {exc}") from None


def _credentials(route: MailRoute) -> tuple[str, str]:
    """The user on the first line, the password on the second (read at each send)."""
    assert route.credentials is not None
    try:
        lines = route.credentials.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise NotSent(f"cannot read {route.credentials}: {exc.strerror}") from None
    if len(lines) < 2 or not lines[0]:
        raise NotSent(f"{route.credentials}: expected the user, then the password, one per line")
    return lines[0], lines[1]


def _tls(ca: os.PathLike[str] | None) -> ssl.SSLContext:
    import ssl

    return ssl.create_default_context(cafile=None if ca is None else os.fspath(ca))


# --- a webhook ------------------------------------------------------------------------


def post_webhook(route: WebhookRoute, notice: Notice) -> None:
    """POST the notification as JSON over HTTPS; retried on network errors, 429 and 5xx.

    Redirects are not followed: a POST that moves elsewhere (perhaps to
    plain HTTP) is a configuration to fix, not to guess at.
    """
    from jobspool import __version__

    body = json.dumps(notice.as_json(), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"jobspool/{__version__}",
               **route.headers}  # fmt: skip
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=_tls(route.ca)), _NoRedirect()
    )
    problem = ""
    for attempt in range(route.retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 30.0))
        request = urllib.request.Request(route.url, data=body, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=route.timeout) as response:
                response.read(65536)
            return
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}"
            if exc.code != 429 and exc.code < 500:
                raise NotSent(f"{_where(route.url)}: {problem}") from None
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", None) or exc)
    raise NotSent(f"{_where(route.url)}: {problem} ({route.retries + 1} tries)")


def _where(url: str) -> str:
    """The URL without its path, which often holds a token."""
    from urllib.parse import urlsplit

    return f"https://{urlsplit(url).netloc}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
