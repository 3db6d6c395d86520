"""Every error jobspool reports, one class per exit code of the contract.

The core raises these; the CLI turns each into one line on stderr and its
exit code, in one place (``jobspool.cli.main``). Nothing here imports
anything, so every module may use it.
"""

from __future__ import annotations


class JobspoolError(Exception):
    """Base class: a message for the user and the exit code it maps to."""

    exit_code = 1


class BadRequest(JobspoolError):
    """Changing the request can fix it: unknown job or interface, bad name, name in use."""

    exit_code = 2


class Rejected(JobspoolError):
    """The job was checked and rejected (for ``submit``: it is now in joberrors)."""

    exit_code = 65

    def __init__(self, message: str, errors: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class TryLater(JobspoolError):
    """Nothing wrong with the request, but not now.

    The CLI exits 75 for it (no log yet, spool busy, disk full). A Python
    handler raises it to say "try this job again later": the job keeps the
    head of its queue and is retried with back-off.
    """

    exit_code = 75


class Denied(JobspoolError):
    """The operating system refused: permission denied."""

    exit_code = 77


class ConfigError(JobspoolError):
    """The configuration is broken; the message names the file and the key."""

    exit_code = 78


class Problem:
    """One reason a document failed its check, with where it was found."""

    __slots__ = ("column", "line", "message")

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line = line
        self.column = column
        self.message = message

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({self.line}, {self.column}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and (self.line, self.column, self.message) == (
            other.line,
            other.column,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.line, self.column, self.message))
