"""The check every job passes before it is queued.

Partner XML is untrusted. It is parsed by one hardened lxml parser: no
network, no entity resolution, no DTD loading, libxml2's default limits on
depth (256) and text size, and the caller bounds the input to the
interface's ``max_size`` before we see it. Jobs never need a DTD, so a
document that declares a DOCTYPE is rejected outright: that closes entity
expansion (billion laughs) and external entities (XXE) without relying on
parser flags alone. Then the interface's XSD or RELAX NG schema, compiled
once per process.

Documents are checked as they stream from their file (:func:`check_file`),
in C: libxml2 parses and validates with no tree built and no Python per
element, so a gigabyte stock export costs a few megabytes and about what
``xmllint --stream`` costs. libxml2's streaming validator reports schema
errors without a line, so for a rejected document the line is found by
feeding it again up to the error.
"""

from __future__ import annotations

import collections
import io
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, cast

from lxml import etree

from jobspool.errors import ConfigError, Problem

if TYPE_CHECKING:
    from lxml.etree._parser import CustomTargetParser  # a name only the type stubs have


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: the problems found (none: the document passed)."""

    problems: list[Problem]
    schema: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class _NothingOutside(etree.Resolver):
    """Every external reference resolves to nothing.

    libxml2 reads a DOCTYPE's external subset and external parameter
    entities even with ``load_dtd=False``; with this resolver on the parser
    it asks us instead, and gets an empty string: no file is ever opened.
    """

    def resolve(self, system_url: str | None, public_id: str | None, context: object, /) -> Any:
        return self.resolve_string("", context)


def parse(data: bytes) -> etree._ElementTree:
    """Parse untrusted bytes with the hardened parser (see :func:`hardened_parser`)."""
    return etree.fromstring(data, hardened_parser()).getroottree()


def hardened_parser(remove_blank_text: bool = False) -> etree.XMLParser:
    """A parser that never reads a file, opens a connection or expands an entity.

    Give it bytes (``etree.fromstring``), never a file name: its resolver
    answers every URL with nothing, the document's own file included.
    """
    parser: etree.XMLParser = etree.XMLParser(remove_blank_text=remove_blank_text, **_HARDENED)
    parser.resolvers.add(_NothingOutside())
    return parser


# What every parser of partner XML is built with: no entities resolved, no
# network, no DTD loaded or validated, libxml2's limits on text and depth.
_HARDENED: dict[str, Any] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
    "collect_ids": False,
}


CHUNK = 1 << 20  # bytes fed to the parser at a time
TREE_LIMIT = 64 << 20  # default: the largest document checked as a whole tree (RELAX NG)


def root_name(head: bytes) -> etree.QName | None:
    """The root element's name, from the first bytes of a document (None: none found there).

    For choosing an interface by the root element; the document's own check
    comes after, on the whole of it.
    """
    parser = etree.XMLPullParser(encoding=_utf32(head), events=("start",), **_HARDENED)
    parser.resolvers.add(_NothingOutside())
    try:
        parser.feed(_without_mark(head, 0))
        for _, el in parser.read_events():
            return etree.QName(el)
    except etree.XMLSyntaxError:
        return None
    return None


def check(data: bytes, schema: Path | None, tree_limit: int = TREE_LIMIT) -> Verdict:
    """Check one document held in memory (see :func:`check_stream`)."""
    return check_stream(io.BytesIO(data), schema, len(data), tree_limit)


def check_file(
    path: str | os.PathLike[str], schema: Path | None, tree_limit: int = TREE_LIMIT
) -> Verdict:
    """Check a file from disk, never following a link, in bounded memory whatever its size."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return check_stream(f, schema, os.fstat(fd).st_size, tree_limit)


def check_stream(
    f: BinaryIO, schema: Path | None, size: int, tree_limit: int = TREE_LIMIT
) -> Verdict:
    """Check a document read from ``f``: well-formed, no DOCTYPE, valid against ``schema``.

    An XSD (or no schema) is checked while the document streams through the
    parser a chunk at a time, with no tree built: memory stays bounded
    whatever the document's size. lxml cannot stream RELAX NG, so such a
    document is parsed as a whole tree, and refused above ``tree_limit``
    bytes with a problem that says so.
    """
    head = f.read(CHUNK)
    line = _doctype_in_prolog(head)
    if line:  # rejected before any parser sees it
        return Verdict([Problem(line, 1, _NO_DOCTYPE)], schema)
    if schema is not None and schema.suffix == ".rng":
        if size > tree_limit:
            too_big = (
                f"the document ({size} bytes) is larger than the {tree_limit} bytes a RELAX NG "
                "schema can be checked up to (daemon.tree_limit): lxml checks RELAX NG on a "
                "whole tree in memory; use an XSD for larger documents"
            )
            return Verdict([Problem(0, 0, too_big)], schema)
        return _check_tree(head + f.read(), schema)
    validator = compiled(schema) if schema is not None else None
    return _check_streaming(head, f, validator, schema)


