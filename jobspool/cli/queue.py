"""The operator's queue commands: hold, release, delete, errors, audit (docs/cli.rst).

Each write command records who did it, and when, in the audit log
(``state/audit.log``) and in the job's log; each refuses with exit 2 and
one line where it cannot act. The core is imported inside each command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from jobspool.cli import complete
from jobspool.cli.common import (
    State,
    audited,
    isos,
    json_opt,
    pass_state,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from jobspool.spool import Spool


def _spool(state: State) -> Spool:
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    spool.require()
    return spool


def _who() -> str:
    from jobspool import audit

    return audit.invoker()


@click.command()
@click.argument("job")
@pass_state
def hold(state: State, job: str) -> None:
    """Hold a queued JOB: it keeps its place but is skipped until released."""
    from jobspool import hold as holding

    who = _who()
    found = holding.hold(_spool(state), job, who)
    audited(state, "hold", job, interface=found.place.interface)
    click.echo(f"{job} held in {found.place}")


@click.command()
@click.argument("job")
@pass_state
def release(state: State, job: str) -> None:
    """Let a held JOB run again, in its place."""
    from jobspool import hold as holding

    found = holding.release(_spool(state), job, _who())
    audited(state, "release", job, interface=found.place.interface)
    click.echo(f"{job} released in {found.place}")


@click.command()
@click.argument("job")
@pass_state
def delete(state: State, job: str) -> None:
    """Move JOB (queued, failed or in bak) with its log into state/deleted/."""
    from jobspool.delete import delete as delete_job

    was, path = delete_job(_spool(state), job, _who())
    audited(state, "delete", job, was=was, now=str(path))
    click.echo(f"{job} deleted from {was}: now {path}")


@click.command()
@click.argument("interface", metavar="[IFACE]", required=False, shell_complete=complete.interfaces)
@json_opt
@pass_state
def errors(state: State, interface: str | None, as_json: bool) -> None:
    """The jobs in joberrors (of IFACE), oldest first, with why each failed."""
    from jobspool.joberrors import failed

    rows = failed(state.config, interface)
    whens = list(isos(f.stamp for f in rows))
    if as_json:
        print_json([{"job": f.job, "interface": f.interface, "failed": w, "reason": f.reason}
                    for f, w in zip(rows, whens, strict=True)])  # fmt: skip
        return
    if rows:
        table = [("JOB", "INTERFACE", "FAILED", "REASON")]
        table += [(f.job, f.interface or "?", w, (f.reason or "-").splitlines()[0] if f.reason
                   else "-") for f, w in zip(rows, whens, strict=True)]  # fmt: skip
        print_table(table)


@click.command()
@json_opt
@pass_state
def audit(state: State, as_json: bool) -> None:
    """Every manual action recorded: when, who, what, on which target."""
    from jobspool import audit as auditing

    entries = auditing.entries(state.config.spool)
    if as_json:
        print_json(entries)
        return
    if entries:
        table = [("TIME", "WHO", "ACTION", "TARGET", "DETAIL")]
        table += [(e["time"], e["who"], e["action"], e["target"],
                   " ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items()))
                  for e in entries]  # fmt: skip
        print_table(table)


COMMANDS = (hold, release, delete, errors, audit)
