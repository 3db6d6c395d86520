"""The ``jobspool`` command: parse arguments, call the core, print.

Every error the core raises carries its exit code (``jobspool.errors``);
:func:`main` turns it into one line on stderr, in one place. The core is
imported inside each command so that a read command loads only what it
needs: ``status``, ``queue`` and ``log`` never import lxml or structlog.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from jobspool import __version__
from jobspool.cli import complete
from jobspool.cli.common import (
    State,
    audited,
    fail,
    iface_arg,
    isos,
    json_opt,
    pass_state,
    print_json,
    print_table,
    warn,
)
from jobspool.errors import JobspoolError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from jobspool.config import Config

EX_SOFTWARE = 70  # an internal error: a bug, reported as one line (traceback with --debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    help="Configuration file [default: $JOBSPOOL_CONFIG, ./jobspool.yaml, "
    "/etc/jobspool/jobspool.yaml].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.version_option(__version__, "-V", "--version", prog_name="jobspool")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """Move XML jobs through a spool: check, queue, handle, log, archive."""
    ctx.obj = State(config_path, debug)


# --- read commands -------------------------------------------------------------


@cli.command()
@click.argument("jobs", metavar="JOB...", nargs=-1, required=True, shell_complete=complete.jobs)
@json_opt
@pass_state
def status(state: State, jobs: tuple[str, ...], as_json: bool) -> None:
    """Where a job is: incoming/IFACE, queue/IFACE, bak/IFACE or joberrors.

    With several jobs, each line is 'JOB STATUS'. Exits 2 if any is unknown.
    A name dropped again (orders.xml every day) answers for the newest job
    dropped under it, and says its derived name on stderr.
    """
    from jobspool import hold, reuse
    from jobspool.errors import BadRequest
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    answers: list[tuple[str, str | None, str | None, bool]] = []
    with _reading(spool.root):
        spool.require()
        for name in jobs:
            try:
                found = reuse.newest(spool, name) or spool.find(name)
            except BadRequest as exc:
                if len(jobs) == 1:
                    raise
                warn(str(exc))
                answers.append((name, None, None, False))
            else:
                if found.name != name:
                    warn(f"{name}: the newest job dropped as {name} is {found.name}")
                held = found.place.state == "queue" and hold.is_held(spool, found.name)
                answers.append((name, str(found.place), found.name, held))
    if as_json:
        print_json([{"job": j, "status": s, "name": n, "held": h} for j, s, n, h in answers])
    elif len(jobs) == 1:
        click.echo(answers[0][1])
    else:
        click.echo("".join(f"{j} {s}\n" for j, s, _, _ in answers if s), nl=False)
    if any(s is None for _, s, _, _ in answers):
        sys.exit(BadRequest.exit_code)


@cli.command()
@click.argument("interface", metavar="[IFACE]", required=False, shell_complete=complete.interfaces)
@click.option("--all", "every", is_flag=True, help="Every interface, with each job's state.")
@json_opt
@pass_state
def queue(state: State, interface: str | None, every: bool, as_json: bool) -> None:
    """The jobs queued on IFACE, one per line, in processing order.

    With --all (postqueue -p): every interface's jobs, each with its state
    (waiting, held, blocking, paused) and, for a blocking head, the reason.
    """
    import os

    from jobspool.spool import Spool

    if every or interface is None:
        if interface is not None or not every:
            from jobspool.errors import BadRequest

            raise BadRequest("name one interface, or --all for every one (not both)")
        _queue_all(state, as_json)
        return
    state.config.interface(interface)
    workers = min(len(os.sched_getaffinity(0)), 4)  # a stat per job: share them among CPUs
    spool = Spool.of(state.config)
    with _reading(spool.root):
        listing = spool.listing(interface, workers=workers)
    if as_json:
        sys.stdout.write(_queue_json(listing.stamps, listing.names))
    elif listing.names:
        sys.stdout.write("\n".join(listing.names) + "\n")


@cli.command()
@click.argument("job", shell_complete=complete.logged_jobs)
@json_opt
@pass_state
def log(state: State, job: str, as_json: bool) -> None:
    """Print the XML log of JOB (exit 75 while it has none yet)."""
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    with _reading(spool.root):
        data = spool.read_log(job)
    if as_json:
        print_json({"job": job, "log": data.decode("utf-8", "replace")})
    else:
        sys.stdout.buffer.write(data)


@cli.command()
@json_opt
@pass_state
def interfaces(state: State, as_json: bool) -> None:
    """Each interface: direction, dropped and queued jobs, oldest, paused, errors.

    An interface whose queue does not move says why in the last column: which
    job blocks its head, since when, and the handler's reason. The last line
    says whether a daemon serves the spool (and its pid).
    """
    from jobspool.overview import daemon_pid, overview
    from jobspool.spool import Spool

    cfg = state.config
    spool = Spool.of(cfg)
    with _reading(spool.root):
        rows_of = overview(spool)
        pid = daemon_pid(spool)
    rows = [
        {"interface": o.interface, "direction": cfg.interfaces[o.interface].direction,
         "incoming": o.incoming, "queued": o.queued, "oldest_seconds": o.oldest_seconds,
         "paused": o.paused, "errors": o.errors, "blocked": o.blocked, "daemon_pid": pid}
        for o in rows_of
    ]  # fmt: skip
    served = _served_by(cfg) if cfg.cluster is not None else None
    if served is not None:  # cluster mode: which node serves each interface, since when
        for r in rows:
            r["node"], r["since"] = served.get(str(r["interface"]), (None, None))
    if as_json:
        print_json(rows)
        return
    nodes = ("NODE", "SINCE") if served is not None else ()
    table: list[tuple[str, ...]] = [
        ("INTERFACE", *nodes, "DIR", "INCOMING", "QUEUED", "OLDEST", "PAUSED", "ERRORS",
         "WHY NOT MOVING")
    ]  # fmt: skip
    for o in rows_of:
        where = () if served is None else tuple(v or "-" for v in served.get(o.interface, ("", "")))
        table.append(
            (o.interface, *where, cfg.interfaces[o.interface].direction, str(o.incoming),
             str(o.queued), "-" if o.oldest_seconds is None else _age(o.oldest_seconds),
             "yes" if o.paused else "no", str(o.errors),
             "paused" if o.paused and o.queued else (o.blocked or ""))
        )  # fmt: skip
    print_table(table)
    if served is None:
        click.echo(f"\n{_served(spool.root, pid)}")


def _served_by(cfg: Config) -> dict[str, tuple[str | None, str | None]]:
    """Cluster mode: interface -> (node holding its lease, since when), from state/leases/."""
    from datetime import datetime

    from jobspool import lease
    from jobspool.spool import Spool

    spool = Spool.of(cfg)
    out: dict[str, tuple[str | None, str | None]] = {}
    prefix = lease.interface_key("")
    for key, record in lease.Store(spool.state, spool.tmp).holders().items():
        if key.startswith(prefix) and not record.released:
            since = datetime.fromtimestamp(record.since).astimezone()
            out[key[len(prefix) :]] = (record.node, since.isoformat(timespec="seconds"))
    return out


@cli.command("daemon-status")
@json_opt
@pass_state
def daemon_status(state: State, as_json: bool) -> None:
    """Is a daemon serving the spool? Exit 0 if one is (its pid is printed), 75 if none.

    For monitoring checks: 77 when the spool cannot be read, 78 for a broken
    configuration.
    """
    from jobspool.errors import TryLater
    from jobspool.overview import daemon_pid
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    with _reading(spool.root):
        pid = daemon_pid(spool)
    if as_json:
        print_json({"spool": str(spool.root), "running": pid is not None, "pid": pid})
    else:
        click.echo(_served(spool.root, pid))
    if pid is None:
        sys.exit(TryLater.exit_code)


def _served(root: Path, pid: int | None) -> str:
    if pid is None:
        return f"no daemon serves {root}: dropped files and queued jobs wait"
    return f"daemon pid {pid or '(starting)'} serves {root}"


# --- write commands ------------------------------------------------------------


@cli.command()
@pass_state
def init(state: State) -> None:
    """Create the spool tree for the configuration (safe to repeat)."""
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    created = spool.init()
    click.echo(f"spool ready at {spool.root} ({len(created)} directories created)")


@cli.command()
@iface_arg
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@json_opt
@pass_state
def check(state: State, interface: str, file: str, as_json: bool) -> None:
    """Check FILE against IFACE's schema; change nothing (exit 0 or 65)."""
    from jobspool.errors import Rejected
    from jobspool.intake import check_file

    iface = state.config.interface(interface)
    result = check_file(state.config, iface, file)
    if as_json:
        errors = [
            {"line": e.line, "column": e.column, "message": e.message} for e in result.problems
        ]
        print_json({"file": file, "interface": interface, "ok": result.ok, "errors": errors})
    elif result.ok:
        click.echo(f"{file}: ok for {interface}")
    else:
        for e in result.problems:
            click.echo(f"{file}:{e.line}:{e.column}: {e.message}", err=True)
    if not result.ok:
        sys.exit(Rejected.exit_code)


