"""Taking drops in: a burst's checked drops are settled together, and one fault spares the rest.

In-process, on a real spool made by ``jobspool init``; the daemon does the
same through its check workers (``tests/test_daemon.py``).
"""

from __future__ import annotations

import contextlib
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


def test_a_drop_gone_before_its_digest_waits_and_the_rest_keep_their_order(spool: Site) -> None:
    cfg = config.load(spool.config)
    tree = Spool.of(cfg)
    iface = cfg.interfaces["orders_in"]._replace(same_content="flag")
    names = [f"same-{i}.xml" for i in range(4)]
    drops = [(iface, s, p) for _, s, p in _passed(spool, tree, iface, names)]
    os.unlink(drops[1][1].path)  # the partner takes it back after its check
    settled = intake.settle_drops(tree, drops)
    assert [s.taken.name if s.taken else None for s in settled] == [
        "same-0.xml",
        None,
        "same-2.xml",
        "same-3.xml",
    ]
    assert [n for _, n in tree.queued("orders_in")] == ["same-0.xml", "same-2.xml", "same-3.xml"]


def test_the_names_lock_is_let_go_after_each_rejection(
    spool: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rejection is synced at once (the drop, its log, the move): a submit
    # waiting for the lock must not wait for a whole burst of them.
    cfg = config.load(spool.config)
    tree, iface = Spool.of(cfg), cfg.interfaces["orders_in"]
    names = ["bad-1.xml", "bad-2.xml", "good-3.xml", "good-4.xml"]
    drops = _passed(spool, tree, iface, names)
    wrong = [Problem(1, 1, "not an order")]
    drops = [(i, s, wrong if s.path.name.startswith("bad") else p) for i, s, p in drops]
    holds = []
    real_lock = tree.names_lock

    def counted() -> contextlib.AbstractContextManager[None]:
        holds.append(1)
        return real_lock()

    monkeypatch.setattr(tree, "names_lock", counted)
    settled = intake.settle_drops(tree, drops)
    assert [s.taken.place if s.taken else None for s in settled] == [
        "joberrors",
        "joberrors",
        "queue/orders_in",
        "queue/orders_in",
    ]
    assert len(holds) == 3  # one hold ends with each rejection; the accepts share the last


def test_a_drop_whose_interface_this_node_lost_stays_where_it_is(spool: Site) -> None:
    cfg = config.load(spool.config)
    tree, iface = Spool.of(cfg), cfg.interfaces["orders_in"]
    drops = _passed(spool, tree, iface, ["theirs.xml"])
    settled = intake.settle_drops(tree, drops, owned=lambda interface: False)
    assert settled == [intake.Settled(None)]
    assert spool.where("theirs.xml") == ["incoming/orders_in"]
