"""The Python artifacts as a release builds them: the wheel works installed, the sdist is whole.

The wheel is built from the sdist (``python -m build``'s default), so the sdist
is proved to build; both come from a copy of the checkout, which stays clean.
The wheel is then installed into a fresh virtualenv and used from a directory
outside the checkout, as a sysadmin would: nothing can come from the source tree.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.kit import DEADLINE

ROOT = Path(__file__).resolve().parent.parent
# What the sdist carries besides the package: what a distribution packager needs.
SDIST_TREES = ("docs", "etc", "systemd", "packaging", "spool-example")
# What git ignores (made by builds, tests and the demo): never copied, never shipped.
GENERATED = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "spool")
NOT_COPIED = shutil.ignore_patterns(*GENERATED)


def _generated(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in rel.parts for pattern in GENERATED)


def _run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,  # a guard against a hang (a build downloads setuptools)
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JOBSPOOL_CONFIG")},
    )
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) built by ``python -m build`` from a copy of the checkout."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    _run(sys.executable, "-m", "build", "--outdir", work / "dist", source, cwd=work)
    (wheel,) = (work / "dist").glob("jobspool-*.whl")
    (sdist,) = (work / "dist").glob("jobspool-*.tar.gz")
    return wheel, sdist


def test_the_wheel_carries_the_schemas_the_licence_and_spdx_metadata(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        (metadata,) = [f for f in files if f.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
    assert {"jobspool/schemas/joblog.xsd", "jobspool/schemas/result.xsd"} <= files
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)
    assert "License-Expression: MIT\n" in meta
    assert "License-File: LICENSE\n" in meta
    assert "\nLicense: " not in meta  # the deprecated free-text form is gone


@pytest.fixture(scope="module")
def venv(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed (its dependencies from the index)."""
    wheel, _ = built
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=work)
    _run(venv / "bin" / "pip", "install", "-q", f"{wheel}[http]", cwd=work)
    return venv


def test_a_job_log_validates_with_the_installed_schemas(venv, tmp_path):
    # The bundled example, run by the installed console script, far from the checkout.
    site = tmp_path / "site"
    shutil.copytree(ROOT / "spool-example", site, ignore=NOT_COPIED)
    jobspool = venv / "bin" / "jobspool"
    config = site / "jobspool.yaml"
    _run(jobspool, "-c", config, "init", cwd=tmp_path)
    shutil.copy(site / "jobs" / "order-1001.xml", site / "spool" / "incoming" / "orders_in")
    _run(jobspool, "-c", config, "daemon", "--once", cwd=tmp_path, timeout=DEADLINE * 3)
    assert (
        _run(jobspool, "-c", config, "status", "order-1001.xml", cwd=tmp_path) == "bak/orders_in\n"
    )
    log = site / "spool" / "bak" / "orders_in" / "order-1001.xml,log.xml"
    # jobspool.joblog.validate of the installed package, with the schema beside it.
    check = (
        "import sys, jobspool.joblog as j; "
        "print(j.SCHEMA); problems = j.validate(open(sys.argv[1], 'rb').read()); "
        "print(problems); sys.exit(1 if problems else 0)"
    )
    out = _run(venv / "bin" / "python", "-I", "-c", check, log, cwd=tmp_path)
    schema = Path(out.splitlines()[0])
    assert schema.is_file()
    assert schema.is_relative_to(venv), f"{schema} is not the installed one"
    assert out.splitlines()[1] == "[]"


def test_the_sdist_carries_units_snippets_example_docs_and_licence(built):
    _, sdist = built
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()}
    wanted = {"LICENSE", "README.rst", "pyproject.toml", "setup.cfg", "MANIFEST.in"}
    for tree in SDIST_TREES:
        for path in (ROOT / tree).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and not _generated(rel):
                wanted.add(str(rel))
    missing = wanted - members
    assert not missing, f"not in the sdist: {sorted(missing)}"
    for name in (
        "systemd/jobspool.service",
        "systemd/jobspool-http.service",
        "systemd/jobspool.sysusers",
        "systemd/jobspool.tmpfiles",
        "etc/jobspool.yaml",
        "docs/deployment.rst",
        "docs/man/jobspool.1.rst",
        "docs/man/jobspool.yaml.5.rst",
        "jobspool/schemas/joblog.xsd",
    ):
        assert name in members
    assert not [m for m in members if "__pycache__" in m or m.startswith("spool-example/spool/")]


@pytest.mark.parametrize("unit", ["jobspool.service", "jobspool-http.service"])
def test_the_venv_drop_in_makes_the_shipped_unit_verify(venv, tmp_path, unit):
    # The unit as shipped names /usr/bin/jobspool, which only the Debian package
    # provides; docs/deployment.rst's drop-in points it at the venv instead.
    units = tmp_path / "units"
    (units / f"{unit}.d").mkdir(parents=True)
    shutil.copy(ROOT / "systemd" / unit, units / unit)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}  # then the default path
    verify = ["systemd-analyze", "verify", "--man=no", unit]  # man pages: the package's
    before = subprocess.run(verify, env=env, capture_output=True, text=True, check=False)
    assert "/usr/bin/jobspool is not executable" in before.stderr  # what the drop-in fixes
    dropin = (ROOT / "systemd" / "dropins" / f"{unit}.d" / "venv.conf").read_text()
    assert dropin.count("/opt/venvs/jobspool/bin/jobspool") == 2
    (units / f"{unit}.d" / "venv.conf").write_text(
        dropin.replace("/opt/venvs/jobspool/bin/jobspool", str(venv / "bin" / "jobspool"))
    )
    after = subprocess.run(verify, env=env, capture_output=True, text=True, check=False)
    assert after.returncode == 0, after.stderr
    assert [line for line in after.stderr.splitlines() if "jobspool" in line] == []
