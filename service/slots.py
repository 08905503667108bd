"""Device slots and per-request deadlines: what keeps the requests from harming one another.

* :class:`DeviceSlots`: N segmentations at once plus a bounded FIFO queue; beyond it, 503;
* :class:`Deadline`: a cancel reason and a deadline that the engine's progress callback
  checks, so a client that leaves or a request past its time limit stops at the next batch;
* :func:`run_guarded`: runs the work on an executor, watching the client and the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TypeVar

from starlette.requests import Request

from .http_errors import ClientDisconnectedError, HTTPLayerError, TimeLimitError, UnavailableError

__all__ = ["Deadline", "DeviceSlots", "run_guarded"]

T = TypeVar("T")

_POLL_S = 0.1


class Deadline:
    """One request's deadline and cancel reason, shared by the request coroutine and its worker thread.

    ``at`` is a :func:`time.monotonic` time, ``timeout_s`` the limit it came from (for the
    message). The engine's progress callback calls :meth:`check` between batches: a request
    past its time limit, or cancelled (the client left, the server shuts down), stops there;
    the first reason given is the one raised.

    >>> d = Deadline(time.monotonic() + 60, 60)
    >>> d.check()
    >>> d.cancel(ClientDisconnectedError("client disconnected; work abandoned"))
    >>> d.cancel(UnavailableError("server shutting down", 1))
    >>> d.check()
    Traceback (most recent call last):
    ...
    service.http_errors.ClientDisconnectedError: client disconnected; work abandoned
    """

    def __init__(self, at: float, timeout_s: float) -> None:
        self.at = at
        self.timeout_s = timeout_s
        self.reason: HTTPLayerError | None = None

    def cancel(self, reason: HTTPLayerError) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        """Raise if the work should stop: called between batches, decode and encode."""
        if self.reason is None and time.monotonic() > self.at:
            self.cancel(TimeLimitError(f"the segmentation did not finish within {self.timeout_s:g} s"))
        if self.reason is not None:
            raise self.reason


class DeviceSlots:
    """``slots`` segmentations at once and at most ``queue_size`` more admitted, FIFO."""

    def __init__(self, slots: int, queue_size: int, retry_after_s: int) -> None:
        self.slots = slots
        self.capacity = slots + queue_size
        self.retry_after_s = retry_after_s
        self.admitted = 0
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.stop_at: float | None = None  # set by shut_down(): when work in progress gives up

    def shut_down(self, grace_s: float) -> None:
        """The server began shutting down with ``grace_s`` for requests in progress.

        Nothing new is admitted; a request still queued or running when the grace period
        (less a margin to answer in: half of it, at most 1 s) is over gets 503 with
        ``Retry-After`` from :meth:`check_open`, and its worker stops at the next batch. So
        the app answers before uvicorn cancels what is left.

        >>> s = DeviceSlots(1, 0, 5); s.shut_down(0); s.check_open()
        Traceback (most recent call last):
        ...
        service.http_errors.UnavailableError: server shutting down; the request did not finish within the shutdown grace period, retry later
        """
        self.stop_at = time.monotonic() + max(grace_s - min(1.0, grace_s / 2), 0.0)

    def check_open(self) -> None:
        """Raise 503 once a shutdown's grace period for work in progress is over."""
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            raise UnavailableError(
                "server shutting down; the request did not finish within the shutdown grace period, retry later",
                self.retry_after_s,
            )

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def admit(self) -> None:
        if self.stop_at is not None:
            raise UnavailableError("server shutting down; retry later", self.retry_after_s)
        if self.admitted >= self.capacity:
            raise UnavailableError(
                f"server busy: {self.running} segmentation(s) running and {self.queued} queued "
                f"(capacity {self.capacity}); retry later",
                self.retry_after_s,
            )
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    async def acquire(self, watch: Callable[[], Awaitable[None]]) -> None:
        """Wait for a slot in FIFO order; ``watch()`` runs between polls and may raise to give up."""
        if self.running < self.slots and not self._waiting:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=_POLL_S)
                if not fut.done():
                    await watch()
                    self.check_open()
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed to us as we left: pass it on
            else:
                fut.cancel()
                self._waiting.remove(fut)
            raise

    def release(self) -> None:
        """Hand the slot to the next waiter, or free it."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


async def run_guarded(
    request: Request,
    deadline: Deadline,
    executor: Executor,
    fn: Callable[[], T],
    on_done: Callable[[], None],
    check_open: Callable[[], None] | None = None,
) -> T:
    """Run ``fn`` on ``executor``; cancel ``deadline`` if the client leaves or time runs out.

    ``on_done`` runs when the worker has really finished (not when this coroutine is
    cancelled), so a device slot is never freed while the device is still busy. When
    ``check_open`` raises (:meth:`DeviceSlots.check_open`: a shutdown's grace period is
    over), ``deadline`` is cancelled and the error raised at once: the answer must go out
    before uvicorn cancels the request, the worker stops at its next batch regardless.
    """
    loop = asyncio.get_running_loop()
    try:
        fut = loop.run_in_executor(executor, fn)
    except BaseException:
        on_done()
        raise

    def finished(f: asyncio.Future[T]) -> None:
        on_done()
        if not f.cancelled():
            f.exception()  # retrieved here too: after a shutdown cancel, nobody else will

    fut.add_done_callback(finished)
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=_POLL_S)
            if done:
                return fut.result()
            if await request.is_disconnected():
                deadline.cancel(ClientDisconnectedError("client disconnected; work abandoned"))
            elif time.monotonic() > deadline.at:
                deadline.cancel(TimeLimitError(f"the segmentation did not finish within {deadline.timeout_s:g} s"))
            if check_open is not None:
                try:
                    check_open()
                except HTTPLayerError as e:
                    deadline.cancel(e)
                    raise
    except asyncio.CancelledError:  # server shutdown past its grace period: stop the worker too
        deadline.cancel(UnavailableError("server shutting down", 1))
        raise
