"""The test kit: everything the tests share but their fixtures (those are in conftest.py).

Test modules import from here (``from tests.kit import Site, order, ...``),
never from each other and never from conftest.py. What is where:

- :mod:`tests.kit.documents`: sample schemas and documents (``ORDER_XSD``,
  ``VALID``, ``order()``, ...) and the standard three-interface ``CONFIG``.
- :mod:`tests.kit.process`: the one command runner (:func:`run`), its
  assertions (:func:`assert_ok`, :func:`assert_fails`), ``DEADLINE`` and
  :func:`wait_for`, processes (:func:`pid_alive`, :func:`measured`, ...).
- :mod:`tests.kit.logs`: job logs, each checked against ``joblog.xsd`` first.
- :mod:`tests.kit.site`: :class:`Site` (a configuration, its spool, its
  commands) and :class:`Daemon` (the real daemon in a subprocess); ``FAST``.
- :mod:`tests.kit.results`: a schedule's recorded runs, as :class:`Run`.
- :mod:`tests.kit.schedule`: the Scheduler in-process, with a clock of the
  test's own.
- :mod:`tests.kit.http`: certificates, a real ``jobspool serve``, clients.
- :mod:`tests.kit.hostile`: hostile documents and what they try to reach.
- :mod:`tests.kit.faults`: full disks, read-only mounts, kernel settings.
"""

from tests.kit.documents import (
    BROKEN,
    CONFIG,
    INTERFACES,
    INVALID,
    ORDER_XSD,
    SPOOL_DIRS,
    STOCK_INVALID,
    STOCK_RNG,
    STOCK_VALID,
    STOCK_XSD,
    VALID,
    order,
)
from tests.kit.faults import (
    eio_shim,
    fill,
    fill_inodes,
    free_inodes,
    free_pages,
    loop_ext4,
    remount,
    remount_when_possible,
    set_faults,
    sysctl,
    tmpfs,
    unmount,
)
from tests.kit.hostile import (
    HOSTILE,
    MEMORY_BOUND_KB,
    Bait,
    Hostile,
    Listener,
    listening,
    reason_ok,
    surroundings,
)
from tests.kit.http import Server, basic, chunks, free_port, make_certificates, read_response
from tests.kit.logs import (
    assert_every_log_valid,
    child,
    kinds,
    log_events,
    log_root,
    outputs,
    valid_log,
)
from tests.kit.process import (
    COMMAND,
    DEADLINE,
    JOBSPOOL,
    Measured,
    assert_fails,
    assert_ok,
    clean_environ,
    measured,
    pid_alive,
    reachable_by_others,
    read_table,
    run,
    vm_hwm,
    wait_for,
)
from tests.kit.results import Run, read_run, runs_in
from tests.kit.schedule import (
    RecordingLog,
    T,
    at,
    change,
    finish,
    local,
    loop,
    schedule,
    scheduler_for,
)
from tests.kit.site import FAST, NOBODY, STATES, Daemon, Site, make_site, plain, snapshot

__all__ = [
    "BROKEN",
    "COMMAND",
    "CONFIG",
    "DEADLINE",
    "FAST",
    "HOSTILE",
    "INTERFACES",
    "INVALID",
    "JOBSPOOL",
    "MEMORY_BOUND_KB",
    "NOBODY",
    "ORDER_XSD",
    "SPOOL_DIRS",
    "STATES",
    "STOCK_INVALID",
    "STOCK_RNG",
    "STOCK_VALID",
    "STOCK_XSD",
    "VALID",
    "Bait",
    "Daemon",
    "Hostile",
    "Listener",
    "Measured",
    "RecordingLog",
    "Run",
    "Server",
    "Site",
    "T",
    "assert_every_log_valid",
    "assert_fails",
    "assert_ok",
    "at",
    "basic",
    "change",
    "child",
    "chunks",
    "clean_environ",
    "eio_shim",
    "fill",
    "fill_inodes",
    "finish",
    "free_inodes",
    "free_pages",
    "free_port",
    "kinds",
    "listening",
    "local",
    "log_events",
    "log_root",
    "loop",
    "loop_ext4",
    "make_certificates",
    "make_site",
    "measured",
    "order",
    "outputs",
    "pid_alive",
    "plain",
    "reachable_by_others",
    "read_response",
    "read_run",
    "read_table",
    "reason_ok",
    "remount",
    "remount_when_possible",
    "run",
    "runs_in",
    "schedule",
    "scheduler_for",
    "set_faults",
    "snapshot",
    "surroundings",
    "sysctl",
    "tmpfs",
    "unmount",
    "valid_log",
    "vm_hwm",
    "wait_for",
]
