"""The check every job passes before it is queued.

Partner XML is untrusted. It is parsed by one hardened lxml parser: no
network, no entity resolution, no DTD loading, libxml2's default limits on
depth (256) and text size, and the caller bounds the input to the
interface's ``max_size`` before we see it. Jobs never need a DTD, so a
document that declares a DOCTYPE is rejected outright: that closes entity
expansion (billion laughs) and external entities (XXE) without relying on
parser flags alone. Then the interface's XSD or RELAX NG schema, compiled
once per process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from jobspool.errors import ConfigError, Problem


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: the parsed document, or the reasons it failed."""

    errors: list[Problem]
    tree: etree._ElementTree | None = None
    schema: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


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
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        collect_ids=False,
        remove_blank_text=remove_blank_text,
    )
    parser.resolvers.add(_NothingOutside())
    return parser


def check(data: bytes, schema: Path | None) -> Verdict:
    """Check one document: well-formed, no DOCTYPE, valid against ``schema`` if given."""
    line = _doctype_in_prolog(data)
    if line:  # rejected before any parser sees it
        return Verdict([Problem(line, 1, _NO_DOCTYPE)], schema=schema)
    parser = hardened_parser()
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        return Verdict(_syntax_errors(exc, parser.error_log), schema=schema)
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        return Verdict([Problem(_doctype_line(data), 1, _NO_DOCTYPE)], schema=schema)
    if schema is None:
        return Verdict([], tree)
    validator = compiled(schema)
    if validator.validate(tree):
        return Verdict([], tree, schema)
    errors = [Problem(e.line, e.column, one_line(e.message)) for e in validator.error_log]
    return Verdict(errors or [Problem(0, 0, "not valid against the schema")], tree, schema)


_compiled: dict[Path, etree._Validator] = {}


def compiled(schema: Path) -> etree._Validator:
    """The validator for a schema file, compiled once per process."""
    validator = _compiled.get(schema)
    if validator is None:
        validator = _compiled[schema] = _compile(schema)
    return validator


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
    head = data[:8192]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[:2].count(b"\0") == 1:
        text = head.decode("utf-16", "ignore")
    else:
        text = head.decode("utf-8", "ignore")
    end = _PROLOG_END.search(text)
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
