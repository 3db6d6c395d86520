"""``jobspool schedule ...``: see and manage scheduled handlers (docs/spec.rst, "Schedules")."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from jobspool.cli import complete
from jobspool.cli.common import State, audited, json_opt, pass_state, print_json, print_table

if TYPE_CHECKING:
    from jobspool.config import Schedule
    from jobspool.schedules import Store


def _store(state: State) -> Store:
    from jobspool.schedules import Store

    return Store(state.config)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")


def _last(store: Store, sid: str) -> dict[str, str] | None:
    from jobspool.schedules import read_result

    results = store.results(sid)
    return read_result(results[0]) if results else None


def _describe(s: Schedule) -> dict[str, Any]:
    target = " ".join(s.target) if s.action == "command" else s.target
    return {
        "id": s.id, "name": s.name, "owner": s.owner, "enabled": s.enabled,
        "timing": f"{s.timing}: {s.when}", "timezone": s.timezone, "timeout": s.timeout,
        "catchup": s.catchup, "runs": f"{s.action}: {target}", "with": dict(s.settings),
    }  # fmt: skip


@click.group()
def schedule() -> None:
    """Scheduled handlers: list, show, run, enable, disable, rename, chown, set, history,
    result, add, remove."""


@schedule.command("list")
@json_opt
@pass_state
def list_(state: State, as_json: bool) -> None:
    """Every schedule: id, name, owner, enabled, timing, next run, last outcome."""
    import time

    from jobspool.timing import next_run

    store, now = _store(state), time.time()
    rows = []
    for sid, s in store.all().items():
        last = _last(store, sid)
        rows.append({**_describe(s), "next": _when(next_run(s, now) if s.enabled else None),
                     "last": last.get("outcome") if last else None})  # fmt: skip
    if as_json:
        print_json(rows)
        return
    table = [("ID", "NAME", "OWNER", "ENABLED", "TIMING", "NEXT", "LAST")]
    table += [(r["id"], r["name"], r["owner"] or "-", "yes" if r["enabled"] else "no",
               r["timing"], r["next"], r["last"] or "-") for r in rows]  # fmt: skip
    print_table(table)


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@json_opt
@pass_state
def show(state: State, sid: str, as_json: bool) -> None:
    """Every property, the next five run times, and the last run's result."""
    import time

    from jobspool.timing import preview

    store = _store(state)
    s = store.get(sid)
    upcoming = [_when(t) for t in preview(s, time.time())] if s.enabled else []
    info = {**_describe(s), "next": upcoming, "last_run": _last(store, sid)}
    if as_json:
        print_json(info)
        return
    _print_info(info)


