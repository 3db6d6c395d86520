"""``jobspool serve`` and ``jobspool user ...``: the HTTPS front and its users (docs/http.rst).

Only click is imported here (the read commands load this module to list it
in ``--help``); Starlette, uvicorn and bcrypt come with the ``http`` extra
and are imported when a command needs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from jobspool.cli import complete
from jobspool.cli.common import State, audited, pass_state, print_json
from jobspool.errors import BadRequest, ConfigError
from jobspool.http import DEFAULT_COST  # not from .auth: --help must not load bcrypt


@click.command()
@click.option(
    "--insecure-behind-proxy",
    "behind_proxy",
    is_flag=True,
    help="Serve plain HTTP to the reverse proxy that terminates TLS (http.trusted_proxies); "
    "only for a configuration without cert: and key:.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Only check what serve checks at start (configuration, certificate and key, "
    "stylesheets, users file), print nothing and exit 0, or 78 with the problem.",
)
@pass_state
def serve(state: State, behind_proxy: bool, check: bool) -> None:
    """Run the HTTPS job-management front in the foreground (under systemd: Type=notify).

    Every request needs HTTP Basic authentication (users: 'jobspool user');
    each user reaches only the interfaces http.grants gives it. SIGHUP
    reloads the configuration and the certificate; SIGTERM stops gracefully.
    """
    from jobspool.http import require_extra

    require_extra()
    from jobspool.http import server

    if check:
        from jobspool.http.app import Site

        cfg, _ = server.prepare(state.config_path, behind_proxy)
        Site(cfg).auth.refresh()  # stylesheets compile, the users file reads
        return
    sys.exit(server.serve(state.config_path, behind_proxy))


# --- users ----------------------------------------------------------------------------


@click.group()
def user() -> None:
    """Users of the HTTP front, in the htpasswd file http.users: add, passwd, remove, list."""


def _users_file(state: State) -> Path:
    http = state.config.http
    if http is None:
        raise ConfigError(f"{state.config.path}: no http: section; add one (see docs/http.rst)")
    return http.users


def _read_password(from_stdin: bool) -> str:
    """From the first line of stdin, or asked twice on the terminal; never from argv."""
    if from_stdin:
        line = sys.stdin.buffer.readline()
        try:
            return line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise BadRequest("the password on stdin is not UTF-8") from None
    if not sys.stdin.isatty():
        raise BadRequest("no terminal to ask for the password on: use --password-stdin")
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


def _set_password(state: State, name: str, from_stdin: bool, cost: int, new: bool) -> Path:
    from jobspool.http import require_extra

    require_extra(("bcrypt",), "jobspool user")
    from jobspool.http import auth

    auth.check_user_name(name)
    path = _users_file(state)
    exists = name in auth.read_file(path)
    if new and exists:
        raise BadRequest(f"user {name} exists; change its password with "
                         f"'jobspool user passwd {name}'")  # fmt: skip
    if not new and not exists:
        raise BadRequest(f"no user {name} in {path}; add it with 'jobspool user add {name}'")
    hashed = auth.hash_password(_read_password(from_stdin), cost)  # slow: before the lock
    with auth.editing(path) as users:
        if new and name in users:
            raise BadRequest(f"user {name} was added meanwhile")
        if not new and name not in users:
            raise BadRequest(f"user {name} was removed meanwhile")
        users[name] = hashed
    return path


password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
cost_opt = click.option(
    "--cost",
    type=int,
    default=DEFAULT_COST,
    show_default=True,
    help="bcrypt cost: 2^COST rounds (htpasswd -B uses 5).",
)


@user.command()
@click.argument("name")
@password_stdin
@cost_opt
@pass_state
def add(state: State, name: str, password_stdin: bool, cost: int) -> None:
    """Add user NAME with a password (asked twice, or --password-stdin)."""
    path = _set_password(state, name, password_stdin, cost, new=True)
    audited(state, "user add", name)
    click.echo(f"user {name} added to {path}")
    http = state.config.http
    if http is not None and not http.granted(name):
        click.echo(f"jobspool: note: no interface is granted to {name} yet "
                   f"(http.grants in {state.config.path})", err=True)  # fmt: skip


@user.command()
@click.argument("name", shell_complete=complete.users)
@password_stdin
@cost_opt
@pass_state
def passwd(state: State, name: str, password_stdin: bool, cost: int) -> None:
    """Change the password of user NAME (a running server uses it at once)."""
    path = _set_password(state, name, password_stdin, cost, new=False)
    audited(state, "user passwd", name)
    click.echo(f"password of {name} changed in {path}")


@user.command()
@click.argument("name", shell_complete=complete.users)
@pass_state
def remove(state: State, name: str) -> None:
    """Remove user NAME (a running server refuses it at once)."""
    from jobspool.http import auth

    path = _users_file(state)
    with auth.editing(path) as users:
        if name not in users:
            raise BadRequest(f"no user {name} in {path}")
        del users[name]
    audited(state, "user remove", name)
    click.echo(f"user {name} removed from {path}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_state
def list_(state: State, as_json: bool) -> None:
    """Every user, with the interfaces granted to it."""
    from jobspool.http import auth

    path = _users_file(state)
    http = state.config.http
    assert http is not None
    users = auth.read_file(path)
    if as_json:
        print_json([{"user": name, "bcrypt": auth.is_bcrypt(hashed),
                     "interfaces": list(http.granted(name))}
                    for name, hashed in users.items()])  # fmt: skip
        return
    for name, hashed in users.items():
        granted = ", ".join(http.granted(name)) or "-"
        note = "" if auth.is_bcrypt(hashed) else "  (not a bcrypt hash: cannot log in)"
        click.echo(f"{name}  {granted}{note}")
