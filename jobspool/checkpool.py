"""Checking drops in worker processes, off the daemon's main loop.

The main loop takes events, renames and syncs; the parsing and validation
of a drop (a 2 KB order or a 2 GB stock export alike) happens in a small pool
of worker processes (``daemon.check_workers``), so one huge file never stalls
the other interfaces, ``jobspool submit``, the schedules or systemd's
watchdog, and many small drops are checked in parallel, past the GIL.

A worker is a plain child process with a pipe each way, forked when the
daemon starts, before it has any thread (a fork of a threaded process can
inherit a lock some thread held), and forked again if it dies. No
``multiprocessing`` (its semaphores, resource tracker and fork server do not
survive a sandboxed service user) and no new interpreter (``exec`` of the
daemon's own Python can be refused to its service user): the child already
holds every module it needs. It closes every descriptor it inherited but its
pipes and stderr, so it never holds the daemon's lock or watches.

Drops are handed over in batches (whatever is ready in one turn, up to
:data:`BATCH_SIZE` paths per line of JSON), so a burst of small jobs costs
one round trip per batch, not per job. The daemon's main loop waits on the
workers' output pipes together with its other descriptors and reads the
verdicts as they come (:meth:`CheckPool.read`).

A worker compiles each schema once, and again when its file changes (a
reload).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any, NamedTuple

from jobspool.errors import Problem

BATCH_SIZE = 32  # drops per batch: one round trip to a worker for a burst of small jobs
IN_FLIGHT = 2  # batches a worker may hold: a busy one is not handed more


class Task(NamedTuple):
    """One drop to check: where it is and what it is checked against."""

    key: Any  # the caller's, given back with the verdict
    interface: str
    path: str
    schema: str | None
    max_size: int
    tree_limit: int
    size: int  # as screened: large ones are handed to a worker alone


class Checked(NamedTuple):
    """A drop's verdict: its problems (none: it passed), or why it could not be checked."""

    key: Any
    problems: list[tuple[int, int, str]]
    error: str | None = None  # reading it failed (gone, unreadable, worker died): not a verdict

    def as_problems(self) -> list[Problem]:
        return [Problem(*p) for p in self.problems]


def check_task(task: Task) -> Checked:
    """Check one drop: its size, then the streaming check (in a worker)."""
    from jobspool import check

    try:
        # Its size now, not as screened: one that grew past max_size meanwhile
        # is not streamed in full only for its verdict to be thrown away.
        size = os.lstat(task.path).st_size
        if size > task.max_size:
            why = f"the file is larger than max_size ({task.max_size} bytes) of {task.interface}"
            return Checked(task.key, [(0, 0, why)])
        schema = None if task.schema is None else Path(task.schema)
        verdict = check.check_file(task.path, schema, task.tree_limit)
    except OSError as exc:
        return Checked(task.key, [], error=exc.strerror or str(exc))
    except Exception as exc:  # a schema that no longer compiles: the drop waits
        return Checked(task.key, [], error=f"{type(exc).__name__}: {exc}")
    return Checked(task.key, [(p.line, p.column, p.message) for p in verdict.problems])


_versions: dict[str, tuple[int, int]] = {}


def _refresh(schema: str | None) -> None:
    """Forget a compiled schema whose file changed since it was compiled here."""
    if schema is None:
        return
    from jobspool import check

    try:
        st = os.stat(schema)
    except OSError:
        return  # the check reports it
    version = (st.st_mtime_ns, st.st_size)
    if _versions.get(schema) != version:
        check.forget_compiled(Path(schema))
        _versions[schema] = version


def serve(tasks_in: int, verdicts_out: int) -> None:
    """A worker's life: a batch of tasks per line in, their verdicts per line out, to EOF."""
    with open(tasks_in, "rb") as reader, open(verdicts_out, "wb", buffering=0) as writer:
        for line in reader:
            tasks = [Task(*t) for t in json.loads(line)]
            for schema in {t.schema for t in tasks}:  # once a batch, not once a drop
                _refresh(schema)
            out = [list(check_task(t)) for t in tasks]
            data = (json.dumps(out) + "\n").encode()
            while data:
                data = data[writer.write(data) or 0 :]


