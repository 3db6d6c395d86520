"""jobspool: a filesystem spool for XML jobs.

The public surface handlers see is :class:`Job` and :class:`TryLater`.
This module stays tiny: every ``jobspool`` command imports it first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobspool.errors import TryLater

__version__ = "0.1.0"
__all__ = ["Job", "TryLater", "__version__"]

if TYPE_CHECKING:
    from jobspool.handlers import Job


def __getattr__(name: str) -> Any:
    # Job lives with the handlers, which the read commands never load.
    if name == "Job":
        from jobspool.handlers import Job

        return Job
    raise AttributeError(f"module 'jobspool' has no attribute {name!r}")
