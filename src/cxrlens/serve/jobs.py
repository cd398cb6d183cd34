"""Model work in one worker thread behind a bounded queue, with cancellation.

Serialising keeps memory to one image's activations and gradients at a time (torch already uses every
core inside one call); a full queue answers 503 instead of piling up uploads. Work whose client has
gone is not done: a request that waits for its job cancels it when the connection closes, a polled
job is dropped when nobody has asked for it for a while, and running work calls ``job.check()``
between steps (every forward pass of an explanation) so a cancelled job frees the worker at once.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cxrlens.errors import CxrlensError
from cxrlens.serve.engine import RequestError

Work = Callable[["Job"], Any]


class JobCancelled(Exception):  # noqa: N818 - like asyncio.CancelledError: a signal, not an error
    """Raised by :meth:`Job.check` inside running work whose client has gone or asked to stop."""


class Job:
    """One unit of model work: its state, its result (a ``concurrent.futures.Future``) and what its
    work reports while it runs (``progress``, any object the work keeps up to date)."""

    def __init__(self, work: Work, kind: str, polled: bool, abandon_after: float) -> None:
        self.id = secrets.token_urlsafe(12)
        self.work, self.kind = work, kind
        self.future: Future = Future()
        self.state = "queued"  # queued -> running -> done | failed | cancelled
        self.error: RequestError | None = None
        self.progress: Any = None
        self.created = self.last_seen = time.monotonic()
        self.started: float | None = None
        self.polled, self.abandon_after = polled, abandon_after
        self._cancel = threading.Event()

    def seen(self) -> None:
        """A client asked for this polled job: it is still wanted."""
        self.last_seen = time.monotonic()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def abandoned(self) -> bool:
        return self.polled and time.monotonic() - self.last_seen > self.abandon_after

    def cancel(self) -> None:
        """Drop the job if it has not started; otherwise make its next ``check()`` stop it."""
        self._cancel.set()
        self.future.cancel()  # succeeds only while the job is still queued

    def check(self) -> None:
        """Called by running work between steps: raises JobCancelled when the job is no longer wanted."""
        if self._cancel.is_set() or self.abandoned():
            raise JobCancelled


class JobQueue:
    """One worker thread runs jobs in arrival order; at most ``max_waiting`` wait behind the running one."""

    def __init__(self, max_waiting: int = 32, abandon_after: float = 30.0) -> None:
        self.max_waiting, self.abandon_after = max_waiting, abandon_after
        self.stats: Counter = Counter()  # submitted, refused, started, done, failed, dropped, cancelled
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Jobs waiting or running (cancelled ones that the worker has not reached yet excluded)."""
        with self._cond:
            self._prune()
            return len(self._waiting) + (self._running is not None)

    @property
    def running(self) -> Job | None:
        """The job the worker is running now, if any."""
        return self._running

    def _prune(self) -> None:
        """Drop the waiting jobs nobody wants any more (cancelled, or polled jobs nobody asks about) at
        once, with what they hold (an upload's bytes): the queue holds only live jobs. Under the lock."""
        kept: deque[Job] = deque()
        for job in self._waiting:
            if job.abandoned():
                job.cancel()
            if job.cancel_requested:
                job.state = "cancelled"
                self.stats["dropped"] += 1
            else:
                kept.append(job)
        self._waiting = kept

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0 once it runs)."""
        with self._cond:
            if job.state != "queued":
                return 0
            self._prune()
            ahead = next((i for i, other in enumerate(self._waiting) if other is job), len(self._waiting))
            return ahead + (self._running is not None)

    def submit(self, work: Work, kind: str = "job", polled: bool = False) -> Job:
        """Queue ``work(job)``; RequestError 503 when ``max_waiting`` jobs already wait."""
        with self._cond:
            if self._closed:
                raise RequestError(503, "server is shutting down")
            self._prune()
            if len(self._waiting) + (self._running is not None) > self.max_waiting:
                self.stats["refused"] += 1
                raise RequestError(503, f"server busy: {self.max_waiting} requests are waiting; try again shortly")
            job = Job(work, kind, polled, self.abandon_after)
            self._waiting.append(job)
            self.stats["submitted"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cxrlens-model", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def _next(self) -> Job | None:
        """The next job that is still wanted (dropping the others), or None when closed."""
        with self._cond:
            while True:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                job = self._waiting.popleft()
                if job.abandoned():
                    job.cancel()
                if job.future.set_running_or_notify_cancel():
                    job.state, job.started, self._running = "running", time.monotonic(), job
                    self.stats["started"] += 1
                    return job
                job.state = "cancelled"
                self.stats["dropped"] += 1

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                result = job.work(job)
            except JobCancelled:
                job.state, job.error = "cancelled", RequestError(409, "cancelled: the client left or asked to stop")
                self.stats["cancelled"] += 1
                job.future.set_exception(job.error)
            except Exception as exc:  # handed to whoever waits for the job
                job.state, job.error = "failed", _as_request_error(exc)
                self.stats["failed"] += 1
                job.future.set_exception(exc)
            else:
                job.state = "done"
                self.stats["done"] += 1
                job.future.set_result(result)
            finally:
                with self._cond:
                    self._running = None

    async def run(self, work: Work, receive: Callable | None = None, kind: str = "job") -> Any:
        """Queue ``work`` and wait for its result. With ``receive`` (the request's ASGI receive), a
        client that disconnects cancels its job: dropped if it has not started, stopped if it has."""
        job = self.submit(work, kind)
        result = asyncio.wrap_future(job.future)
        if receive is None:
            return await result
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            job.cancel()
            result.cancel()  # nobody will read it
            raise RequestError(409, "cancelled: the client closed the connection")
        return result.result()

    def open(self) -> None:
        """Accept jobs again after :meth:`shutdown` (an app served a second time, as tests do)."""
        if not self._closed:
            return
        if self._thread is not None:
            self._thread.join(60)  # the old worker ends at once: its job, if any, was cancelled
        with self._cond:
            self._closed, self._thread = False, None

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()


def _as_request_error(exc: Exception) -> RequestError:
    """What a poller is told about a failed job: the user's mistake, or only that it failed."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, CxrlensError):
        return RequestError(400, str(exc))
    return RequestError(500, f"internal error ({type(exc).__name__})")


async def _disconnected(receive: Callable) -> None:
    """Returns when the client has closed the connection (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
