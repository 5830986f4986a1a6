"""Micro-batching: the texts of concurrent requests go through the model in one run.

Like Triton's dynamic batcher: a request waits in a bounded queue; one worker thread per plugin takes the oldest,
then keeps taking requests for up to ``max_wait_ms`` or until ``max_batch`` texts are gathered, and runs them as
one :meth:`Plugin.predict_batch` call (each request still held to its own budget). The model runs off the event
loop. A full queue refuses at once (:class:`QueueFull` → 503 + ``Retry-After``): shedding load beats letting
every request's latency grow without bound.

``max_batch=1`` (or ``max_wait_ms=0`` with no concurrency) runs each request alone: the unbatched baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fhirplug.errors import FhirplugError
from fhirplug.fhir.outcome import Issue
from fhirplug.plugin import Plugin
from fhirplug.predictions import Prediction, TextSource

__all__ = ["MicroBatcher", "QueueFull"]

Outcome = tuple[list[Prediction], list[Issue]]


class QueueFull(FhirplugError):
    """The model queue is full: the request is refused (503) rather than queued without bound."""


@dataclass
class _Job:
    sources: list[TextSource]
    names: list[str | None]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome] = field(repr=False)


class MicroBatcher:
    """A bounded queue and one model thread for one plugin.

    Args:
        plugin: the loaded plugin.
        max_batch: most texts per model run (a request with more runs alone, whole).
        max_wait_ms: how long the first request of a batch waits for batch-mates.
        queue_size: requests waiting at most; one more is refused with :class:`QueueFull`.
        observe: called with (texts in the batch, requests in it) after each run (metrics).
    """

    def __init__(
        self,
        plugin: Plugin,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        self.plugin = plugin
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._observe = observe
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model now."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"fhirplug-model-{self.plugin.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs taken, then end the worker (waits for room in a full queue)."""
        if self._thread is not None:
            self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None

    async def submit(self, sources: list[TextSource], names: list[str | None]) -> Outcome:
        """Predict one request's texts (its own budget), batched with whatever else is waiting.

        Raises:
            QueueFull: the queue holds ``queue_size`` requests already.
            ProviderError: onnxruntime failed on the batch.
        """
        loop = asyncio.get_running_loop()
        job = _Job(sources, names, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the model queue of {self.plugin.name} is full ({self._queue.maxsize} waiting)") from None
        return await job.future

    def _take(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        texts = len(first.sources)
        deadline = time.monotonic() + self.max_wait_s
        while texts < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: run what was taken, then end
                self._queue.put_nowait(None)
                break
            jobs.append(job)
            texts += len(job.sources)
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                outcomes = self.plugin.predict_batch([j.sources for j in jobs], names=[j.names for j in jobs])
            except BaseException as exc:  # every waiting request gets the failure, none waits forever
                for job in jobs:
                    _deliver(job, _fail, exc)
                continue
            if self._observe is not None:
                self._observe(sum(len(j.sources) for j in jobs), len(jobs))
            for job, outcome in zip(jobs, outcomes, strict=True):
                _deliver(job, _succeed, outcome)


def _deliver(job: _Job, how: Callable[[asyncio.Future[Outcome], Any], None], value: Any) -> None:
    # RuntimeError: the event loop is closed (shutting down): nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(how, job.future, value)


def _succeed(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():  # the client may have gone away (cancelled)
        future.set_result(outcome)


def _fail(future: asyncio.Future[Outcome], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
