"""Cross-site request forgery protection for the console's forms, and its flash messages.

The console authenticates with HTTP Basic, which a browser sends along
with any request to the site, a forged one from another site included.
So every POST must also carry a token that only the console's own pages
know: a random value in a cookie (``SameSite=Strict``, ``HttpOnly``,
``Secure`` over https) and, in a hidden field of every form, an HMAC of
that value and the user name under a key that exists only in the server's
process. Another site can neither read the cookie nor compute the HMAC,
and a browser does not send a ``SameSite=Strict`` cookie with a request
another site started. A restart makes new keys: a page from before it must
be reloaded before its forms work again.

The message an action leaves for the next page (``flash``) travels in a
cookie signed the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

COOKIE = "jobspool_csrf"
FLASH = "jobspool_flash"
FIELD = "csrf"
PATH = "/console/"


class Tokens:
    """The per-process key, and the tokens, cookies and flash messages made with it."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _mac(self, *parts: str) -> str:
        data = "\0".join(parts).encode()
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_hex(16)

    def form_token(self, user: str, cookie: str) -> str:
        """The hidden field's value for ``user`` with the cookie value ``cookie``."""
        return self._mac("csrf", user, cookie)

    def valid(self, user: str, cookie: str | None, field: str | None) -> bool:
        """Whether a POST carries the cookie and the field that belong together."""
        if not cookie or not field:
            return False
        return hmac.compare_digest(field, self.form_token(user, cookie))

    def flash(self, user: str, text: str, ok: bool) -> str:
        """A signed cookie value holding a message for the next page ``user`` sees."""
        body = base64.urlsafe_b64encode(json.dumps({"t": text, "ok": ok}).encode()).decode()
        return f"{body}.{self._mac('flash', user, body)}"

    def read_flash(self, user: str, value: str | None) -> dict[str, Any] | None:
        """The message in a flash cookie, if it is one of ours for ``user``."""
        if not value or "." not in value:
            return None
        body, mac = value.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac("flash", user, body)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body.encode()))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            return None
        return {"text": data["t"], "ok": bool(data.get("ok"))}


def cookie_header(name: str, value: str, secure: bool, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value for the console's path: HttpOnly, SameSite=Strict."""
    parts = [f"{name}={value}", f"Path={PATH}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def cookies(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's cookies (only the console's own are looked at)."""
    out: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name in (COOKIE, FLASH) and name not in out:
            out[name] = value
    return out