_UTF32 = {b"\xff\xfe\x00\x00": "UTF-32LE", b"\x00\x00\xfe\xff": "UTF-32BE"}


def _utf32(head: bytes) -> str | None:
    """UTF-32 by its byte order mark: libxml2 does not detect it itself."""
    return _UTF32.get(head[:4])


def _without_mark(chunk: bytes, offset: int) -> bytes:
    """The first chunk without a UTF-32 mark: with the encoding given, it reads as a character."""
    return chunk[4:] if offset == 0 and _utf32(chunk) else chunk


class _Pass(NamedTuple):
    """One streaming pass over a document."""

    problems: list[Problem]  # empty: it passed
    began: int  # where the chunk before the one with the first error began (bytes)
    read: int | None = None  # bytes read before it stopped (None: the whole document)
    doctype: bool = False


def _errors(log: etree._ListErrorLog) -> list[Problem]:
    return _problems(e for e in log if e.level >= etree.ErrorLevels.ERROR)


class _Doctype:
    """A parser target that builds nothing and only remembers a DOCTYPE.

    With a target that has no element or text callbacks, libxml2 parses and
    the schema validates entirely in C, with no tree and no Python per
    element: this is what makes the check as fast as ``xmllint --stream``.
    """

    def __init__(self) -> None:
        self.seen = False

    def doctype(self, *_: object) -> None:
        self.seen = True

    def close(self) -> bool:
        return self.seen


class _Chunks:
    """The document, handed to the parser a chunk at a time until it logs an error.

    The parser reads from this as from a file. Stopping at the first error
    matters: a validator goes on and logs every later error, and a
    gigabyte of invalid items would log millions of them.
    """

    def __init__(
        self, f: BinaryIO, head: bytes, parser: CustomTargetParser[bool], limit: int | None
    ) -> None:
        self._f, self._next, self._parser, self._limit = f, _without_mark(head, 0), parser, limit
        self.offset = self._began = self.began = 0
        self.ended = False  # the whole document was read
        self.cut = False  # the limit was reached: the parser was told the document ends there
        self.problems: list[Problem] = []

    def read(self, _size: int) -> bytes:
        if problems := _errors(self._parser.error_log):
            self.problems = problems
            return b""
        if self._limit is not None and self.offset >= self._limit:
            self.cut = True
            return b""
        chunk, self._next = self._next, b""
        chunk = chunk or self._f.read(CHUNK)
        self.ended = not chunk
        # libxml2 asks for more once it has parsed nearly all it was given:
        # an error seen now lies in the last chunk or the end of the one before.
        self.began, self._began = self._began, self.offset
        self.offset += len(chunk)
        return chunk

    def stopped(self, problems: list[Problem], doctype: bool = False) -> _Pass:
        """The pass, ended with ``problems`` (none: the document passed)."""
        return _Pass(problems, self.began, None if self.ended else self.offset, doctype)


def _validating(
    validator: etree._Validator | None, head: bytes, target: _Doctype | None = None
) -> CustomTargetParser[bool]:
    """A hardened parser that builds nothing and validates against ``validator`` as it goes."""
    parser = etree.XMLParser(
        encoding=_utf32(head),
        schema=cast(etree.XMLSchema | None, validator),
        target=cast("etree.ParserTarget[bool]", target or _Doctype()),
        **_HARDENED,
    )
    parser.resolvers.add(_NothingOutside())
    return parser


def _stream(
    f: BinaryIO, head: bytes, validator: etree._Validator | None, limit: int | None = None
) -> _Pass:
    """Parse (and validate) the document as it is read from ``f``; the problems found.

    The parser reads ``f`` itself (not fed a chunk at a time): only libxml2's
    reading parser enforces its depth limit without building a tree. With a
    ``limit``, only the problems in the document's first ``limit`` bytes count.
    """
    if not head:
        return _Pass([Problem(1, 1, "the document is empty")], 0)
    parser = _validating(validator, head, target := _Doctype())
    chunks = _Chunks(f, head, parser, limit)
    try:
        doctype = bool(etree.parse(cast(Any, chunks), parser))
    except etree.XMLSyntaxError as exc:
        if target.seen:  # what the parser says of a DOCTYPE's insides does not matter
            return chunks.stopped([], doctype=True)
        if chunks.cut and not chunks.problems:
            return chunks.stopped([])  # the parser's complaint is of the end it was told of
        if problems := chunks.problems or _errors(parser.error_log):
            return chunks.stopped(problems)
        if validator is not None:
            # With a schema, lxml logs none of libxml2's syntax errors and
            # keeps only the last (a follow-on one): the plain pass after
            # this one reports the first.
            return chunks.stopped([Problem(0, 0, "not well-formed XML")])
        return chunks.stopped(_syntax_errors(exc, parser.error_log))
    return chunks.stopped(chunks.problems or _errors(parser.error_log), doctype)


