#!/usr/bin/env python3
"""Build the man pages from ``docs/man/*.rst`` with docutils' manpage writer (rst2man).

    python3 packaging/build_man.py OUTDIR

writes ``OUTDIR/jobspool.1`` and ``OUTDIR/jobspool.yaml.5``. The sources say
``@VERSION@`` and ``@DATE@`` where the page's footer shows them: the version
is read from ``jobspool/__init__.py`` (not imported: the build environment
need not have jobspool's dependencies), the date from ``$SOURCE_DATE_EPOCH``
when it is set (Debian builds set it from the changelog: reproducible
pages), else today. Any docutils warning fails the build, so a page never
ships with markup that rendered wrongly.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from docutils.core import publish_string

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "docs" / "man"


def version() -> str:
    """``__version__`` of the package in this tree."""
    text = (ROOT / "jobspool" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise SystemExit("build_man: no __version__ in jobspool/__init__.py")
    return match.group(1)


def build(source: Path, out_dir: Path) -> Path:
    """Render one ``NAME.SECTION.rst`` into ``out_dir/NAME.SECTION``."""
    stamp = float(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    text = source.read_text(encoding="utf-8")
    text = text.replace("@VERSION@", version())
    text = text.replace("@DATE@", time.strftime("%Y-%m-%d", time.gmtime(stamp)))
    page = publish_string(
        text,
        source_path=str(source),
        writer_name="manpage",
        settings_overrides={"halt_level": 2, "report_level": 2, "output_encoding": "utf-8"},
    )
    target = out_dir / source.name.removesuffix(".rst")
    target.write_bytes(page if isinstance(page, bytes) else page.encode("utf-8"))
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: build_man.py OUTDIR", file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted(SOURCES.glob("*.rst")):
        print(build(source, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