def _print_info(info: dict[str, Any]) -> None:
    """A schedule as ``show`` prints it: one ``key: value`` line each, lists indented."""
    for key, value in info.items():
        if key == "next":
            if not value:
                click.echo("next: - (disabled)" if info.get("enabled") is False else "next: -")
                continue
            click.echo("next:")
            for t in value:
                click.echo(f"  {t}")
        elif key == "last_run":
            click.echo(
                "last run: " + (" ".join(f"{k}={v}" for k, v in value.items()) if value else "-")
            )
        elif key == "with":
            click.echo("with: " + (", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"))
        else:
            click.echo(f"{key}: {'-' if value is None else value}")


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@pass_state
def run(state: State, sid: str) -> None:
    """Run ID now (never alongside a run the daemon is making). Exits 1 if the run failed."""
    from jobspool.errors import BadRequest, TryLater
    from jobspool.schedules import execute

    store = _store(state)
    s = store.get(sid)
    if not s.enabled:
        raise BadRequest(f"schedule {sid} is disabled; 'jobspool schedule enable {sid}' first")
    result = execute(store, s, "manual")
    audited(state, "schedule run", sid, outcome=result.outcome)
    if result.outcome == "skipped":
        raise TryLater(f"schedule {sid} is running now; try again when it is done")
    click.echo(f"{sid}: {result.outcome}" + (f": {result.message}" if result.message else ""))
    if result.outcome != "ok":
        sys.exit(1)


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@pass_state
def enable(state: State, sid: str) -> None:
    """Enable ID (persistent; a running daemon follows within a second)."""
    _store(state).change(sid, {"enabled": True})
    audited(state, "schedule enable", sid)
    click.echo(f"{sid} enabled")


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@pass_state
def disable(state: State, sid: str) -> None:
    """Disable ID: it runs neither on time nor by hand."""
    _store(state).change(sid, {"enabled": False})
    audited(state, "schedule disable", sid)
    click.echo(f"{sid} disabled")


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@click.argument("name")
@pass_state
def rename(state: State, sid: str, name: str) -> None:
    """Change ID's display name (the id stays)."""
    _store(state).change(sid, {"name": name})
    audited(state, "schedule rename", sid, name=name)
    click.echo(f"{sid} renamed {name!r}")


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@click.argument("user", shell_complete=complete.accounts)
@pass_state
def chown(state: State, sid: str, user: str) -> None:
    """Change ID's owner (an existing user; a root daemon runs its command as that user)."""
    import pwd

    from jobspool.errors import BadRequest

    try:
        pwd.getpwnam(user)
    except KeyError:
        raise BadRequest(f"no such user {user!r}") from None
    _store(state).change(sid, {"owner": user})
    audited(state, "schedule chown", sid, owner=user)
    click.echo(f"{sid} owned by {user}")


@schedule.command("set")
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@click.argument("pairs", metavar="KEY=VALUE...", nargs=-1, required=True)
@pass_state
def set_(state: State, sid: str, pairs: tuple[str, ...]) -> None:
    """Change properties, as YAML values: cron="0 4 * * *", timeout=10m, with.older_than=7d."""
    from jobspool.schedules import changes_from_pairs

    store = _store(state)
    changes = changes_from_pairs(store, sid, pairs)
    s = store.change(sid, changes)
    audited(state, "schedule set", sid, changes=" ".join(pairs))
    _print_info(_describe(s))


@schedule.command()
@click.argument("sid", metavar="ID", shell_complete=complete.schedules)
@json_opt
@pass_state
def history(state: State, sid: str, as_json: bool) -> None:
    """Every recorded run of ID, newest first."""
    from jobspool.schedules import read_result

    store = _store(state)
    store.get(sid)
    runs = [read_result(p) for p in store.results(sid)]
    # By start, newest first: a long run's result is placed after shorter later ones.
    runs.sort(key=lambda r: _started(r.get("start")), reverse=True)
    if as_json:
        print_json(runs)
        return
    table = [("START", "TRIGGER", "OUTCOME", "EXIT", "MESSAGE")]
    table += [(r["start"], r["trigger"], r["outcome"], r.get("exit-status", "-"),
               r.get("message", "").splitlines()[0] if r.get("message") else "")
              for r in runs]  # fmt: skip
    print_table(table)