class _Worker:
    """One forked worker and what it was handed."""

    def __init__(self) -> None:
        from jobspool import check  # noqa: F401 - loaded before the fork, not in the child

        tasks_r, tasks_w = os.pipe()
        verdicts_r, verdicts_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its two pipes and stderr, nothing else of the daemon's
            status = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                os.dup2(tasks_r, 0)
                os.dup2(verdicts_w, 1)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                serve(0, 1)
                status = 0
            finally:
                os._exit(status)
        os.close(tasks_r)
        os.close(verdicts_w)
        os.set_blocking(verdicts_r, False)
        self.pid = pid
        self.tasks = tasks_w
        self.out = verdicts_r
        self.buffer = b""
        self.batches: collections.deque[list[Task]] = collections.deque()  # sent, unanswered
        self.large = 0  # of them, those of one large drop: nothing more waits behind one

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a batch is far below a pipe's buffer; a worker reads as it goes
            view = view[os.write(self.tasks, view) :]

    def end(self) -> None:
        """Kill it and wait for it; its pipes are closed."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for fd in (self.tasks, self.out):
            with contextlib.suppress(OSError):
                os.close(fd)


LARGE = 4 << 20  # bytes: a drop this large is checked in a batch of its own


def _large(task: Task) -> bool:
    # The size seen at screening, not a stat per look: a drop that grew since
    # is looked at again anyway when its verdict comes back (it changed).
    return task.size >= LARGE


class CheckPool:
    """Worker processes that check drops; the main loop hands over and reads back."""

    def __init__(self, workers: int) -> None:
        self.size = workers or min(os.cpu_count() or 1, 4)
        self.workers: dict[int, _Worker] = {}  # by output descriptor
        self.waiting: collections.deque[Task] = collections.deque()  # not yet handed over
        self.large: set[Any] = set()  # keys of large drops being checked, each alone

    def start(self) -> None:
        """Fork the workers now: call it while the process has no other thread."""
        self._least_busy()

    def submit(self, tasks: list[Task]) -> None:
        """Check these drops; their verdicts come back from :meth:`read`."""
        self.waiting.extend(tasks)
        self._dispatch()

    def fds(self) -> list[int]:
        """The descriptors to wait on: a worker's verdicts are ready to read."""
        return list(self.workers)

    def read(self, fd: int) -> list[Checked]:
        """What worker ``fd`` has finished (its death gives back its drops unchecked)."""
        worker = self.workers.get(fd)
        if worker is None:
            return []
        out: list[Checked] = []
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        except OSError:
            data = b""
        if not data:  # it died: what it held is looked at again, by a new worker
            self._bury(fd, worker, out)
            return out
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            batch = worker.batches.popleft()
            if len(batch) == 1 and batch[0].key in self.large:
                worker.large -= 1
                self.large.discard(batch[0].key)
            for task, (_, problems, error) in zip(batch, json.loads(line), strict=True):
                out.append(Checked(task.key, [(p[0], p[1], p[2]) for p in problems], error))
        self._dispatch()
        return out

    def busy(self) -> bool:
        """Drops handed over or waiting, not yet answered."""
        return bool(self.waiting) or any(w.batches for w in self.workers.values())

    def close(self) -> None:
        """Stop the workers at once; checks still going are dropped (their drops stay put)."""
        for worker in self.workers.values():
            worker.end()
        self.workers.clear()

    def _dispatch(self) -> None:
        while self.waiting:
            worker = self._least_busy()
            if worker is None:
                return
            batch = self._next_batch()
            line = json.dumps([[n, *t[1:]] for n, t in enumerate(batch)]) + "\n"
            try:
                worker.send(line.encode())
            except OSError:  # it died: its drops and this batch come back from read()
                self.waiting.extendleft(reversed(batch))
                self._bury(worker.out, worker, [])
                continue
            worker.batches.append(batch)
            if len(batch) == 1 and _large(batch[0]):
                worker.large += 1
                self.large.add(batch[0].key)

    def _next_batch(self) -> list[Task]:
        """Up to :data:`BATCH_SIZE` waiting drops; a large one goes alone.

        A worker answers a batch only once all of it is checked: a small drop
        batched with a gigabyte export would wait for the whole export.
        """
        batch = [self.waiting.popleft()]
        if _large(batch[0]):
            return batch
        while self.waiting and len(batch) < BATCH_SIZE and not _large(self.waiting[0]):
            batch.append(self.waiting.popleft())
        return batch

    def _least_busy(self) -> _Worker | None:
        while len(self.workers) < self.size:
            try:
                worker = _Worker()
            except OSError:  # no processes to be had: the drops wait
                break
            self.workers[worker.out] = worker
        # A worker checking a large drop is given nothing more until it is done:
        # a small drop must not wait behind a gigabyte export.
        free = [w for w in self.workers.values() if len(w.batches) < IN_FLIGHT and not w.large]
        return min(free, key=lambda w: len(w.batches), default=None)

    def _bury(self, fd: int, worker: _Worker, out: list[Checked]) -> None:
        del self.workers[fd]
        worker.end()
        for batch in worker.batches:
            self.large.difference_update(t.key for t in batch)
            out += [Checked(t.key, [], error="its check worker died") for t in batch]
