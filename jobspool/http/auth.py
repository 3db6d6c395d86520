"""Users of the HTTP front: an htpasswd file of bcrypt hashes, and the password check.

The file is Apache's format, one ``user:hash`` a line, so ``htpasswd -B``
and ``jobspool user add`` both write it; hashes start with ``$2y$`` (what
``htpasswd -B`` writes; ``$2b$`` and ``$2a$`` are read too). Other hash
kinds (``$apr1$``, ``{SHA}``, crypt) are not accepted: such a user cannot log
in until ``jobspool user passwd`` gives it a bcrypt hash.

The check costs the same whether or not the user exists: an unknown user's
password is checked against a dummy hash of the file's highest cost.
bcrypt runs in a worker thread (it releases the GIL), and a password that
was verified is remembered for ``http.auth_cache`` seconds as an HMAC under
a key that lives only in this process, compared in constant time, and
forgotten as soon as the user's hash in the file changes.

bcrypt uses the first 72 bytes of a password, as ``htpasswd`` does:
``jobspool user add`` refuses longer passwords rather than cut them silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from jobspool.config import USER_NAME
from jobspool.durable import fsync_dir, os_errors
from jobspool.errors import BadRequest, ConfigError
from jobspool.http import DEFAULT_COST

MIN_COST, MAX_COST = 4, 17
MAX_PASSWORD = 72  # bytes bcrypt looks at
_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")


# --- passwords -------------------------------------------------------------------


def check_new_password(password: str) -> bytes:
    """The password as bytes, or :class:`BadRequest` if bcrypt cannot hold all of it."""
    data = password.encode("utf-8")
    if not data:
        raise BadRequest("the password is empty")
    if len(data) > MAX_PASSWORD:
        raise BadRequest(
            f"the password is {len(data)} bytes long; bcrypt uses only the first "
            f"{MAX_PASSWORD}: choose a shorter one"
        )
    if b"\0" in data or b"\n" in data or b"\r" in data:
        raise BadRequest("the password contains a NUL or line-break character")
    return data


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash as ``htpasswd -B`` writes it (``$2y$``)."""
    if not MIN_COST <= cost <= MAX_COST:
        raise BadRequest(f"--cost must be between {MIN_COST} and {MAX_COST}")
    import bcrypt

    hashed = bcrypt.hashpw(check_new_password(password), bcrypt.gensalt(cost))
    return "$2y$" + hashed.decode("ascii")[4:]


def is_bcrypt(hashed: str) -> bool:
    return hashed.encode("ascii", "replace").startswith(_PREFIXES) and len(hashed) == 60


def cost_of(hashed: str) -> int:
    try:
        return int(hashed[4:6])
    except ValueError:
        return DEFAULT_COST


def verify(password: bytes, hashed: bytes) -> bool:
    """bcrypt's own constant-time check; a malformed hash or password is simply False."""
    import bcrypt

    try:
        return bcrypt.checkpw(password[:MAX_PASSWORD], hashed)
    except ValueError:
        return False


def check_user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise BadRequest(
            f"invalid user name {name!r}: 1-100 characters of A-Z a-z 0-9 . _ @ + -, "
            "not starting with . + @ or -"
        )
    return name


# --- the file --------------------------------------------------------------------