def _text(value: object) -> str:
    """A setting's value as a user wrote it, not as Python shows it."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return "-" if value is None else str(value)


def _started(text: str | None) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text or "").timestamp()
    except ValueError:
        return 0.0


@schedule.command()
@click.argument("sid", metavar="ID")
@click.argument("run_id", metavar="[RUN]", required=False)
@json_opt
@pass_state
def result(state: State, sid: str, run_id: str | None, as_json: bool) -> None:
    """One run's details: trigger, times, outcome, exit status, captured output.

    RUN is 1 for the newest run (the default), 2 for the one before, ...,
    or a result's file name in state/schedules/ID/runs/ (with or without .xml).
    """
    from jobspool.errors import BadRequest
    from jobspool.schedules import read_run

    store = _store(state)
    store.get(sid)
    paths = store.results(sid)
    runs = sorted((read_run(p) for p in paths), key=lambda r: _started(r.get("start")),
                  reverse=True)  # fmt: skip
    wanted = run_id or "1"
    if wanted.isdigit() and 1 <= int(wanted) <= min(len(runs), 10_000):
        found = runs[int(wanted) - 1]
    else:
        hits = [r for r in runs if r["file"] in (wanted, f"{wanted}.xml")]
        if not hits:
            raise BadRequest(f"schedule {sid} has no run {wanted!r} ({len(runs)} recorded; "
                             f"see 'jobspool schedule history {sid}')")  # fmt: skip
        found = hits[0]
    if as_json:
        print_json(found)
        return
    streams = ("stdout", "stderr", "traceback")
    for key, value in found.items():
        if key not in streams and key != "message":
            click.echo(f"{key}: {value}")
    if "message" in found:
        click.echo(f"message: {found['message']}")
    for stream in streams:
        if found.get(stream):
            click.echo(f"--- {stream} ---")
            click.echo(found[stream], nl=not found[stream].endswith("\n"))


@schedule.command()
@click.argument("sid", metavar="ID")
@click.option("--template", help="A built-in template (jobspool schedule templates).")
@click.option("--command", "command", help="A command line (split as a shell would; no shell).")
@click.option("--handler", help="A Python callable as module:function.")
@click.option("--every", help="An interval as h:m:s.")
@click.option("--cron", help="A cron expression.")
@click.option("--at", "at", help="A date and time, once.")
@click.option(
    "--with",
    "settings",
    metavar="KEY=VALUE",
    multiple=True,
    help="A setting of the template or handler (a YAML value); repeatable.",
)
@click.option("--set", "extra", metavar="KEY=VALUE", multiple=True,
              help="Any other key of a schedule (name, owner, timezone, timeout, catchup, "
              "enabled), as in the configuration; repeatable.")  # fmt: skip
@pass_state
def add(
    state: State,
    sid: str,
    template: str | None,
    command: str | None,
    handler: str | None,
    every: str | None,
    cron: str | None,
    at: str | None,
    settings: tuple[str, ...],
    extra: tuple[str, ...],
) -> None:
    """Define schedule ID without editing the file; a running daemon takes it within a second.

    Checked as strictly as the configuration file (exit 2 and nothing
    stored). An id the file defines is refused: the file wins.
    """
    from jobspool.schedules import pairs_as_values

    raw: dict[str, object] = {}
    for key, value in (("template", template), ("command", command), ("handler", handler),
                       ("every", every), ("cron", cron), ("at", at)):  # fmt: skip
        if value is not None:
            raw[key] = value
    if command is not None:
        raw["command"] = _absolute(command)
    raw.update(pairs_as_values(extra))
    if settings:
        raw["with"] = pairs_as_values(settings)
    s = _store(state).add(sid, raw)
    audited(state, "schedule add", sid, definition=raw)
    _print_info(_describe(s))


@schedule.command()
@click.argument("sid", metavar="ID")
@pass_state
def remove(state: State, sid: str) -> None:
    """Remove a schedule added with 'schedule add' (its recorded runs stay)."""
    _store(state).remove(sid)
    audited(state, "schedule remove", sid)
    click.echo(f"{sid} removed")


def _absolute(command: str) -> list[str]:
    """A command given on the command line: a relative program is relative to here."""
    import os
    import shlex

    from jobspool.errors import BadRequest

    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise BadRequest(f"--command: {exc}") from None
    if argv and "/" in argv[0]:
        argv[0] = os.path.abspath(argv[0])
    return argv


@schedule.command()
@json_opt
def templates(as_json: bool) -> None:
    """The built-in templates and their settings."""
    from jobspool.templates import TEMPLATES

    if as_json:
        print_json([{"template": t.name, "summary": t.summary,
                      "settings": [s._asdict() for s in t.settings]}
                     for t in TEMPLATES.values()])  # fmt: skip
        return
    for t in TEMPLATES.values():
        click.echo(f"{t.name}: {t.summary}")
        for s in t.settings:
            default = "required" if s.default is None else f"default {s.default}"
            click.echo(f"  with.{s.name}: {s.meaning} ({default})")
