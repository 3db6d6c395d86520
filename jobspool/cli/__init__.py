"""The ``jobspool`` command: parse arguments, call the core, print.

Every error the core raises carries its exit code (``jobspool.errors``);
:func:`main` turns it into one line on stderr, in one place. The core is
imported inside each command so that a read command loads only what it
needs: ``status``, ``queue`` and ``log`` never import lxml or structlog.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from jobspool import __version__
from jobspool.cli.common import (
    State,
    fail,
    iface_arg,
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
@click.argument("jobs", metavar="JOB...", nargs=-1, required=True)
@json_opt
@pass_state
def status(state: State, jobs: tuple[str, ...], as_json: bool) -> None:
    """Where a job is: incoming/IFACE, queue/IFACE, bak/IFACE or joberrors.

    With several jobs, each line is 'JOB STATUS'. Exits 2 if any is unknown.
    """
    from jobspool.errors import BadRequest
    from jobspool.spool import Spool

    spool = Spool.of(state.config)
    spool.require()
    answers: list[tuple[str, str | None]] = []
    for name in jobs:
        try:
            found = spool.find(name)
        except BadRequest as exc:
            if len(jobs) == 1:
                raise
            warn(str(exc))
            answers.append((name, None))
        else:
            answers.append((name, str(found.place)))
    if as_json:
        print_json([{"job": j, "status": s} for j, s in answers])
    elif len(jobs) == 1:
        click.echo(answers[0][1])
    else:
        click.echo("".join(f"{j} {s}\n" for j, s in answers if s), nl=False)
    if any(s is None for _, s in answers):
        sys.exit(BadRequest.exit_code)


@cli.command()
@iface_arg
@json_opt
@pass_state
def queue(state: State, interface: str, as_json: bool) -> None:
    """The jobs queued on IFACE, one per line, in processing order."""
    import os

    from jobspool.spool import Spool

    state.config.interface(interface)
    workers = min(len(os.sched_getaffinity(0)), 4)  # a stat per job: share them among CPUs
    listing = Spool.of(state.config).listing(interface, workers=workers)
    if as_json:
        sys.stdout.write(_queue_json(listing.stamps, listing.names))
    elif listing.names:
        sys.stdout.write("\n".join(listing.names) + "\n")


@cli.command()
@click.argument("job")
@json_opt
@pass_state
def log(state: State, job: str, as_json: bool) -> None:
    """Print the XML log of JOB (exit 75 while it has none yet)."""
    from jobspool.spool import Spool

    data = Spool.of(state.config).read_log(job)
    if as_json:
        print_json({"job": job, "log": data.decode("utf-8", "replace")})
    else:
        sys.stdout.buffer.write(data)


@cli.command()
@json_opt
@pass_state
def interfaces(state: State, as_json: bool) -> None:
    """Each interface: direction, queued jobs, age of the oldest, paused, errors.

    An interface whose queue does not move says why in the last column: which
    job blocks its head, since when, and the handler's reason.
    """
    from jobspool.spool import Spool

    cfg = state.config
    overview = Spool.of(cfg).overview()
    rows = [
        {"interface": o.interface, "direction": cfg.interfaces[o.interface].direction,
         "queued": o.queued, "oldest_seconds": o.oldest_seconds, "paused": o.paused,
         "errors": o.errors, "blocked": o.blocked}
        for o in overview
    ]  # fmt: skip
    served = _served_by(cfg) if cfg.cluster is not None else None
    if served is not None:  # cluster mode: which node serves each interface, since when
        for r in rows:
            r["node"], r["since"] = served.get(str(r["interface"]), (None, None))
    if as_json:
        print_json(rows)
        return
    if served is not None:
        heads = ("INTERFACE", "NODE", "SINCE", "QUEUED", "OLDEST", "PAUSED", "WHY NOT MOVING")
        table: list[tuple[str, ...]] = [heads]
        table += [
            (o.interface, *(v or "-" for v in served.get(o.interface, (None, None))),
             str(o.queued), "-" if o.oldest_seconds is None else _age(o.oldest_seconds),
             "yes" if o.paused else "no", "paused" if o.paused and o.queued else (o.blocked or ""))
            for o in overview
        ]  # fmt: skip
        print_table(table)
        return
    table = [("INTERFACE", "DIR", "QUEUED", "OLDEST", "PAUSED", "ERRORS", "WHY NOT MOVING")]
    table += [
        (o.interface, cfg.interfaces[o.interface].direction, str(o.queued),
         "-" if o.oldest_seconds is None else _age(o.oldest_seconds),
         "yes" if o.paused else "no", str(o.errors),
         "paused" if o.paused and o.queued else (o.blocked or ""))
        for o in overview
    ]  # fmt: skip
    print_table(table)


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
@click.argument("job")
@pass_state
def retry(state: State, job: str) -> None:
    """Take JOB out of joberrors, check it again, queue it on its interface."""
    from jobspool.intake import retry as retry_job

    click.echo(retry_job(state.config, job))


@cli.command()
@iface_arg
@pass_state
def pause(state: State, interface: str) -> None:
    """Stop processing IFACE (it still accepts jobs); survives restarts."""
    from jobspool.spool import Spool

    state.config.interface(interface)
    Spool.of(state.config).pause(interface)
    click.echo(f"{interface} paused")


@cli.command()
@iface_arg
@pass_state
def resume(state: State, interface: str) -> None:
    """Process IFACE again after 'jobspool pause'."""
    from jobspool.spool import Spool

    state.config.interface(interface)
    Spool.of(state.config).resume(interface)
    click.echo(f"{interface} resumed")


@cli.command()
@iface_arg
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to copy the jobs into.")  # fmt: skip
@click.argument("jobs", metavar="[JOB]...", nargs=-1)
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
        for name, at in zip(names, _isos(stamps), strict=True)
    )
    return f"[\n{rows}\n]\n"


def _isos(stamps: Iterable[int]) -> Iterator[str]:
    """Stamps (ns) as local times with milliseconds and UTC offset, as the job logs show them.

    Each distinct second is converted once: jobs accepted in a burst share
    their seconds, and the conversion is most of a row's cost.
    """
    from datetime import datetime

    seconds: dict[int, tuple[str, str]] = {}
    for ns in stamps:
        second, rest = divmod(ns, 1_000_000_000)
        parts = seconds.get(second)
        if parts is None:
            text = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            parts = seconds[second] = (text[:19], text[19:])  # the time, the offset
        yield f"{parts[0]}.{rest // 1_000_000:03d}{parts[1]}"


def _age(seconds: float) -> str:
    """A short age for a table: 45s, 12m, 5h, 3d (the unit changes at twice its size)."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _add_schedule_group() -> None:
    # Its module is small; click needs the group object to list it in --help.
    from jobspool.cli.schedule import schedule

    cli.add_command(schedule)


_add_schedule_group()


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
