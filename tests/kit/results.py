"""Reading a schedule's results the way a sysadmin would: the XML files of its runs.

Each result file in ``state/schedules/ID/runs/`` is checked against
``result.xsd`` before a test looks at it (:func:`read_run`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lxml import etree

from jobspool import schedules

NS = "{urn:jobspool:run:1}"
RESULT_NAME = re.compile(r"[0-9]+\.xml")


@dataclass
class Run:
    """One recorded run: the attributes of ``<run>``, its message, output and traceback."""

    path: Path
    attrs: dict[str, str]
    message: str | None
    output: dict[str, str]
    truncated: dict[str, int]
    traceback: str | None

    @property
    def trigger(self) -> str:
        return self.attrs["trigger"]

    @property
    def outcome(self) -> str:
        return self.attrs["outcome"]

    @property
    def name(self) -> str:
        return self.attrs["name"]

    def time(self, key: str) -> float:
        """``due``, ``start`` or ``end`` as a POSIX time."""
        return datetime.fromisoformat(self.attrs[key]).timestamp()

    def __repr__(self) -> str:  # what an assertion shows
        shown = " ".join(f"{k}={v}" for k, v in self.attrs.items() if k != "schedule")
        return f"<run {shown} message={self.message!r} output={self.output!r}>"


def read_run(path: Path) -> Run:
    """A result file, after checking it against ``result.xsd``."""
    data = path.read_bytes()
    problems = schedules.validate(data)
    assert problems == [], f"{path} is not a valid result: {problems}\n{data.decode()}"
    root = etree.fromstring(data)
    output: dict[str, str] = {}
    truncated: dict[str, int] = {}
    for out in root.iter(NS + "output"):
        stream = out.get("stream") or ""
        output[stream] = out.text or ""
        if out.get("truncated"):
            truncated[stream] = int(out.get("truncated") or 0)
    return Run(
        path=path,
        attrs={str(k): str(v) for k, v in root.attrib.items()},
        message=root.findtext(NS + "message"),
        output=output,
        truncated=truncated,
        traceback=root.findtext(NS + "traceback"),
    )


def runs_in(spool: Path, sid: str) -> list[Run]:
    """Every result of schedule ``sid``, oldest first."""
    folder = spool / "state" / "schedules" / sid / "runs"
    try:
        found = [n for n in os.listdir(folder) if RESULT_NAME.fullmatch(n)]
    except FileNotFoundError:
        return []
    return [read_run(folder / n) for n in sorted(found, key=lambda n: int(n[:-4]))]
