"""What the command modules share: the group's state, options, printing, failing.

Only click and the standard library: every command module imports this, and
the read commands must start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from jobspool.cli import complete

if TYPE_CHECKING:
    from jobspool.config import Config


class State:
    """What the group's options leave for the commands."""

    def __init__(self, config_path: str | None, debug: bool) -> None:
        self.config_path = config_path
        self.debug = debug
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            from jobspool import config

            self._config = config.load(self.config_path)
        return self._config


pass_state = click.make_pass_decorator(State)


iface_arg = click.argument("interface", metavar="IFACE", shell_complete=complete.interfaces)
json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def audited(state: State, action: str, target: str, **detail: Any) -> str:
    """Record a manual action in the spool's audit log (who, when, what); returns who.

    Without a spool (``user add`` before ``init``) there is nowhere to record
    it: the command says so on stderr.
    """
    from jobspool import audit

    who = audit.invoker()
    root = state.config.spool
    if not (root / "state").is_dir():
        warn(f"{action} {target}: not in the audit log (no spool at {root} yet)")
        return who
    audit.record(root, who, action, target, {k: v for k, v in detail.items() if v is not None})
    return who


def print_table(rows: list[tuple[Any, ...]]) -> None:
    """Rows as columns aligned for a terminal, two spaces apart (a header first)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON (every --json but ``queue``'s, which writes the same)."""
    import json

    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def warn(message: str) -> None:
    """One line on stderr, as every message of the command starts."""
    click.echo(f"jobspool: {message}", err=True)


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    warn(message)
    sys.exit(code)


def isos(stamps: Iterable[int]) -> Iterator[str]:
    """Stamps (ns) as local times with milliseconds and UTC offset, as the job logs show them.

    Each distinct second is converted once: jobs accepted in a burst share
    their seconds, and the conversion is most of a row's cost.
    """
    seconds: dict[int, tuple[str, str]] = {}
    for ns in stamps:
        second, rest = divmod(ns, 1_000_000_000)
        parts = seconds.get(second)
        if parts is None:
            text = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            parts = seconds[second] = (text[:19], text[19:])  # the time, the offset
        yield f"{parts[0]}.{rest // 1_000_000:03d}{parts[1]}"