@cli.command()
@iface_arg
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--name", help="The job's name [default: FILE's base name; required for -].")
@pass_state
def submit(state: State, interface: str, file: str, name: str | None) -> None:
    """Check FILE and queue it on IFACE; print the job's name."""
    from jobspool.intake import submit as submit_job

    click.echo(submit_job(state.config, interface, file, name))


@cli.command()
@click.argument("job", required=False, shell_complete=complete.failed_jobs)
@click.option("--now", is_flag=True, help="JOB is queued and waits to try again: try it now.")
@click.option("--interface", "iface", metavar="IFACE", shell_complete=complete.interfaces,
              help="Every job in joberrors that came from IFACE.")  # fmt: skip
@click.option("--all", "every", is_flag=True, help="Every job in joberrors.")
@click.option("--dry-run", is_flag=True, help="With --interface/--all: only list them.")
@pass_state
def retry(
    state: State, job: str | None, now: bool, iface: str | None, every: bool, dry_run: bool
) -> None:
    """Take JOB out of joberrors, check it again, queue it on its interface.

    --now JOB ends the back-off of a queued JOB that said "try later"
    (postqueue -i). --interface IFACE or --all retries every failed job of
    IFACE or of all interfaces (postsuper -r), each reported on a line; exits
    65 if any was rejected again.
    """
    from jobspool import audit
    from jobspool.errors import BadRequest

    if sum((job is not None, iface is not None, every)) != 1:
        raise BadRequest("retry takes one of: JOB, --interface IFACE, --all")
    if (now and job is None) or (dry_run and job is not None):
        raise BadRequest("--now goes with JOB, --dry-run with --interface or --all")
    if job is not None and now:
        from jobspool.spool import Spool
        from jobspool.tries import retry_now

        spool = Spool.of(state.config)
        on = retry_now(spool, job, audit.invoker())
        audited(state, "retry-now", job, interface=on)
        click.echo(f"{job}: {on} tries it again now")
        return
    if job is not None:
        from jobspool.intake import retry as retry_job

        where = retry_job(state.config, job, audit.invoker())
        audited(state, "retry", job, to=where)
        click.echo(where)
        return
    from jobspool.joberrors import retry_all

    results = retry_all(state.config, iface, dry_run=dry_run, by=audit.invoker())
    if not dry_run:
        audited(state, "retry", iface or "*", jobs=len(results))
    for name, outcome in results:
        click.echo(f"{name} {outcome}")
    if any(o.startswith("rejected") for _, o in results):
        from jobspool.errors import Rejected

        sys.exit(Rejected.exit_code)


