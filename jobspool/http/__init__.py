"""The HTTPS job-management front: ``jobspool serve`` (docs/http.rst).

``app`` is the Starlette application (the five methods, authentication, the
one mapping from the core's exceptions to HTTP answers, the access log);
``auth`` the htpasswd file and the password check; ``server`` runs it under
uvicorn with TLS, limits and the systemd notify protocol. They need the
optional extra ``jobspool[http]``; nothing else in jobspool imports them.
"""

from __future__ import annotations

import importlib.util

from jobspool.errors import ConfigError

EXTRA = ("starlette", "uvicorn", "bcrypt", "jinja2")
DEFAULT_COST = 10  # bcrypt's: about 0.1 s on one core of a 2026 server; htpasswd -B uses 5


def require_extra(modules: tuple[str, ...] = EXTRA, what: str = "jobspool serve") -> None:
    """One clear line (exit 78) when the ``http`` extra is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"'{what}' needs the http extra: pip install 'jobspool[http]' "
            f"(missing: {', '.join(missing)})"
        )
