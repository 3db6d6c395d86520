"""Fuzzing the gates from partner input to the spool. Not part of the test run.

Run it by hand (or in a nightly job), never in CI::

    .venv/bin/python -m tests.fuzz --minutes 10            # hypothesis, then atheris
    .venv/bin/python -m tests.fuzz --minutes 2 --engine hypothesis --target names

It fuzzes, with properties rather than just "does not crash":

- ``check``: :func:`jobspool.check.check` on documents built from XML
  fragments (declarations in many encodings, BOMs, DOCTYPEs with internal
  subsets, external DTDs, external and parameter entities pointing at a
  secret file and at a loopback listener, XInclude, CDATA, character
  references, deep nesting), encoded in UTF-8/16/32 with and without BOM,
  Latin-1 or EBCDIC, then mutated byte by byte; and on raw bytes. It never
  raises, takes under 2 s, is deterministic and independent of what it
  checked before, reports at most 20 errors of one printable line each,
  never shows the secret, never connects to the listener, and what it
  accepts has no DTD.
- ``names``: :mod:`jobspool.names` against an independent reading of
  ``docs/spec.rst`` ("Jobs": 1-200 of ``A-Z a-z 0-9 . _ -``, not starting
  with ``.`` or ``-``); a valid name joined to a folder stays in it; the
  error for an invalid one is one printable line.
- ``safe_name``: :func:`jobspool.intake.safe_name` gives a valid, unique name for
  any file name the kernel can hand over (bytes through ``os.fsdecode``).
- ``escape_name``: :func:`jobspool.joblog.escape_name` gives printable text a
  log can hold, from which the original name can be told (a renamed job's
  log records the original name); a log carrying any name and reason validates.

Engines: hypothesis (always) and atheris (libFuzzer, coverage-guided over the
instrumented jobspool modules; ``pip install atheris``). Each atheris target runs
in a child process (libFuzzer ends its process when done); crashes land in
``--artifacts`` (default ``$TMPDIR/jobspool-fuzz-artifacts``). Whatever it finds
is kept as a regression test in ``tests/test_hostile.py``.

Bugs already found and kept as xfail tests (``KNOWN``) are not reported again
unless ``--include-known`` is given, so that a run hunts for new ones.

Exit status: 0 when nothing was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lxml import etree

from jobspool import check as checking
from jobspool import intake, joblog, names
from jobspool.errors import BadRequest
from tests.kit import HOSTILE, ORDER_XSD, Bait, Listener

WITHIN = 2.0  # seconds one check may take
ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class Context:
    """What every property needs: a secret, a listener, a schema."""

    def __init__(self, directory: Path, listener: Listener) -> None:
        self.bait = Bait.make(directory, listener.url)
        self.listener = listener
        self.schema = directory / "order.xsd"
        self.schema.write_text(ORDER_XSD)

    def no_connection(self) -> None:
        assert self.listener.connections == [], f"connections: {self.listener.connections}"


# --- the properties ---------------------------------------------------------------------------


def check_property(ctx: Context, data: bytes, before: bytes | None = None) -> None:
    """Everything :func:`jobspool.check.check` promises about one document."""
    for schema in (None, ctx.schema):
        alone = checking.check(data, schema)
        if before is not None:
            checking.check(before, schema)
        start = time.monotonic()
        result = checking.check(data, schema)
        took = time.monotonic() - start
        assert took < WITHIN, f"check took {took:.2f}s"
        shown = [str(e) for e in result.problems]
        assert shown == [str(e) for e in alone.problems], "depends on what was checked before"
        assert len(result.problems) <= 20
        for e in result.problems:
            assert isinstance(e.line, int) and e.line >= 0, e
            assert isinstance(e.column, int) and e.column >= 0, e
            assert e.message and e.message.isprintable(), repr(e.message)
            assert ctx.bait.marker not in e.message, "the secret is in an error"
        if result.ok:  # the tree a Python handler is given of it (Job.tree)
            tree = checking.parse(data)
            assert not tree.docinfo.doctype, "accepted with a DOCTYPE"
            assert tree.docinfo.internalDTD is None, "accepted with a DTD"
            entities = [e for e in tree.iter() if isinstance(e, etree._Entity)]
            assert not entities, f"accepted with entity references {entities}"
            text = etree.tostring(tree)
            assert ctx.bait.marker.encode() not in text, "the secret got into the tree"
    ctx.no_connection()


def valid_by_spec(name: str) -> bool:
    """The rule for job names in ``docs/spec.rst`` ("Jobs"), read without jobspool.names."""
    return 1 <= len(name) <= 200 and name[0] not in ".-" and all(c in ALLOWED for c in name)


def names_property(name: str) -> None:
    valid = names.is_valid(name)
    assert valid == valid_by_spec(name), (name, valid)
    assert (names.why_invalid(name) == "") == valid, name
    if valid:
        assert names.check_name(name) == name
        base = "/spool/queue/orders_in"
        joined = os.path.normpath(os.path.join(base, name))
        assert os.path.dirname(joined) == base and os.path.basename(joined) == name
        assert len(os.fsencode(name)) <= 255 and len(os.fsencode(names.log_name(name))) <= 255
        assert not names.is_valid(names.log_name(name))
    else:
        try:
            names.check_name(name)
        except BadRequest as exc:
            message = str(exc)
            assert exc.exit_code == 2
            assert message.isprintable(), repr(message)
        else:
            raise AssertionError(f"{name!r} passed check_name")


def safe_name_property(original: str, stamp: int, other: str, other_stamp: int) -> None:
    safe = intake.safe_name(original, stamp)
    assert names.is_valid(safe), (original, stamp, safe)
    assert safe == intake.safe_name(original, stamp)
    if stamp != other_stamp:
        assert safe != intake.safe_name(other, other_stamp), (original, other)


def unescape(text: str) -> str:
    """The inverse escape_name's documentation implies: \\xNN for an undecodable byte
    (or a control character below 0x80), and Python's escapes for the rest."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        kind = text[i + 1 : i + 2]
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width is None:
            out.append({"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}.get(kind, "\\" + kind))
            i += 2
            continue
        code = int(text[i + 2 : i + 2 + width], 16)
        out.append(chr(0xDC00 + code) if kind == "x" and code >= 0x80 else chr(code))
        i += 2 + width
    return "".join(out)


# Bugs fuzzing found that are kept as xfail tests: not reported again unless
# --include-known, so that a run hunts for new ones.
KNOWN: dict[str, str] = {}  # none open (escape_name-round-trip was fixed and is checked)
include_known = False


def escape_name_property(name: str) -> None:
    escaped = joblog.escape_name(name)
    assert escaped.isprintable(), repr(escaped)
    assert joblog.xml_text(escaped) == escaped
    log = joblog.new("x.xml", "orders_in")
    joblog.received(log, "drop", original_name=name, reason=f"invalid job name: {name}")
    assert joblog.validate(joblog.to_bytes(log)) == []
    assert unescape(escaped) == name, f"{name!r} -> {escaped!r}: not the original"


# --- hypothesis -------------------------------------------------------------------------------


def strategies(ctx: Context) -> dict[str, Any]:
    """The hypothesis strategies of each target."""
    from hypothesis import strategies as st

    url, secret = ctx.bait.url, ctx.bait.secret
    decl = st.sampled_from(
        ["", '<?xml version="1.0"?>', '<?xml version="1.1"?>', "<?xml?>"]
        + [
            f'<?xml version="1.0" encoding="{e}"?>'
            for e in ("UTF-8", "UTF-16", "UTF-16BE", "UTF-32", "ISO-8859-1", "IBM037", "x-bogus")
        ]
    )
    subset = st.sampled_from(
        [
            "",
            "<!DOCTYPE order>",
            f'<!DOCTYPE order SYSTEM "{url}/o.dtd">',
            f'<!DOCTYPE order PUBLIC "-//x//DTD//EN" "{url}/p.dtd">',
            f'<!DOCTYPE order SYSTEM "{secret}">',
            f'<!DOCTYPE order [<!ENTITY e SYSTEM "{secret.as_uri()}">]>',
            f'<!DOCTYPE order [<!ENTITY e SYSTEM "{url}/e">]>',
            f'<!DOCTYPE order [<!ENTITY % p SYSTEM "{url}/p"> %p;]>',
            '<!DOCTYPE order [<!ENTITY e "&f;&f;"><!ENTITY f "&g;&g;"><!ENTITY g "xx">]>',
            f'<!DOCTYPE order [<!ATTLIST order id CDATA "&e;"><!ENTITY e SYSTEM "{secret}">]>',
            "<!doctype order>",
            "<!DOCTYPE",
        ]
    )
    misc = st.lists(
        st.sampled_from(
            [
                "\n",
                " ",
                "<!-- c -->",
                "<?pi data?>",
                "<!-- <!DOCTYPE x> -->",
                "<?x <order/> ?>",
                "\ufeff",
                "\x00",
            ]
        ),
        max_size=3,
    ).map("".join)
    leaf = st.sampled_from(
        [
            "HAM-1",
            "3",
            "&e;",
            "&lt;",
            "&#0;",
            "&#x10FFFF;",
            "&#xD800;",
            "&bogus;",
            "]]>",
            "<![CDATA[<x/>]]>",
            "<!-- x -->",
            "\u2028",
            "\ufffe",
            f'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="{secret}" '
            'parse="text"/>',
            f'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="{url}/x"/>',
        ]
    )
    tag = st.sampled_from(["order", "sku", "qty", "a", "xi:include", "b:c"])

    def element(kids: Any) -> Any:
        return st.builds(
            lambda t, k, attr: f"<{t}{attr}>{''.join(k)}</{t}>",
            tag,
            st.lists(kids, max_size=4),
            st.sampled_from(["", ' id="1"', " id='&e;'", ' id="1" id="2"', ' xmlns="urn:x"']),
        )

    body = st.recursive(leaf, element, max_leaves=30)
    nested = st.integers(1, 400).map(lambda n: "<a>" * n + "</a>" * n)
    root = st.one_of(element(body), nested, body)
    text = st.builds(lambda a, b, c, d, e: a + b + c + d + e, decl, misc, subset, misc, root)
    encodings = (
        "utf-8 utf-8-sig utf-16 utf-16-le utf-16-be utf-32 utf-32-le utf-32-be latin-1 cp037"
    )
    encoding = st.sampled_from(encodings.split())

    def encode(t: str, enc: str) -> bytes:
        return t.encode(enc, "surrogatepass" if enc.startswith("utf") else "replace")

    def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(data)
        for kind, at, value in edits:
            if not b:
                break
            at %= len(b)
            if kind == 0:
                b[at] = value
            elif kind == 1:
                b.insert(at, value)
            else:
                del b[at]
        return bytes(b)

    edits = st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4
    )
    documents = st.builds(mutate, st.builds(encode, text, encoding), edits)
    document = st.one_of(documents, st.binary(max_size=512))
    any_char = st.characters(codec=None, exclude_categories=())  # surrogates too
    any_text = st.one_of(
        st.text(any_char, max_size=260),
        st.binary(max_size=255).map(os.fsdecode),  # what the kernel can hand over
        st.text(st.sampled_from([*sorted(ALLOWED), "/", "\\", "\n", ",", " "]), max_size=210),
    )
    stamp = st.integers(0, 2**64)
    return {
        "check": st.tuples(document, st.one_of(st.none(), document)),
        "names": any_text.map(lambda t: (t,)),
        "safe_name": st.tuples(any_text, stamp, any_text, stamp),
        "escape_name": any_text.map(lambda t: (t,)),
    }


def properties(ctx: Context) -> dict[str, Callable[..., None]]:
    return {
        "check": lambda data, before: check_property(ctx, data, before),
        "names": names_property,
        "safe_name": safe_name_property,
        "escape_name": escape_name_property,
    }


TARGETS = ("check", "names", "safe_name", "escape_name")


def run_hypothesis(ctx: Context, target: str, seconds: float) -> list[str]:
    """Run one target for ``seconds`` in rounds of examples; return what failed."""
    from hypothesis import HealthCheck, given, settings

    strategy = strategies(ctx)[target]
    prop = properties(ctx)[target]
    findings: list[str] = []
    end = time.monotonic() + seconds
    rounds = examples = 0

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def one_round(args: tuple[Any, ...]) -> None:
        nonlocal examples
        examples += 1
        prop(*args)

    while time.monotonic() < end:
        rounds += 1
        try:
            one_round()
        except Exception as exc:  # a finding: keep its minimal example, go on with the target
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            if text not in findings:
                findings.append(text)
                print(f"[hypothesis:{target}] FOUND\n{text}\n", flush=True)
            if len(findings) >= 5:
                break
    print(
        f"[hypothesis:{target}] {seconds:.0f}s, {rounds} rounds, {examples} examples, "
        f"{len(findings)} finding(s)",
        flush=True,
    )
    return findings


# --- atheris ----------------------------------------------------------------------------------


def atheris_child(target: str, seconds: int, artifacts: Path) -> None:
    """In a child process: fuzz one target with libFuzzer until time is up."""
    atheris: Any = importlib.import_module("atheris")  # jobspool was instrumented: CHILD
    directory = Path(tempfile.mkdtemp(prefix="fuzz-"))
    listener = Listener()
    ctx = Context(directory, listener)

    def text(fdp: Any) -> str:
        how = fdp.ConsumeIntInRange(0, 2)
        if how == 0:
            return os.fsdecode(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 255)))
        if how == 1:
            return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 260)))
        return str(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 260)))

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        if target == "check":
            first = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
            check_property(ctx, first, fdp.ConsumeBytes(4096) or None)
        elif target == "names":
            names_property(text(fdp))
        elif target == "safe_name":
            safe_name_property(
                text(fdp),
                fdp.ConsumeIntInRange(0, 2**63),
                text(fdp),
                fdp.ConsumeIntInRange(0, 2**63),
            )
        else:
            escape_name_property(text(fdp))

    seeds = directory / "seeds"
    seeds.mkdir()
    if target == "check":  # a few documents to start from
        for case in HOSTILE:
            data = case.data(ctx.bait, 4096)[:4096]
            (seeds / case.id).write_bytes(bytes([2, 0]) + data)
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/{target}-"]
    argv += ["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1", str(seeds)]
    atheris.Setup(argv, one)
    atheris.Fuzz()


