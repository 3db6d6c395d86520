"""The operator console at ``/console/``: the spool in a browser, for users granted ``console``.

Pages are rendered on the server (Jinja2 templates shipped in the package,
no build step, no external assets) and read without JavaScript. A small
static script (``static/console.js``) polls each page's JSON twin
(``?format=json``) and, when its digest changed, swaps the page's main part
for a fresh copy: pages update themselves while open.

Every action is a POST form with a CSRF token (:mod:`jobspool.http.csrf`),
calls the core function the command line uses (``intake.retry``,
``Spool.pause``/``resume``, ``schedules.Store.change``,
``schedules.run_by_hand``), and is recorded with the user in the audit log
(``state/audit.log``, :mod:`jobspool.audit`), refusals included. The answer
is a redirect back to the page with a message, or the refusal itself as a
page with the status the API would answer.

Responses carry a Content-Security-Policy that allows scripts, styles and
requests only from the console itself (``script-src 'self'``: no inline
script), and forbid framing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from jobspool import audit
from jobspool.errors import BadRequest, JobspoolError
from jobspool.http import csrf, views
from jobspool.http.app import HttpError, Site, off_loop, read_body, status_of, who

ROLE = "console"
POLL_SECONDS = 5
FORM_LIMIT = 65536  # bytes of a form's body
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
_NEXT = re.compile(r"/console/[A-Za-z0-9._~/?=&%+-]*")


class Console:
    """The console's routes, its templates and the process's CSRF key."""

    def __init__(self) -> None:
        self.tokens = csrf.Tokens()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("jobspool.http", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.static = {
            name: (resources.files("jobspool.http") / "static" / name).read_bytes()
            for name in STATIC
        }

    def routes(self) -> list[BaseRoute]:
        page = self.page
        return [
            Route("/console", to_console, methods=["GET"]),
            Route("/console/", page("interfaces", "Interfaces", _overview)),
            Route("/console/queue/{interface}", page("queue", "Queue", _queue)),
            Route("/console/errors", page("errors", "Errors", _errors)),
            Route("/console/job/{name}", page("job", "Job", _job)),
            Route("/console/schedules", page("schedules", "Schedules", _schedules)),
            Route("/console/schedule/{sid}", page("schedule", "Schedule", _schedule)),
            Route("/console/schedule/{sid}/run/{run}", page("run", "Run", _run)),
            Route("/console/audit", page("audit", "Audit", _audit)),
            Route("/console/static/{file}", self.serve_static, methods=["GET"]),
            Route("/console/do/{action}", self.act, methods=["POST"]),
        ]

    # --- reading ------------------------------------------------------------------------

    def page(self, template: str, title: str, gather: Gather) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            site, user = allowed(request)
            data = await off_loop(functools.partial(gather, site, user, request))
            digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
            if request.query_params.get("format") == "json":
                body = {"digest": digest.hexdigest()[:16], "data": data}
                return JSONResponse(body, headers=SECURITY_HEADERS)
            return self.render(request, user, template, title, data, digest.hexdigest()[:16])

        return endpoint

    def render(
        self,
        request: Request,
        user: str,
        template: str,
        title: str,
        data: Mapping[str, Any],
        digest: str = "",
        status: int = 200,
    ) -> Response:
        jar = csrf.cookies(request.headers)
        secure = request.url.scheme == "https"
        cookie = jar.get(csrf.COOKIE) or ""
        fresh = not re.fullmatch(r"[0-9a-f]{32}", cookie)
        if fresh:
            cookie = self.tokens.new_cookie()
        flash = self.tokens.read_flash(user, jar.get(csrf.FLASH))
        html = self.templates.get_template(f"{template}.html").render(
            **data,
            d=data,
            title=title,
            nav=template,
            user=user,
            csrf=self.tokens.form_token(user, cookie),
            here=_here(request),
            flash=flash,
            digest=digest,
            poll=POLL_SECONDS if digest else 0,
            now=views.when(time.time()),
        )
        response = Response(
            html, status_code=status, media_type="text/html", headers=SECURITY_HEADERS
        )
        if fresh:
            response.headers.append("set-cookie", csrf.cookie_header(csrf.COOKIE, cookie, secure))
        if csrf.FLASH in jar:
            response.headers.append("set-cookie", csrf.cookie_header(csrf.FLASH, "", secure, 0))
        return response

    async def serve_static(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in STATIC:
            raise HttpError(404, f"no such file {name!r}")
        return Response(self.static[name], media_type=STATIC[name], headers=SECURITY_HEADERS)

    # --- acting -----------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        site, user = allowed(request)
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise HttpError(403, "a form from another site is refused")
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise BadRequest("a console action is a form (application/x-www-form-urlencoded)")
        body = await read_body(request, FORM_LIMIT, site.http.timeout, "a console form")
        form = {
            k: v[0]
            for k, v in urllib.parse.parse_qs(
                body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20
            ).items()
        }
        cookie = csrf.cookies(request.headers).get(csrf.COOKIE)
        if not self.tokens.valid(user, cookie, form.get(csrf.FIELD)):
            raise HttpError(
                403, "the form's CSRF token is missing or stale: reload the page and try again"
            )
        action = request.path_params["action"]
        target_page = form.get("next", "")
        if not _NEXT.fullmatch(target_page) or "//" in target_page:
            target_page = "/console/"
        do = ACTIONS.get(action)
        if do is None:
            raise HttpError(404, f"no such action {action!r}")
        try:
            target, message, detail = await off_loop(functools.partial(do, site, user, form))
        except JobspoolError as exc:
            what = form.get("job") or form.get("interface") or form.get("schedule") or ""
            text = site_text(site, str(exc))
            await off_loop(
                functools.partial(
                    audit.record, site.spool.root, user, action, what,
                    {"outcome": "refused", "status": status_of(exc), "error": text},
                )
            )  # fmt: skip
            data = {"message": text, "back": target_page, "action": action, "target": what}
            return self.render(request, user, "refused", "Refused", data, status=status_of(exc))
        await off_loop(
            functools.partial(audit.record, site.spool.root, user, action, target, detail)
        )
        response = RedirectResponse(target_page, status_code=303, headers=SECURITY_HEADERS)
        secure = request.url.scheme == "https"
        value = self.tokens.flash(user, message, detail.get("outcome") in ("ok", None))
        response.headers.append("set-cookie", csrf.cookie_header(csrf.FLASH, value, secure, 60))
        return response


# --- what each page shows (run in a worker thread) ---------------------------------------

Gather = Callable[[Site, str, Request], dict[str, Any]]


def _overview(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.overview(site, user)


def _queue(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.queue(site, user, request.path_params["interface"])


def _errors(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.errors(site, user)


def _job(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.job(site, user, request.path_params["name"])


def _schedules(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.schedules(site)


def _schedule(site: Site, user: str, request: Request) -> dict[str, Any]:
    q = request.query_params
    return views.schedule(
        site, request.path_params["sid"], q.get("outcome", ""), q.get("from", ""), q.get("to", "")
    )


def _run(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.run(site, request.path_params["sid"], request.path_params["run"])


def _audit(site: Site, user: str, request: Request) -> dict[str, Any]:
    return views.audit_entries(site)


async def to_console(request: Request) -> Response:
    return RedirectResponse("/console/", status_code=308)


def allowed(request: Request) -> tuple[Site, str]:
    """The Site and user of a console request; 403 for a user without the console role."""
    site, user = who(request)
    if not site.http.has_role(user, ROLE):
        raise HttpError(403, f"the console is not granted to {user} (http.grants: add {ROLE})")
    return site, user


def site_text(site: Site, text: str) -> str:
    """A message with spool paths shown relative to the spool, as everywhere."""
    return text.replace(f"{site.spool.root}/", "")


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


# --- the actions: each calls the core and says what it did ----------------------------------

Done = tuple[str, str, dict[str, Any]]  # target, message for the user, audit detail


def _field(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise BadRequest(f"missing field {name}")
    return value


def do_retry(site: Site, user: str, form: Mapping[str, str]) -> Done:
    from jobspool.intake import retry

    name = _field(form, "job")
    site.job(user, name)  # only a job of a granted interface
    now = retry(site.cfg, name, by=f"{user} (console)")
    return name, f"{name} retried: it is in {now}", {"outcome": "ok", "now": now}


def do_pause(site: Site, user: str, form: Mapping[str, str]) -> Done:
    iface = site.interface(user, _field(form, "interface"))
    site.spool.pause(iface.name)
    return iface.name, f"{iface.name} paused", {"outcome": "ok"}


def do_resume(site: Site, user: str, form: Mapping[str, str]) -> Done:
    iface = site.interface(user, _field(form, "interface"))
    site.spool.require(iface.name)
    site.spool.resume(iface.name)
    return iface.name, f"{iface.name} resumed", {"outcome": "ok"}


def _store(site: Site) -> Any:
    from jobspool.schedules import Store

    return Store(site.cfg)


def do_run(site: Site, user: str, form: Mapping[str, str]) -> Done:
    from jobspool.schedules import run_by_hand

    sid = _field(form, "schedule")
    result = run_by_hand(_store(site), sid)
    said = f"{sid}: {result.outcome}" + (f": {result.message}" if result.message else "")
    detail = {
        "outcome": result.outcome,
        "message": result.message,
        "exit_status": result.run.exit_status,
    }
    return sid, said, detail


def do_enable(site: Site, user: str, form: Mapping[str, str]) -> Done:
    sid = _field(form, "schedule")
    _store(site).change(sid, {"enabled": True})
    return sid, f"{sid} enabled", {"outcome": "ok"}


def do_disable(site: Site, user: str, form: Mapping[str, str]) -> Done:
    sid = _field(form, "schedule")
    _store(site).change(sid, {"enabled": False})
    return sid, f"{sid} disabled", {"outcome": "ok"}


def do_rename(site: Site, user: str, form: Mapping[str, str]) -> Done:
    sid, name = _field(form, "schedule"), _field(form, "name")
    _store(site).change(sid, {"name": name})
    return sid, f"{sid} renamed {name!r}", {"outcome": "ok", "name": name}


def do_set(site: Site, user: str, form: Mapping[str, str]) -> Done:
    from jobspool.schedules import changes_from_pairs

    sid = _field(form, "schedule")
    pairs = list(views.lines(_field(form, "changes")))
    store = _store(site)
    changes = changes_from_pairs(store, sid, pairs)
    store.change(sid, changes)
    return sid, f"{sid}: set {', '.join(pairs)}", {"outcome": "ok", "changes": pairs}


ACTIONS: dict[str, Callable[[Site, str, Mapping[str, str]], Done]] = {
    "retry": do_retry,
    "pause": do_pause,
    "resume": do_resume,
    "schedule.run": do_run,
    "schedule.enable": do_enable,
    "schedule.disable": do_disable,
    "schedule.rename": do_rename,
    "schedule.set": do_set,
}
