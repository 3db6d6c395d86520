"""A planted bug in ``jobspool serve``, for the checker to catch (tests/test_crashcheck.py).

On ``PYTHONPATH``, Python imports this at the start of every program; it
patches the server only (a process whose command line says ``serve``), as
``JOBSPOOL_PLANTED_HTTP`` asks:

- ``upload-skip-file-fsync``: an upload's staging file is closed unsynced.
  A job answered 201 is still safe (placing it into its queue syncs it
  again, with its stamp), but one rejected into ``joberrors`` (400) may
  come back empty after a power cut: only the staging synced its data;
- ``skip-dir-fsync``: the server syncs no directory, so a job answered 201
  or 400 may be gone after a power cut, and one answered 200 (downloaded)
  back in its queue.
"""

from __future__ import annotations

import os
import sys

BUG = os.environ.get("JOBSPOOL_PLANTED_HTTP", "")

if BUG and "serve" in sys.argv:
    from pathlib import Path

    from jobspool import durable, spool

    if BUG == "upload-skip-file-fsync":

        def finish(self: durable.Staging) -> str:
            os.close(self.fd)
            return self.path

        durable.Staging.finish = finish  # type: ignore[method-assign]
    elif BUG == "skip-dir-fsync":

        def unsynced(path: Path) -> None:
            pass

        vars(spool)["fsync_dir"] = unsynced  # the name spool.py calls durable.fsync_dir by
    else:
        raise SystemExit(f"unknown planted bug {BUG!r}")