def _check_streaming(
    head: bytes, f: BinaryIO, validator: etree._Validator | None, schema: Path | None
) -> Verdict:
    first = _stream(f, head, validator)
    if first.doctype:
        return Verdict([Problem(1, 1, _NO_DOCTYPE)], schema)
    if not first.problems or first.problems[0].line > 0 or validator is None:
        return Verdict(first.problems, schema)
    # No line: a schema error (libxml2's streaming validator does not say
    # where), or a syntax error the validating parser could not place. Cut
    # short, a document's last element looks to the validator like content
    # it does not expect: a plain pass over what was read finds the syntax
    # error first. A schema error is placed by :func:`_locate`.
    f.seek(0)
    if plain := _stream(f, f.read(CHUNK), None, limit=first.read).problems:
        return Verdict(plain, schema)
    messages = [p.message for p in first.problems]
    lines = _locate(f, first.began, first.read, validator, messages)
    return Verdict([Problem(n, 0, m) for n, m in zip(lines, messages, strict=True)], schema)


def _locate(
    f: BinaryIO,
    begin: int,
    end: int | None,
    validator: etree._Validator | None,
    messages: list[str],
) -> list[int]:
    """The lines of the elements on which the streaming validator finds its errors.

    The document is fed again to a validating parser: quickly up to where
    the first error was seen, then a line at a time, each error placed on
    the line that brought it. The element an error's message names is then
    looked for back from that line: its start tag's line is the one given,
    as a tree check gives it (for a bad value or missing content the
    validator notices at the end tag). Looked for no further than the first
    pass read (``end``; None: to the end); 0 for an error not found again.
    """
    f.seek(0)
    parser = _validating(validator, f.read(4))
    f.seek(0)
    line, done = 1, 0
    lines: list[int] = []
    recent: collections.deque[bytes] = collections.deque(maxlen=_LOOK_BACK)
    try:
        while done < begin:
            chunk = f.read(min(CHUNK, begin - done))
            if not chunk:
                break
            parser.feed(_without_mark(chunk, done))
            done += len(chunk)
            line += chunk.count(b"\n")
        if done < begin or _errors(parser.feed_error_log):
            # Not where the first pass saw it: no line rather than a wrong one.
            return [0] * len(messages)
        # A line is read in bounded pieces: a document on one line is never
        # held whole.
        while (end is None or done < end) and (text := f.readline(_LINE_PIECE)):
            parser.feed(_without_mark(text, done))
            done += len(text)
            recent.append(text)
            for _ in range(len(lines), min(len(_errors(parser.feed_error_log)), len(messages))):
                lines.append(line - _lines_back(recent, messages[len(lines)]))
            if len(lines) == len(messages):
                return lines
            line += text.endswith(b"\n")
    except etree.XMLSyntaxError:
        return lines + [line] * (len(messages) - len(lines))
    return lines + [0] * (len(messages) - len(lines))


_LOOK_BACK = 64  # lines (or pieces of one) kept to find an element's start tag in
_NAMED = re.compile(r"Element '(?:\{[^}]*\})?([^']+)'")
# Where markup is only text: a tag written there is not an element's. One
# begun before the lines looked back at is not seen (their first end marker
# cannot tell: "-->" and "?>" are allowed in plain text too).
_TEXT_ONLY = rb"<!--.*?(?:-->|\Z)|<!\[CDATA\[.*?(?:\]\]>|\Z)|<\?.*?(?:\?>|\Z)"


def _lines_back(recent: collections.deque[bytes], message: str) -> int:
    """How many lines before the last of ``recent`` the element ``message`` names begins."""
    named = _NAMED.match(message)
    if named is None:
        return 0
    local = re.escape(named.group(1).rpartition(":")[2].encode())
    # One pass, left to right: a comment, CDATA or instruction is matched
    # whole (group 1), so no start tag is ever matched inside one.
    tag = rb"<(?:[^\s<>/:]+:)?" + local + rb"(?:[\s/>]|\Z)"
    text = b"".join(recent)
    found = re.finditer(b"(" + _TEXT_ONLY + b")|" + tag, text, re.S)
    starts = [m.start() for m in found if m.group(1) is None]
    if not starts:
        return 0
    # The last piece's own line break is the end of the line the error is on.
    return text.count(b"\n", starts[-1], len(text) - text.endswith(b"\n"))