def read_file(path: Path) -> dict[str, str]:
    """``user -> hash`` from an htpasswd file; a missing file has no users."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the users file: {exc}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ConfigError(f"{path}: line {number}: expected user:hash")
        users[user] = hashed.strip()
    return users


def write_file(path: Path, users: dict[str, str]) -> None:
    """Replace the file atomically, keeping its mode, owner and group (new: 0640)."""
    text = "".join(f"{user}:{hashed}\n" for user, hashed in users.items())
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if st is not None:
                os.fchmod(f.fileno(), st.st_mode & 0o7777)
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            else:
                os.fchmod(f.fileno(), 0o640)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with os_errors(f"cannot write the users file {path}"):
            raise exc from None


@contextlib.contextmanager
def editing(path: Path) -> Iterator[dict[str, str]]:
    """Read, let the caller change, write back: one editor at a time.

    The lock is on the directory (``flock`` on a directory works), so no
    lock file is left beside the users file.
    """
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open its directory: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        users = read_file(path)
        before = dict(users)
        yield users
        if users != before:
            write_file(path, users)
    finally:
        os.close(fd)


# --- checking passwords ------------------------------------------------------------


class _Snapshot(NamedTuple):
    key: tuple[int, ...] | None  # the file's identity when read
    users: dict[str, bytes]  # only users with a bcrypt hash
    dummy: bytes  # checked for unknown users, at the file's highest cost


class Authenticator:
    """Checks ``user:password`` against the users file, re-read whenever it changes."""

    def __init__(self, path: Path, cache_seconds: float) -> None:
        self.path = path
        self.cache_seconds = cache_seconds
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()  # the event loop and worker threads both refresh
        self._hmac_key = secrets.token_bytes(32)
        # user -> (its hash when verified, HMAC of the password, expiry on the monotonic clock)
        self._cache: dict[str, tuple[bytes, bytes, float]] = {}
        self.warnings: list[str] = []

    def refresh(self) -> _Snapshot:
        """The users as the file is now (a ``stat`` per call; re-read when it changed)."""
        try:
            st = os.stat(self.path)
            key: tuple[int, ...] | None = (
                st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
            )  # fmt: skip
        except FileNotFoundError:
            key = None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the users file: {exc.strerror}") from None
        with self._lock:
            snap = self._snapshot
            if snap is not None and snap.key == key:
                return snap
            return self._load(key)

    def _load(self, key: tuple[int, ...] | None) -> _Snapshot:
        import bcrypt

        raw = read_file(self.path) if key is not None else {}
        users, warnings = {}, []
        for user, hashed in raw.items():
            if is_bcrypt(hashed):
                users[user] = hashed.encode("ascii")
            else:
                warnings.append(f"user {user}: not a bcrypt hash; cannot log in until "
                                f"'jobspool user passwd {user}'")  # fmt: skip
        cost = max((cost_of(h.decode()) for h in users.values()), default=DEFAULT_COST)
        # A well-formed hash no password matches: checking it costs a full bcrypt run.
        dummy = bcrypt.gensalt(cost) + b"." * 31
        self._snapshot = snap = _Snapshot(key, users, dummy)
        self.warnings = warnings
        self._cache = {u: c for u, c in self._cache.items() if users.get(u) == c[0]}
        return snap

    def cached(self, user: str, password: bytes) -> bool | None:
        """True when this password was verified lately; None: bcrypt must decide."""
        snap = self.refresh()
        hashed = snap.users.get(user)
        entry = self._cache.get(user)
        if hashed is None or entry is None or entry[0] != hashed:
            return None
        if entry[2] < time.monotonic():
            del self._cache[user]
            return None
        return hmac.compare_digest(entry[1], self._mac(password)) or None

    def check(self, user: str, password: bytes) -> bool:
        """The slow path (run it in a thread): bcrypt, also for unknown users."""
        snap = self.refresh()
        hashed = snap.users.get(user)
        ok = verify(password, hashed if hashed is not None else snap.dummy)
        if ok and hashed is not None:
            if self.cache_seconds > 0:
                expiry = time.monotonic() + self.cache_seconds
                with self._lock:
                    self._cache[user] = (hashed, self._mac(password), expiry)
            return True
        return False

    def _mac(self, password: bytes) -> bytes:
        return hmac.new(self._hmac_key, password[:MAX_PASSWORD], hashlib.sha256).digest()


def parse_basic(header: str) -> tuple[str, bytes] | None:
    """``Authorization: Basic base64(user:password)`` → (user, password bytes), or None."""
    import base64
    import binascii

    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        name = user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name, password
