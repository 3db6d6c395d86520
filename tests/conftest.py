"""The fixtures every test module may ask for; everything else is in ``tests.kit``.

- ``configured``: the standard configuration (``tests.kit.CONFIG``: three
  interfaces) and its schemas in ``tmp_path``; no spool yet. ``spool``: the
  same after ``jobspool init``.
- ``site``: an empty :class:`~tests.kit.Site` in ``tmp_path``, for a test that
  writes its own configuration and handlers; whatever daemon it left running
  is killed.
- ``nobody_site``: the same outside root's private ``tmp_path``, for a daemon
  run as ``nobody``.

And for every test: the configuration cache goes to ``tmp_path``, the
caller's ``$JOBSPOOL_CONFIG`` never leaks in, and every job log the test
produced under ``tmp_path`` is valid against ``joblog.xsd``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import (
    JOBSPOOL,
    Site,
    assert_every_log_valid,
    assert_ok,
    make_site,
    reachable_by_others,
)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The configuration cache goes to a temporary directory, never ~/.cache,
    # and the caller's $JOBSPOOL_CONFIG never leaks into a test.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("JOBSPOOL_CONFIG", raising=False)
    yield
    # Whatever a test looked at, every job log it produced is valid.
    assert_every_log_valid(tmp_path)


@pytest.fixture
def configured(tmp_path: Path) -> Site:
    """The standard configuration and its schemas in ``tmp_path``; no spool yet."""
    return make_site(tmp_path)


@pytest.fixture
def spool(configured: Site) -> Site:
    """The standard configuration with its spool created by ``jobspool init``."""
    assert_ok(configured.run("init"))
    return configured


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A fresh site in ``tmp_path``; leftover daemons are killed, every log is validated."""
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.kill_all()
    if s.root.is_dir():
        s.check_logs()


@pytest.fixture
def nobody_site() -> Iterator[Site]:
    """A site outside root's private tmp_path (mode 700), for a daemon that runs as
    nobody: the only way to meet an unreadable file while we are root."""
    base = tempfile.mkdtemp(prefix="jobspool-nobody-", dir="/tmp")
    os.chmod(base, 0o755)
    s = Site(Path(base))
    try:
        with reachable_by_others(JOBSPOOL):
            yield s
    finally:
        s.kill_all()
        shutil.rmtree(base, ignore_errors=True)