@cli.command()
@iface_arg
@pass_state
def pause(state: State, interface: str) -> None:
    """Stop processing IFACE (it still accepts jobs); survives restarts."""
    from jobspool.spool import Spool

    state.config.interface(interface)
    Spool.of(state.config).pause(interface)
    audited(state, "pause", interface)
    click.echo(f"{interface} paused")


@cli.command()
@iface_arg
@pass_state
def resume(state: State, interface: str) -> None:
    """Process IFACE again after 'jobspool pause'."""
    from jobspool.spool import Spool

    state.config.interface(interface)
    Spool.of(state.config).resume(interface)
    audited(state, "resume", interface)
    click.echo(f"{interface} resumed")


@cli.command()
@iface_arg
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to copy the jobs into.")  # fmt: skip
@click.argument("jobs", metavar="[JOB]...", nargs=-1, shell_complete=complete.queued_jobs)
@pass_state
def fetch(state: State, interface: str, to: Path, jobs: tuple[str, ...]) -> None:
    """Copy queued jobs of an _out interface into DIR, durably, then move them to bak.

    Without JOB names, every queued job is fetched, in queue order. Prints
    each job's name once it is safely in DIR.
    """
    from jobspool.fetch import fetch as fetch_jobs

    for name in fetch_jobs(state.config, interface, to, jobs):
        click.echo(name)


