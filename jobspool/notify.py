"""The systemd notify protocol: READY, RELOADING, STOPPING, STATUS, WATCHDOG.

A datagram on the socket named by ``$NOTIFY_SOCKET``; a few lines of stdlib
instead of the unmaintained ``sdnotify`` or the C extension
``systemd-python``. Without ``$NOTIFY_SOCKET`` (not under systemd) every call
does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields to systemd; False when not running under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def reloading() -> bool:
    """Tell systemd a reload began (systemd 252 wants MONOTONIC_USEC with it)."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def watchdog_interval() -> float | None:
    """How often to ping systemd's watchdog (half of ``WatchdogSec=``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
