"""Dynamic batching: concurrent requests join one forward pass, on a worker thread that owns the model.

A request submits its prepared images as one job and awaits an asyncio future. The worker takes the first job
waiting, then keeps taking jobs until the batch holds `max_batch` images or `max_wait_ms` has passed since that
first job arrived, runs them through the model together, and hands each job its own answers. It waits only while
another request is on its way (announced with `expecting()` when the server starts reading it, not yet submitted):
a lone request runs at once instead of sitting out the wait. A job is never split across batches; a job larger
than `max_batch` runs alone. The event loop only enqueues and awaits: it never runs the model.

When a batched forward fails, the worker retries its jobs one by one, so one bad input fails only its own request.
Jobs whose request gave up (timed out, or the client left) are skipped when they come up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("visrec.serve")


@dataclass
class Job:
    items: list[Any]
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Set the outcome, on the event loop's thread (a job whose request gave up is left alone)."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


def settle(outcomes: list[tuple[Job, Any, BaseException | None]]) -> None:
    """Hand each job its outcome with one wake-up of each event loop (not one per job)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, result, error in outcomes:
        by_loop.setdefault(job.loop, []).append((job, result, error))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(lambda items=items: [job.resolve(r, e) for job, r, e in items])


class Batcher:
    """One worker thread per model. `run_batch(jobs) -> list of per-job results` is called on that thread only."""

    def __init__(self, run_batch: Callable[[list[Job]], list[Any]], *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 name: str = "model", on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: Job | None = None
        self._thread = threading.Thread(target=self._work, name=f"visrec-batcher-{name}", daemon=True)
        self._stopping = False
        self.coming = 0  # requests announced and not yet submitted (changed on the event loop, read by the worker)
        self._thread.start()

    @contextlib.contextmanager
    def expecting(self):
        """Announce a request that will submit soon (its body is being read and decoded), so that the worker waits
        for it; the announcement ends when it submits or gives up. Event-loop side only."""
        self.coming += 1
        ticket = {"open": True}
        try:
            yield ticket
        finally:
            if ticket["open"]:
                self.coming -= 1

    async def submit(self, items: list[Any], ticket: dict | None = None, timeout: float | None = None,
                     **options: Any) -> Any:
        """Queue `items` as one job and wait for its result (what `run_batch` gave this job); TimeoutError after
        `timeout` seconds, and the job is skipped if it has not run yet."""
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        loop = asyncio.get_running_loop()
        job = Job(items, options, loop, loop.create_future())
        self._queue.put(job)
        if ticket is not None and ticket["open"]:
            ticket["open"] = False
            self.coming -= 1
        # a timer on the future, not asyncio.wait_for: that wraps every request in a task of its own
        timer = loop.call_later(timeout, job.future.cancel) if timeout is not None else None
        try:
            return await job.future
        except asyncio.CancelledError:
            if timer is not None and job.future.cancelled() and loop.time() >= timer.when():
                raise TimeoutError from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every queued job, then end the worker."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the worker thread

    def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _work(self) -> None:
        done = False
        while not done:
            first = self._next(None)
            if first is None:
                break
            if first.future.cancelled():
                continue
            jobs, size = [first], len(first.items)
            deadline = first.queued + self.max_wait
            while size < self.max_batch:
                if self.coming <= 0 and self._carry is None and self._queue.empty():
                    break  # nobody else is on the way: waiting would only add latency
                try:
                    job = self._next(deadline - time.perf_counter())
                except queue.Empty:
                    break
                if job is None:
                    done = True  # stop after this batch: everything queued before the sentinel is in it or done
                    break
                if job.future.cancelled():
                    continue
                if size + len(job.items) > self.max_batch:
                    self._carry = job
                    break
                jobs.append(job)
                size += len(job.items)
            self._run(jobs, size)
        if self._carry is not None:
            self._run([self._carry], len(self._carry.items))
        while True:  # jobs that raced the sentinel
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.cancelled():
                self._run([job], len(job.items))

    def _run(self, jobs: list[Job], size: int) -> None:
        try:
            results = self.run_batch(jobs)
        except Exception as e:  # noqa: BLE001 - given back to its request, or retried job by job
            if len(jobs) == 1:
                settle([(jobs[0], None, e)])
                return
            log.warning("a batch of %d requests failed (%s); running them one by one", len(jobs), e)
            for job in jobs:
                self._run([job], len(job.items))
            return
        if self.on_batch is not None:
            self.on_batch(size)
        settle([(job, result, None) for job, result in zip(jobs, results, strict=True)])
