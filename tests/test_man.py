"""The man pages: built from docs/man/*.rst, clean for groff, and in step with the command.

The pages are built exactly as the Debian package builds them
(``packaging/build_man.py``, docutils' manpage writer) and read with
``man --warnings -l``: a groff warning fails. jobspool(1) must name every
command ``jobspool --help`` lists (and those of the ``schedule`` and ``user``
groups) with each of its options, and every exit code of
``jobspool/errors.py``, so the page cannot drift from the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from jobspool import errors
from jobspool.cli import EX_SOFTWARE, cli
from tests.kit import assert_ok, run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "build_man.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def render(page: Path) -> str:
    """What ``man --warnings -l`` shows; any groff warning fails the test."""
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "200", "MANPAGER": "cat", "PAGER": "cat"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"groff warnings for {page.name}:\n{proc.stderr}"
    # a hyphenated word is joined again, and any run of blanks is one space
    return re.sub(r"\s+", " ", re.sub(r"[\u2010-]\n\s*", "", proc.stdout))


def test_the_warning_check_sees_broken_markup(tmp_path):
    broken = tmp_path / "broken.1"
    broken.write_text('.TH "broken" "1"\n.SH NAME\nbroken \\- x\n.XX undefined macro\n\\f(ZZx\n')
    with pytest.raises(AssertionError, match="groff warnings"):
        render(broken)


@pytest.mark.parametrize("name", ["jobspool.1", "jobspool.yaml.5"])
def test_each_page_renders_without_groff_warnings_and_has_its_title(pages, name):
    page = pages / name
    text = render(page)
    title, section = name.rsplit(".", 1)
    assert text.startswith(f" {title}({section})") or text.startswith(f"{title}({section})")
    version = assert_ok(run("--version")).split()[-1]
    assert f"jobspool {version}" in text  # the footer carries the package's version
    # mandb's whatis entry: the NAME line is found
    whatis = subprocess.run(["lexgrog", str(page)], capture_output=True, text=True, check=False)
    assert whatis.returncode == 0, whatis.stdout + whatis.stderr
    assert f"{title} - " in whatis.stdout


def _help_commands(*group: str) -> list[str]:
    """The commands a ``jobspool [GROUP] --help`` lists, as a user reads them."""
    out = assert_ok(run(*group, "--help"))
    listed = out.split("\nCommands:\n", 1)[1]
    return [line.split()[0] for line in listed.splitlines() if line.startswith("  ")]


def _command(path: list[str]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        found = command.commands.get(name)
        assert found is not None, name
        command = found
    return command


def test_jobspool_1_names_every_command_and_option_of_the_cli(pages):
    text = render(pages / "jobspool.1")
    top = _help_commands()
    assert {"status", "daemon", "schedule", "user", "serve"} <= set(top)  # the parse works
    paths = [[c] for c in top if c not in ("schedule", "user")]
    paths += [["schedule", c] for c in _help_commands("schedule")]
    paths += [["user", c] for c in _help_commands("user")]
    missing = []
    for path in paths:
        name = "jobspool " + " ".join(path)
        if name + " " not in text:
            missing.append(name)
        for param in _command(path).params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help" and opt not in text:
                    missing.append(f"{name} {opt}")
    assert not missing, f"not in jobspool(1): {missing}"
    for opt in ("--config", "--debug", "--version", "--help"):
        assert opt in text


def test_jobspool_1_lists_every_exit_code(pages):
    text = render(pages / "jobspool.1")
    section = " " + text.split(" EXIT STATUS ", 1)[1].split(" ENVIRONMENT ", 1)[0]
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    codes = {c.exit_code for c in classes if issubclass(c, errors.JobspoolError)}
    codes |= {0, 2, EX_SOFTWARE, 130}  # success, click's usage errors, a bug, Ctrl-C
    for code in sorted(codes):
        assert re.search(rf" {code} [A-Z]", section), f"exit status {code} not described"


def test_jobspool_yaml_5_lists_every_key_of_the_configuration(pages):
    from jobspool import config

    text = render(pages / "jobspool.yaml.5")
    keys = {"spool", "interfaces", "daemon", "schedules", "http"}
    keys |= set(config._INTERFACE_KEYS) | set(config._DAEMON_KEYS) | set(config._SCHEDULE_KEYS)
    missing = sorted(k for k in keys if not re.search(rf"\b{re.escape(k)}\b", text))
    assert not missing, f"not in jobspool.yaml(5): {missing}"
    for unit in ("5min", "1h 30min", "1h30m", "2d", "500ms"):
        assert unit in text
