"""``jobspool notify test``: try the notification routes (docs/alerts.rst).

Loaded by the ``notify`` group of :mod:`jobspool.cli` only when it runs.
"""

from __future__ import annotations

import sys

import click

from jobspool.cli.common import State, pass_state, print_json


@click.command("test")
@click.option("--route", "only", metavar="ROUTE", multiple=True,
              help="Only this route (repeatable) [default: every route].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_state
def test(state: State, only: tuple[str, ...], as_json: bool) -> None:
    """Send a test notification through every route, now, and say how each went.

    Exits 0 when every route took it, 75 when one did not (the line says why),
    78 when no route is configured.
    """
    from jobspool.alerts import test_notice
    from jobspool.errors import BadRequest, ConfigError, TryLater
    from jobspool.senders import NotSent, deliver

    routes = state.config.notify.routes
    if not routes:
        raise ConfigError(f"{state.config.path}: notify.routes: no route to test")
    unknown = [r for r in only if r not in routes]
    if unknown:
        raise BadRequest(f"unknown route {unknown[0]!r} (known: {', '.join(sorted(routes))})")
    notice = test_notice(str(state.config.spool))
    results = []
    for name, route in routes.items():
        if only and name not in only:
            continue
        try:
            deliver(route, notice)
        except (NotSent, OSError) as exc:
            results.append({"route": name, "sent": False, "error": str(exc)})
        else:
            results.append({"route": name, "sent": True, "error": None})
    if as_json:
        print_json(results)
    else:
        for r in results:
            outcome = "sent" if r["sent"] else f"NOT SENT: {r['error']}"
            click.echo(f"{r['route']}: {outcome}")
    if not all(r["sent"] for r in results):
        sys.exit(TryLater.exit_code)
