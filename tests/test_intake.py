"""Taking drops in: a burst's checked drops are settled together, and one fault spares the rest.

In-process, on a real spool made by ``jobspool init``; the daemon does the
same through its check workers (``tests/test_daemon.py``).
"""

from __future__ import annotations

import errno
import os

import pytest

from jobspool import config, intake
from jobspool.config import Interface
from jobspool.errors import Problem
from jobspool.spool import Spool
from tests.kit import Site, order


def _passed(
    site: Site, spool: Spool, iface: Interface, names: list[str]
) -> list[tuple[Interface, intake.Screened, list[Problem]]]:
    """Drops screened, and checked with no problem: ready to be settled."""
    out = []
    for name in names:
        site.drop(iface.name, name, order(1))
        screened = intake.screen_drop(spool, iface, name)
        assert isinstance(screened, intake.Screened)
        out.append((iface, screened, list[Problem]()))
    return out


def test_a_burst_is_queued_in_drop_order_with_stamps_in_that_order(spool: Site) -> None:
    cfg = config.load(spool.config)
    tree, iface = Spool.of(cfg), cfg.interfaces["orders_in"]
    names = [f"burst-{i:02d}.xml" for i in range(10)]
    drops = _passed(spool, tree, iface, names)
    settled = intake.settle_drops(tree, drops)
    assert [s.taken.name for s in settled if s.taken] == names
    assert [n for _, n in tree.queued("orders_in")] == names  # by stamp: drop order


def test_a_drop_that_cannot_be_settled_waits_and_the_rest_of_its_burst_goes_on(
    spool: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.load(spool.config)
    tree, iface = Spool.of(cfg), cfg.interfaces["orders_in"]
    names = ["a.xml", "sick.xml", "c.xml"]
    drops = _passed(spool, tree, iface, names)
    real_locate = tree.locate

    def locate(name: str, besides: object = None) -> object:
        if name == "sick.xml":  # the disk fails on this one's lookup
            raise OSError(errno.EIO, os.strerror(errno.EIO), name)
        return real_locate(name, besides)  # type: ignore[arg-type]

    monkeypatch.setattr(tree, "locate", locate)
    settled = intake.settle_drops(tree, drops)
    assert [s.taken.name if s.taken else None for s in settled] == ["a.xml", None, "c.xml"]
    assert isinstance(settled[1].error, OSError)
    assert spool.where("sick.xml") == ["incoming/orders_in"]  # left where it was, to be retried
    assert [n for _, n in tree.queued("orders_in")] == ["a.xml", "c.xml"]
