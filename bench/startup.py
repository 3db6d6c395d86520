"""Start-up time of the read commands, measured against ``python -c 'import click'``.

Why this yardstick: ``jobspool status JOB`` is what a sysadmin types and what
monitoring scripts run in loops, and the read commands must not import what
they do not need (``docs/spec.rst``, "Commands and exit codes"). The least
any click program can cost is the interpreter's start plus ``import
click``; the figure that matters is how far above that floor ``status``,
``queue`` and ``log`` are (target: a ratio of medians of at most 1.5,
stretch 1.2).

How, and why so:

* jobspool is measured **installed the way a user has it**: a copy of the
  working tree is installed by ``pip install --no-deps --target`` (so pip
  builds the wheel and byte-compiles it) into the site-packages of a
  throwaway venv. The development venv would mislead twice: its editable
  install adds a ``.pth`` import finder that imports pathlib, re and
  urllib.parse at every interpreter start (``python -c pass`` takes 30 ms
  there, 15 ms in a plain venv), on *both* sides of the comparison, and
  pre-loads modules jobspool needs, which hides its own cost; and a shell with
  ``PYTHONDONTWRITEBYTECODE=1`` leaves the editable jobspool without
  ``.pyc`` files. The throwaway venv sees the running environment's packages
  (click, PyYAML, lxml) through a plain path line in a ``.pth`` file, which
  runs none of that environment's ``.pth`` code.
* Baseline and jobspool run with the same interpreter, environment and
  working directory, so the only difference is what they import.
* Runs are interleaved: each round runs every command once, in an order
  rotated from round to round, so machine noise and drift hit all alike.
* The configuration cache is warmed before the warm figures; the cold
  figure (no cache: PyYAML is imported and the cache written, as on the
  first run after a configuration change) is measured with a cache
  directory of its own, emptied before each cold run.
* A separate run of each command records ``sys.modules`` at exit: a read
  command that imports lxml, structlog, watchdog, croniter or yaml is a
  regression, printed and turned into exit status 1.

Everything happens in a temporary directory; nothing is written into the
checkout.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]

RUNS = 40
QUICK_RUNS = 10
TARGET = 1.5
STRETCH = 1.2

# What the read path must never import, since a read command loads nothing it
# does not need (docs/spec.rst, "Commands and exit codes"): the XML stack,
# logging, the daemon's watcher, the scheduler and the YAML parser (the
# configuration cache exists so that it is not needed).
FORBIDDEN = ("lxml", "structlog", "watchdog", "croniter", "yaml")

# Packages the throwaway venv borrows from the running environment: click for
# the read path, PyYAML for the cold path, lxml for ``submit`` while the spool
# is set up.
DEPENDENCIES = ("click", "yaml", "lxml")

IFACE = "orders_in"
QUEUED_JOB = "order-1.xml"
REJECTED_JOB = "order-2.xml"

CONFIG = f"""\
spool: spool
interfaces:
  {IFACE}:
    schema: order.xsd
    command: [/bin/true]
"""

XSD = """\
<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="order">
    <xs:complexType>
      <xs:sequence><xs:element name="qty" type="xs:positiveInteger"/></xs:sequence>
      <xs:attribute name="id" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

GOOD_JOB = '<order id="1"><qty>3</qty></order>\n'
BAD_JOB = '<order id="2"><qty>-3</qty></order>\n'

# Runs jobspool as its console script does, and writes sys.modules (name,
# origin, cached bytecode path) to a file at exit. Imports nothing itself
# before jobspool but atexit, so what it records is what jobspool loaded.
MODULES_WRAPPER = """\
import atexit, sys

def _dump():
    mods = {}
    for name, mod in list(sys.modules.items()):
        spec = getattr(mod, "__spec__", None)
        mods[name] = [getattr(spec, "origin", None), getattr(spec, "cached", None)]
    import json, os
    with open(os.environ["JOBSPOOL_BENCH_MODULES"], "w") as f:
        json.dump(mods, f)

atexit.register(_dump)
sys.argv[0] = "jobspool"
from jobspool.cli import main
main()
"""


class Install(NamedTuple):
    """The throwaway installation: its interpreter, console script and site-packages."""

    source: str  # which code was measured: the commit, and whether the tree differs from it
    python: Path
    script: Path
    site: Path
    compiled: int  # .py files of jobspool whose .pyc pip wrote
    total: int  # .py files of jobspool
    recompiled: int  # .pyc files this benchmark had to write itself