@cli.command()
@click.option(
    "--once", is_flag=True, help="Process what is there, then exit (for tests and demos)."
)
@click.option("--check", is_flag=True, help="Only check the configuration as the daemon would.")
@pass_state
def daemon(state: State, once: bool, check: bool) -> None:
    """Run the daemon in the foreground (under systemd: Type=notify).

    With --check, validate everything the daemon validates at start and on
    SIGHUP (schedules included), print nothing and exit 0, or 78 with the
    problem: what the unit's ExecReload= runs before it sends SIGHUP.
    """
    if check:
        from jobspool.daemon import check_config

        check_config(state.config_path)  # raises on anything the daemon would refuse
        return
    from jobspool.daemon import main as run_daemon

    sys.exit(run_daemon(state.config_path, once=once))


# --- printing ------------------------------------------------------------------


def _queue_json(stamps: Iterable[int], names: list[str]) -> str:
    """What ``print_json`` prints for the queue's rows, written directly.

    A million rows through ``json.dumps(indent=2)`` (its pure-Python
    encoder) take seconds. Job names need no escaping: they passed the name
    check, whose alphabet has no quote, backslash or control character.
    """
    if not names:
        return "[]\n"
    rows = ",\n".join(
        f'  {{\n    "job": "{name}",\n    "accepted": "{at}"\n  }}'
        for name, at in zip(names, isos(stamps), strict=True)
    )
    return f"[\n{rows}\n]\n"


def _queue_all(state: State, as_json: bool) -> None:
    from jobspool.queues import every_queue
    from jobspool.spool import Spool

    rows = every_queue(Spool.of(state.config))
    whens = list(isos(r.stamp for r in rows))
    if as_json:
        print_json([{"interface": r.interface, "job": r.job, "accepted": w, "state": r.state,
                     "reason": r.reason} for r, w in zip(rows, whens, strict=True)])  # fmt: skip
        return
    if rows:
        table = [("INTERFACE", "JOB", "ACCEPTED", "STATE", "REASON")]
        table += [(r.interface, r.job, w, r.state, r.reason or "")
                  for r, w in zip(rows, whens, strict=True)]  # fmt: skip
        print_table(table)


def _age(seconds: float) -> str:
    """A short age for a table: 45s, 12m, 5h, 3d (the unit changes at twice its size)."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


@contextlib.contextmanager
def _reading(root: Path) -> Iterator[None]:
    """A read command refused by the file system exits 77 with a hint, like a write command."""
    try:
        yield
    except OSError as exc:
        import errno

        if exc.errno not in (errno.EACCES, errno.EPERM):
            raise
        from jobspool.errors import Denied

        where = exc.filename or root
        raise Denied(f"cannot read {where}: {exc.strerror}; {_group_hint(root)}") from None


def _group_hint(root: Path) -> str:
    """Who may read the spool: the members of its group (named when it can be seen)."""
    import os

    try:
        import grp

        group = grp.getgrgid(os.stat(root).st_gid).gr_name
    except (OSError, KeyError):
        return "the read commands need the spool's group (see docs/deployment.rst, 'People')"
    return (
        f"the read commands need the spool's group {group} "
        f"(usermod -aG {group} USER, then log in again)"
    )


def _add_schedule_group() -> None:
    # Its module is small; click needs the group object to list it in --help.
    from jobspool.cli.schedule import schedule

    cli.add_command(schedule)


_add_schedule_group()


class _LazyNotify(click.Group):
    """``jobspool notify``: its commands (jobspool.cli.alerts) load only when one is asked for.

    So that ``status``, ``queue`` and ``log`` import nothing more for it.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["test"]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        from jobspool.cli import alerts

        return alerts.test


cli.add_command(_LazyNotify("notify", help="Try the notification routes of the notify: section."))


def _add_queue_commands() -> None:
    from jobspool.cli.queue import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_add_queue_commands()


def _add_http_commands() -> None:
    # Only click inside; Starlette, uvicorn and bcrypt load when a command runs.
    from jobspool.cli.http import serve, user

    cli.add_command(serve)
    cli.add_command(user)


_add_http_commands()


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: run a command, turn every failure into one line and a code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="jobspool", standalone_mode=False)
    except JobspoolError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        fail(str(exc), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError:
        fail("no command given (see 'jobspool --help')", 2)
    except click.ClickException as exc:
        fail(f"{exc.format_message()} (see 'jobspool --help')", exc.exit_code)
    except click.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        # The reader (head, less) went away: nothing left to say to it.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        if debug:
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
              EX_SOFTWARE)  # fmt: skip
    sys.exit(0)