# The child imports jobspool's modules under atheris' instrumentation (coverage
# feedback for libFuzzer) before this module imports them.
CHILD = """
import sys
import atheris
with atheris.instrument_imports(include=["jobspool"]):
    import jobspool.check, jobspool.intake, jobspool.joblog, jobspool.names
from tests.fuzz import main
sys.exit(main(sys.argv[1:]))
"""


def run_atheris(target: str, seconds: float, artifacts: Path) -> list[str]:
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", CHILD, "--atheris-child", target]
    argv += ["--seconds", str(max(1, int(seconds))), "--artifacts", str(artifacts)]
    if include_known:
        argv.append("--include-known")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 120)
    stats = [line for line in proc.stderr.splitlines() if line.startswith("stat::")]
    runs = next(
        (line.split(":")[-1].strip() for line in stats if "number_of_executed" in line), "?"
    )
    found = sorted(str(p) for p in artifacts.glob(f"{target}-*"))
    print(
        f"[atheris:{target}] {seconds:.0f}s, {runs} runs, exit {proc.returncode}, "
        f"{len(found)} artifact(s)",
        flush=True,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        print(f"[atheris:{target}] FOUND\n{tail}\n", flush=True)
        return [tail, *found]
    return []


# --- the command ------------------------------------------------------------------------------


@contextlib.contextmanager
def context() -> Iterator[Context]:
    with tempfile.TemporaryDirectory(prefix="jobspool-fuzz-") as directory:
        listener = Listener()
        try:
            yield Context(Path(directory), listener)
        finally:
            listener.close()


def has_atheris() -> bool:
    try:
        importlib.import_module("atheris")
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="total time (default 10)")
    parser.add_argument("--engine", choices=["both", "hypothesis", "atheris"], default="both")
    parser.add_argument("--target", choices=TARGETS, action="append", help="(default: all)")
    artifacts = Path(tempfile.gettempdir()) / "jobspool-fuzz-artifacts"
    parser.add_argument("--artifacts", type=Path, default=artifacts)
    parser.add_argument(
        "--include-known",
        action="store_true",
        help="also check the properties of known bugs (KNOWN)",
    )
    parser.add_argument("--atheris-child", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global include_known
    include_known = args.include_known
    if args.atheris_child:
        sys.argv = [sys.argv[0]]
        atheris_child(args.atheris_child, args.seconds, args.artifacts.absolute())
        return 0
    targets = args.target or list(TARGETS)
    engines = ["hypothesis", "atheris"] if args.engine == "both" else [args.engine]
    if "atheris" in engines and not has_atheris():
        print("atheris is not installed (pip install atheris): hypothesis only", flush=True)
        engines = ["hypothesis"]
    # check gets half of each engine's time: it is the slow one and the one that matters most.
    weights = {t: (len(targets) - 1 if t == "check" and len(targets) > 1 else 1) for t in targets}
    total = args.minutes * 60
    findings: dict[str, list[str]] = {}
    started = time.monotonic()
    with context() as ctx:
        for engine in engines:
            for target in targets:
                seconds = total / len(engines) * weights[target] / sum(weights.values())
                if engine == "hypothesis":
                    found = run_hypothesis(ctx, target, seconds)
                else:
                    found = run_atheris(target, seconds, args.artifacts)
                if found:
                    findings[f"{engine}:{target}"] = found
    print(
        f"fuzzed {time.monotonic() - started:.0f}s with {', '.join(engines)}; "
        f"findings in: {', '.join(findings) or 'none'}",
        flush=True,
    )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