class Series(NamedTuple):
    """One measured command."""

    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    expect: Callable[[bytes], bool]
    before: Callable[[], None] | None = None  # untimed, before every run
    info: bool = False  # shown, but not held to the target
    allowed: tuple[str, ...] = ()  # of FORBIDDEN, what this command may import


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Measure, print the table, return the results (``ok`` is False on an import regression)."""
    n = runs or (QUICK_RUNS if quick else RUNS)
    with tempfile.TemporaryDirectory(prefix="jobspool-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print("jobspool start-up benchmark: installing a throwaway copy ...", flush=True)
        inst = install(tmp)
        series, cwd = prepare(tmp, inst)
        for s in series:  # warm the caches, and prove each command does its job
            for _ in range(2):
                _run_checked(s, cwd)
        samples = measure(series, cwd, n)
        imports = {s.key: modules_of(s, cwd, inst) for s in series[1:]}
        return report(inst, series, samples, imports, n)


# --- the installation ------------------------------------------------------------


def install(tmp: Path) -> Install:
    """Install a copy of the working tree into a fresh venv, as ``pip install .`` would."""
    src = tmp / "src"
    src.mkdir()
    # What the distribution is built from: the top-level files (pyproject.toml,
    # setup.cfg, README.rst, ...) and the package. Copied, so that the build
    # writes its build/ and egg-info into the temporary directory.
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, src / entry.name)
    shutil.copytree(
        ROOT / "jobspool", src / "jobspool", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )

    venv = tmp / "venv"
    _call([sys.executable, "-m", "venv", "--without-pip", str(venv)], "create a venv")
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_call([str(python), "-c", purelib], "find the venv's site-packages").strip())

    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _call([*pip, "--no-deps", "--target", str(site), str(src)], "pip install jobspool")

    # The dependencies, from where the running interpreter finds them: path
    # lines only, so none of that environment's .pth code runs at start-up.
    dirs = dict.fromkeys(str(_location(name)) for name in DEPENDENCIES)
    (site / "_jobspool_bench_deps.pth").write_text("".join(d + "\n" for d in dirs))

    sources = sorted((site / "jobspool").rglob("*.py"))
    missing = [p for p in sources if not Path(importlib.util.cache_from_source(str(p))).exists()]
    for path in missing:  # pip byte-compiles; make sure, the way pip does
        compileall.compile_file(str(path), quiet=1, force=True)
    return Install(
        source=_source(),
        python=python,
        script=site / "bin" / "jobspool",
        site=site,
        compiled=len(sources) - len(missing),
        total=len(sources),
        recompiled=len(missing),
    )


def _source() -> str:
    """The commit of the checkout, and whether the package differs from it (figures drift)."""
    try:
        head = _call(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], "ask git").strip()
        dirty = _call(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--",
                "jobspool",
                "pyproject.toml",
                "setup.cfg",
            ],
            "ask git",
        ).strip()
    except (OSError, SystemExit):
        return "the working tree (no git to say which commit)"
    return f"the working tree at {head}" + (", with uncommitted changes" if dirty else "")


def _location(module: str) -> Path:
    """The sys.path entry a top-level package is imported from."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"bench: {module} is not installed; run from the project's venv")
    return Path(spec.origin).parents[1 if spec.submodule_search_locations else 0]


# --- the spool and the commands ----------------------------------------------------


