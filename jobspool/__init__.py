"""jobspool: a filesystem spool for XML jobs.

The public surface handlers see is :class:`Job` and :class:`TryLater`.
This module stays tiny: every ``jobspool`` command imports it first.
"""

from __future__ import annotations

from jobspool.errors import TryLater

__version__ = "0.1.0"
__all__ = ["TryLater", "__version__"]
