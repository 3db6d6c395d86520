"""Shell completion: interfaces, job names, schedule ids and users, each from where it lives.

Click calls these while the user presses TAB, so each must be quick and
silent. Job names come from one ``listdir`` per state folder: no ``stat``
per job and no lxml (tests/test_complete.py checks both with strace and
``sys.modules``). Whatever goes wrong (no configuration, no spool, no permission),
a completion offers nothing rather than an error in the middle of a
command line.

The commands wire these with ``shell_complete=``; the scripts for bash and
zsh that the Debian package installs are click's own, generated at build
time (``_JOBSPOOL_COMPLETE=bash_source jobspool``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from jobspool.config import Config

Completer = Callable[[click.Context, click.Parameter, str], list[str]]


def _config(ctx: click.Context) -> Config:
    from jobspool import config

    return config.load(ctx.find_root().params.get("config_path"))


def _quiet(find: Callable[[click.Context, str], Iterable[str]]) -> Completer:
    """A completer from ``find(ctx, incomplete)``: sorted, prefix-matched, never failing."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        try:
            return sorted({c for c in find(ctx, incomplete) if c.startswith(incomplete)})
        except Exception:  # completion must never break the shell's line
            return []

    complete.__doc__ = find.__doc__
    return complete


def _names_in(folders: Iterable[str], incomplete: str) -> list[str]:
    """Valid job names in ``folders`` starting with ``incomplete``: one listdir each."""
    from jobspool import names

    found: list[str] = []
    for folder in folders:
        try:
            entries = os.listdir(folder)
        except OSError:  # not there (yet), or not ours to read
            continue
        if incomplete:
            entries = [e for e in entries if e.startswith(incomplete)]
        # names.valid drops logs (NAME,log.xml) and hidden uploads in one C pass
        found += [e for e in names.valid(entries) if not names.is_partial_upload(e)]
    return found


def _folders(cfg: Config, places: Iterable[tuple[str, str | None]]) -> list[str]:
    from jobspool.spool import Spool

    spool = Spool(cfg.spool, cfg.interfaces)
    return [os.fspath(spool.dir(state, iface)) for state, iface in places]


@_quiet
def interfaces(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Interface names of the configuration."""
    return _config(ctx).interfaces


@_quiet
def jobs(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Every job of the spool, wherever it is (``status``)."""
    from jobspool.spool import Spool

    cfg = _config(ctx)
    places = [(p.state, p.interface) for p in Spool(cfg.spool, cfg.interfaces).places()]
    return _names_in(_folders(cfg, places), incomplete)


@_quiet
def logged_jobs(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Jobs that have a log: in bak or joberrors (``log``)."""
    from jobspool.spool import BAK, JOBERRORS

    cfg = _config(ctx)
    places = [*((BAK, i) for i in cfg.interfaces), (JOBERRORS, None)]
    return _names_in(_folders(cfg, places), incomplete)


@_quiet
def failed_jobs(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Jobs in joberrors (``retry``)."""
    from jobspool.spool import JOBERRORS

    return _names_in(_folders(_config(ctx), [(JOBERRORS, None)]), incomplete)


@_quiet
def queued_jobs(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Jobs queued on the command's IFACE argument (``fetch``)."""
    from jobspool.spool import QUEUE

    cfg = _config(ctx)
    iface = ctx.params.get("interface")
    if iface not in cfg.interfaces:
        return []
    return _names_in(_folders(cfg, [(QUEUE, iface)]), incomplete)


@_quiet
def schedules(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Schedule ids of the configuration."""
    return _config(ctx).schedules


@_quiet
def users(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """Users in the HTTP front's users file (http.users)."""
    from jobspool.http import auth

    http = _config(ctx).http
    return auth.read_file(http.users) if http is not None else []


@_quiet
def accounts(ctx: click.Context, incomplete: str) -> Iterable[str]:
    """System user names (``schedule chown``)."""
    import pwd

    return [p.pw_name for p in pwd.getpwall()]