def prepare(tmp: Path, inst: Install) -> tuple[list[Series], Path]:
    """Create a spool with one queued and one rejected job; return the commands to time."""
    work = tmp / "work"
    work.mkdir()
    (work / "jobspool.yaml").write_text(CONFIG)
    (work / "order.xsd").write_text(XSD)
    (work / QUEUED_JOB).write_text(GOOD_JOB)
    (work / REJECTED_JOB).write_text(BAD_JOB)
    (tmp / "home").mkdir()
    warm_cache, cold_cache = tmp / "cache-warm", tmp / "cache-cold"

    def env_with(cache: Path) -> dict[str, str]:
        # The user's environment without Python or jobspool settings. Bytecode
        # is never written (it exists: see install), so nothing lands outside
        # the temporary directory.
        drop = ("PYTHON", "JOBSPOOL_", "VIRTUAL_ENV")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            PYTHONDONTWRITEBYTECODE="1",
            HOME=str(tmp / "home"),
            XDG_CACHE_HOME=str(cache),
            JOBSPOOL_CONFIG=str(work / "jobspool.yaml"),
        )
        return env

    warm, cold = env_with(warm_cache), env_with(cold_cache)
    jobspool = [str(inst.python), str(inst.script)]
    for args, code in (
        (["init"], 0),
        (["submit", IFACE, QUEUED_JOB], 0),
        (["submit", IFACE, REJECTED_JOB], 65),
    ):
        proc = subprocess.run([*jobspool, *args], env=warm, cwd=work, capture_output=True)
        if proc.returncode != code:
            why = proc.stderr.decode(errors="replace").strip()
            raise SystemExit(f"bench: jobspool {' '.join(args)} exited {proc.returncode}: {why}")

    def clear_cold_cache() -> None:
        shutil.rmtree(cold_cache / "jobspool", ignore_errors=True)

    def is_log(out: bytes) -> bool:
        return out.startswith(b"<?xml") and f'job="{REJECTED_JOB}"'.encode() in out

    def prints(text: str) -> Callable[[bytes], bool]:
        return lambda out: out == text.encode()

    status = [*jobspool, "status", QUEUED_JOB]
    series = [
        Series(
            "click",
            "python -c 'import click'",
            [str(inst.python), "-c", "import click"],
            warm,
            prints(""),
        ),
        Series("status", "jobspool status JOB", status, warm, prints(f"queue/{IFACE}\n")),
        Series(
            "queue",
            "jobspool queue IFACE",
            [*jobspool, "queue", IFACE],
            warm,
            prints(f"{QUEUED_JOB}\n"),
        ),
        Series("log", "jobspool log JOB", [*jobspool, "log", REJECTED_JOB], warm, is_log),
        Series(
            "status_cold",
            "jobspool status JOB, no cache",
            status,
            cold,
            prints(f"queue/{IFACE}\n"),
            before=clear_cold_cache,
            info=True,
            allowed=("yaml",),  # the slow path the cache exists for
        ),
    ]
    return series, work


def _run_checked(s: Series, cwd: Path) -> None:
    if s.before:
        s.before()
    proc = subprocess.run(s.argv, env=s.env, cwd=cwd, capture_output=True)
    if proc.returncode != 0 or not s.expect(proc.stdout):
        raise SystemExit(
            f"bench: {s.label} misbehaved (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).decode(errors='replace').strip()[:300]}"
        )


# --- measuring ---------------------------------------------------------------------


def measure(series: Sequence[Series], cwd: Path, n: int) -> dict[str, list[float]]:
    """``n`` wall times (ms) per command, interleaved in rounds with a rotating order."""
    samples: dict[str, list[float]] = {s.key: [] for s in series}
    for r in range(n):
        k = r % len(series)
        for s in [*series[k:], *series[:k]]:
            if s.before:
                s.before()
            t0 = time.perf_counter_ns()
            proc = subprocess.run(
                s.argv, env=s.env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            elapsed = time.perf_counter_ns() - t0
            if proc.returncode != 0:
                raise SystemExit(f"bench: {s.label} exited {proc.returncode} while measured")
            samples[s.key].append(elapsed / 1e6)
    return samples


class Imports(NamedTuple):
    """What one command had imported when it exited."""

    jobspool: list[str]  # jobspool's own modules
    third_party: list[str]  # top-level packages outside the standard library
    forbidden: list[str]  # top-level packages of FORBIDDEN
    not_from_install: list[str]  # jobspool modules that did not come from the throwaway venv
    without_pyc: list[str]  # source modules without bytecode: compiled at every start
    modules: int  # everything in sys.modules


def modules_of(s: Series, cwd: Path, inst: Install) -> Imports:
    """Run a command once more, recording ``sys.modules`` at exit."""
    out = cwd / f".modules-{s.key}.json"
    if s.before:
        s.before()
    env = dict(s.env, JOBSPOOL_BENCH_MODULES=str(out))
    argv = [str(inst.python), "-c", MODULES_WRAPPER, *s.argv[2:]]
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, check=True)
    mods: dict[str, list[str | None]] = json.loads(out.read_text())
    out.unlink()

    tops = sorted({name.partition(".")[0] for name in mods})
    ours = sorted(name for name in mods if name.partition(".")[0] == "jobspool")
    return Imports(
        jobspool=ours,
        third_party=[
            t
            for t in tops
            if t not in sys.stdlib_module_names
            and t not in ("jobspool", "__main__")
            and not t.startswith("_")
        ],
        forbidden=[t for t in tops if t in FORBIDDEN],
        not_from_install=[n for n in ours if not str(mods[n][0]).startswith(str(inst.site))],
        without_pyc=sorted(
            name
            for name, (origin, cached) in mods.items()
            if origin and origin.endswith(".py") and not (cached and os.path.exists(cached))
        ),
        modules=len(mods),
    )


