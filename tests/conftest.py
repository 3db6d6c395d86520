"""What every test shares: a real spool under ``tmp_path``, the real ``jobspool`` command.

The ``spool`` fixture writes a ``jobspool.yaml`` with three interfaces and runs
``jobspool init`` on it; ``configured`` stops before ``init``. Commands run as
subprocesses of the installed console script, exactly as a sysadmin types them.
Every XML job log a test meets is checked against the package's own schema with
:func:`assert_valid_log`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from jobspool import joblog, names
from tests.kit import JOBSPOOL, ORDER_XSD

COMMAND = [str(JOBSPOOL)] if JOBSPOOL.exists() else [sys.executable, "-m", "jobspool"]

# --- sample schemas and documents ----------------------------------------------


STOCK_RNG = """\
<?xml version="1.0" encoding="UTF-8"?>
<element name="stock" xmlns="http://relaxng.org/ns/structure/1.0"
         datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes">
  <oneOrMore>
    <element name="item">
      <attribute name="sku"/>
      <data type="nonNegativeInteger"/>
    </element>
  </oneOrMore>
</element>
"""

# A valid order.
VALID = b"""\
<?xml version="1.0" encoding="UTF-8"?>
<order id="1">
  <sku>HAM-1</sku>
  <qty>3</qty>
</order>
"""

# Well-formed, but line 4 breaks the schema (qty must be positive).
INVALID = b"""\
<?xml version="1.0" encoding="UTF-8"?>
<order id="2">
  <sku>HAM-1</sku>
  <qty>-4</qty>
</order>
"""

# Not well-formed: the end tag on line 5 (column 10) does not match.
BROKEN = b"""\
<?xml version="1.0" encoding="UTF-8"?>
<order id="3">
  <sku>HAM-1</sku>
  <qty>3</qty>
</orders>
"""

STOCK_VALID = b'<stock>\n  <item sku="HAM-1">5</item>\n</stock>\n'
STOCK_INVALID = b'<stock>\n  <item sku="HAM-1">many</item>\n</stock>\n'

CONFIG = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [/bin/true]
    timeout: 30s
    max_size: 1KB
  orders_out:
    schema: schemas/order.xsd
  stock_in:
    schema: schemas/stock.rng
    command: [/bin/true]
"""
INTERFACES = ("orders_in", "orders_out", "stock_in")

# The directories SPEC section 1 promises for the configuration above.
SPEC_DIRS = (
    *(f"{state}/{iface}" for state in ("incoming", "queue", "bak") for iface in INTERFACES),
    "joberrors",
    "tmp",
    "state",
)


# --- running the command -------------------------------------------------------


def run(
    *args: str,
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``jobspool`` command; ``env`` adds to (not replaces) the environment."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [*COMMAND, *args],
        input=data,
        stdin=subprocess.DEVNULL if data is None else None,
        capture_output=True,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
        timeout=60,  # a guard against a hang, not a performance assertion
        check=False,
        **kwargs,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_fails(result: subprocess.CompletedProcess[str], code: int) -> str:
    """``result`` exited ``code`` with one line on stderr starting ``jobspool: ``; return it."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobspool: "), result.stderr
    return lines[0]


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    """``result`` exited 0 and said nothing on stderr; return its stdout."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def read_table(text: str) -> list[dict[str, str]]:
    """A table as the commands print it (columns two spaces apart), one dict per row.

    The table ends at the first empty line (``interfaces`` says below it who serves the spool).
    """
    header, *rows = text.split("\n\n")[0].splitlines()
    titles = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in titles[1:]] + [None]
    return [
        {title: row[start:end].strip() for (title, start), end in zip(titles, ends, strict=True)}
        for row in rows
    ]


# --- job logs ------------------------------------------------------------------


def assert_valid_log(log: Path | bytes) -> bytes:
    """The log (a file or its bytes) is valid against ``joblog.xsd``; return its bytes."""
    data = log.read_bytes() if isinstance(log, Path) else log
    assert joblog.validate(data) == []
    return data


def events(log: Path | bytes) -> list[etree._Element]:
    """The events of a valid log, oldest first."""
    root = etree.fromstring(assert_valid_log(log))
    return list(root)


def kinds(log: Path | bytes) -> list[str]:
    """The kinds of a log's events (received, checked, moved, ...), oldest first."""
    return [etree.QName(e).localname for e in events(log)]


# --- the spool -----------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every directory and file under ``root``, with each file's content and mtime.

    Lock files count by name and content only: the mtime of ``names.lock`` is
    the acceptance stamps' high-water mark, which a refused request may advance.
    """
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel] = "dir"
        elif path.suffix == ".lock":
            out[rel] = (path.read_bytes(), "lock")
        else:
            out[rel] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


@dataclass
class Site:
    """A configuration under ``dir`` and the spool it names (``dir/spool``)."""

    dir: Path
    config: Path
    root: Path

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``jobspool -c CONFIG ARGS...``"""
        return run("-c", str(self.config), *args, **kwargs)

    def file(self, name: str, data: bytes = VALID) -> Path:
        """A partner's file outside the spool, ready to submit."""
        outside = self.dir / "outside"
        outside.mkdir(exist_ok=True)
        path = outside / name
        path.write_bytes(data)
        return path

    def submit(
        self, name: str, data: bytes = VALID, iface: str = "orders_in"
    ) -> subprocess.CompletedProcess[str]:
        return self.run("submit", iface, str(self.file(name, data)))

    def queue(self, iface: str = "orders_in") -> list[str]:
        """``jobspool queue IFACE``, as a list of names."""
        return assert_ok(self.run("queue", iface)).splitlines()

    def status(self, name: str) -> str:
        """``jobspool status NAME``, without its newline."""
        return assert_ok(self.run("status", name)).rstrip("\n")

    def tree(self) -> dict[str, object]:
        return snapshot(self.root)


def assert_every_log_valid(directory: Path) -> None:
    """Every ``NAME,log.xml`` under ``directory`` is valid against ``joblog.xsd``."""
    for log in directory.rglob("*" + names.LOG_SUFFIX):
        assert joblog.validate(log.read_bytes()) == [], log


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The configuration cache goes to a temporary directory, never ~/.cache,
    # and the caller's $JOBSPOOL_CONFIG never leaks into a test.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("JOBSPOOL_CONFIG", raising=False)
    yield
    # Whatever a test looked at, every job log it produced is valid.
    assert_every_log_valid(tmp_path)


def make_site(directory: Path) -> Site:
    """Write ``jobspool.yaml`` and its schemas into ``directory``; no spool yet."""
    schemas = directory / "schemas"
    schemas.mkdir()
    (schemas / "order.xsd").write_text(ORDER_XSD)
    (schemas / "stock.rng").write_text(STOCK_RNG)
    config = directory / "jobspool.yaml"
    config.write_text(CONFIG)
    return Site(directory, config, directory / "spool")


@pytest.fixture
def configured(tmp_path: Path) -> Site:
    """``jobspool.yaml`` and its schemas in ``tmp_path``; no spool yet."""
    return make_site(tmp_path)


@pytest.fixture
def spool(configured: Site) -> Site:
    """The configuration above with its spool created by ``jobspool init``."""
    assert_ok(configured.run("init"))
    return configured