_LINE_PIECE = 1 << 16  # bytes: the most of one line fed at once while locating an error


def _check_tree(data: bytes, schema: Path) -> Verdict:
    """The whole-tree check, for RELAX NG: parse, then validate the tree."""
    parser = hardened_parser()
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        return Verdict(_syntax_errors(exc, parser.error_log), schema)
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        return Verdict([Problem(_doctype_line(data), 1, _NO_DOCTYPE)], schema)
    validator = compiled(schema)
    if validator.validate(tree):
        return Verdict([], schema)
    problems = _problems(validator.error_log)
    return Verdict(problems or [Problem(0, 0, "not valid against the schema")], schema)


def _problems(log: Iterable[etree._LogEntry]) -> list[Problem]:
    return [Problem(e.line, e.column, one_line(e.message)) for e in log][:20]


_compiled: dict[Path, etree._Validator] = {}


def compiled(schema: Path) -> etree._Validator:
    """The validator for a schema file, compiled once per process."""
    validator = _compiled.get(schema)
    if validator is None:
        validator = _compiled[schema] = _compile(schema)
    return validator


def forget_compiled(schema: Path) -> None:
    """Compile ``schema`` afresh when next asked (its file changed)."""
    _compiled.pop(schema, None)


def compile_all(schemas: Iterable[Path]) -> dict[Path, etree._Validator]:
    """Compile schemas afresh, without touching the ones in use (a reload's first step)."""
    return {schema: _compile(schema) for schema in schemas}


def use_compiled(validators: dict[Path, etree._Validator]) -> None:
    """Put freshly compiled schemas in use (a reload's last step, once all is well)."""
    global _compiled
    _compiled = dict(validators)


def _compile(schema: Path) -> etree._Validator:
    # Schemas come from the administrator, so they may include or import
    # local files, but never fetch from the network.
    parser = etree.XMLParser(no_network=True, resolve_entities=False)
    try:
        doc = etree.parse(str(schema), parser)
        if schema.suffix == ".rng":
            return etree.RelaxNG(doc)
        return etree.XMLSchema(doc)
    except OSError as exc:
        raise ConfigError(f"schema {schema}: cannot read: {exc}") from None
    except (etree.XMLSyntaxError, etree.XMLSchemaParseError, etree.RelaxNGParseError) as exc:
        raise ConfigError(
            f"schema {schema}: not a usable schema: {_first_line(str(exc))}"
        ) from None


def _syntax_errors(exc: etree.XMLSyntaxError, log: etree._ListErrorLog) -> list[Problem]:
    # The parser's own log: the exception's log is shared by the thread and
    # would carry errors of documents parsed before this one.
    errors = [Problem(e.line, e.column, one_line(e.message)) for e in log]
    if not errors:
        line, column = exc.position if exc.position else (0, 0)
        errors = [Problem(line, column, one_line(_first_line(exc.msg or "not well-formed XML")))]
    # libxml2 reports a chain of follow-on errors after the first; the first
    # is the one to fix, the rest mostly repeat it.
    return errors[:20]


_NO_DOCTYPE = "document declares a DOCTYPE; jobs must not"
_PROLOG_END = re.compile(r"<[A-Za-z_:]")


def _doctype_in_prolog(data: bytes) -> int:
    """The line of a DOCTYPE before the root element (0: none seen).

    A cheap first guard for the usual encodings; the parser's resolver and
    the check of ``docinfo`` after parsing catch whatever this misses.
    """
    if _utf32(data) or data[:4] in (b"\0\0\0<", b"<\0\0\0"):
        encoding = "utf-32" if _utf32(data) else ("utf-32-be" if data[0] == 0 else "utf-32-le")
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")) or data[:2].count(b"\0") == 1:
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    for size in (8192, len(data)):  # a prolog is short: the whole head only when it is not
        text = data[:size].decode(encoding, "ignore")
        end = _PROLOG_END.search(text)
        if end or size >= len(data):
            break
    prolog = text[: end.start()] if end else text
    at = prolog.find("<!DOCTYPE")
    return prolog.count("\n", 0, at) + 1 if at >= 0 else 0


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(message: str) -> str:
    """A parser's message as one printable line: a quoted value may hold newlines."""
    return "".join(
        c if c.isprintable() else _ESCAPES.get(c, c.encode("unicode_escape").decode())
        for c in message.strip()
    )


def _doctype_line(data: bytes) -> int:
    at = data.find(b"<!DOCTYPE")
    return data.count(b"\n", 0, at) + 1 if at >= 0 else 1


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