# --- reporting ---------------------------------------------------------------------


class Row(NamedTuple):
    """One line of the table."""

    label: str
    median_ms: float
    p90_ms: float
    ratio: float  # median over the baseline's median
    extra_ms: float  # median minus the baseline's median
    samples_ms: list[float]


def summarise(label: str, values: list[float], base: float) -> Row:
    median = statistics.median(values)
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1]
    return Row(
        label,
        round(median, 2),
        round(p90, 2),
        round(median / base, 3),
        round(median - base, 2),
        [round(x, 3) for x in values],
    )


def report(
    inst: Install,
    series: Sequence[Series],
    samples: dict[str, list[float]],
    imports: dict[str, Imports],
    n: int,
) -> dict[str, Any]:
    """Print the table and the import check; return everything as plain data."""
    base = statistics.median(samples["click"])
    rows = {s.key: summarise(s.label, samples[s.key], base) for s in series}
    worst = max(rows[s.key].ratio for s in series[1:] if not s.info)
    load = os.getloadavg()[0]

    where = f"python {platform.python_version()} ({inst.python})"
    print(f"{where}, {os.cpu_count()} CPUs, load average {load:.2f}")
    pyc = f"bytecode: {inst.compiled} of {inst.total} .py files of jobspool have a .pyc from pip"
    if inst.recompiled:
        pyc += f", the other {inst.recompiled} were compiled here"
    print(f"jobspool from {inst.source}, installed by pip into a throwaway venv")
    print(pyc)
    print(f"{n} runs of each command, interleaved; wall time of the whole process in ms\n")
    width = max(len(r.label) for r in rows.values())
    print(f"{'command':<{width}}  {'median':>7}  {'p90':>7}  {'ratio':>6}  {'extra':>6}")
    for s in series:
        r = rows[s.key]
        note = "  (information: the first run after a config change)" if s.info else ""
        print(
            f"{r.label:<{width}}  {r.median_ms:7.1f}  {r.p90_ms:7.1f}  {r.ratio:6.2f}  "
            f"{r.extra_ms:+6.1f}{note}"
        )
    if worst <= STRETCH:
        verdict = "met, and the stretch goal too"
    else:
        verdict = "met" if worst <= TARGET else "NOT MET"
    print(f"\nworst ratio {worst:.2f}; target <= {TARGET} (stretch {STRETCH}): {verdict}")

    ok = True
    pad = " " * width
    print(f"\nimports at exit (forbidden on the read path: {', '.join(FORBIDDEN)}):")
    for s in series[1:]:
        imp = imports[s.key]
        bad = [m for m in imp.forbidden if m not in s.allowed]
        found = f"REGRESSION: {', '.join(bad)}" if bad else "none: ok"
        if s.allowed:
            found += f" ({', '.join(s.allowed)} expected here)"
        ok = ok and not bad
        ours = ", ".join(m.removeprefix("jobspool.") for m in imp.jobspool)
        print(f"  {s.label:<{width}}  forbidden: {found}")
        print(
            f"  {pad}  jobspool: {ours}; third-party: {', '.join(imp.third_party) or 'none'}; "
            f"{imp.modules} modules in all"
        )
        if imp.not_from_install:
            ok = False
            print(
                f"  {pad}  ERROR: not from the throwaway install: {', '.join(imp.not_from_install)}"
            )
        if imp.without_pyc:
            print(f"  {pad}  without .pyc (compiled at every start): {', '.join(imp.without_pyc)}")
    return {
        "source": inst.source,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load": load,
        "runs": n,
        "bytecode": {
            "from_pip": inst.compiled,
            "total": inst.total,
            "compiled_here": inst.recompiled,
        },
        "results": {key: row._asdict() for key, row in rows.items()},
        "worst_ratio": worst,
        "target": TARGET,
        "stretch": STRETCH,
        "target_met": worst <= TARGET,
        "imports": {key: imp._asdict() for key, imp in imports.items()},
        "ok": ok,
    }


def _call(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: cannot {what}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout
