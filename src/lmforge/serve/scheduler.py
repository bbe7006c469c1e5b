"""The server's scheduler: one thread owns the engine and drives it step by step (continuous batching).

Handlers never touch the engine. They hand the scheduler a job (prompt ids + sampling parameters per choice) and
read the engine's outputs from an asyncio queue; the thread takes new jobs and aborts between steps, so a request
joins the running batch at the next step and leaves it the step it ends. The number of accepted, unfinished
requests is bounded: past `max_batch + max_queue` a submit is refused at once (the server answers 503) rather
than queued without limit.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.engine import Engine, StepOutput
from lmforge.sampling import SamplingParams


class Overloaded(Exception):
    """The queue is full or the server is shutting down: come back later (HTTP 503)."""


@dataclass
class Aborted:
    """The request was ended by the server (shutdown past its grace period); what was sent so far stands."""

    index: int


@dataclass
class Job:
    """One HTTP request: its choices (n of them) run as separate engine requests; results come back on `queue`
    as (choice index, StepOutput | Aborted | Exception)."""

    prompts: list[tuple[list[int], SamplingParams]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, StepOutput | Aborted | BaseException]] = field(default_factory=asyncio.Queue)
    id: int = 0
    request_ids: list[int] = field(default_factory=list)  # engine ids, set by the scheduler thread

    def deliver(self, index: int, item: StepOutput | Aborted | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.capacity = engine.max_batch + max_queue
        self.outstanding = 0  # accepted requests (choices) not yet finished
        self.draining = False
        self.peak_running = 0  # the most requests decoded together so far
        self.aborted = 0  # requests dropped because their client went away
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[tuple[str, Job]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._owner: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice index)
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._deadline: float | None = None  # while draining: when the requests still running are ended
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    # ---- called from any thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Accept a job or raise Overloaded; its outputs arrive on job.queue."""
        with self._lock:
            if self.draining:
                raise Overloaded("the server is shutting down")
            if self.outstanding + len(job.prompts) > self.capacity:
                raise Overloaded(f"the server is at capacity ({self.capacity} requests running or queued)")
            self.outstanding += len(job.prompts)
        job.id = next(self._ids)
        self._send("add", job)
        return job

    def abort(self, job: Job) -> None:
        """The client went away: drop whatever of the job is still queued or running."""
        self._send("abort", job)

    def drain(self, grace: float) -> None:
        """Refuse new jobs; let the running ones finish for up to `grace` seconds, then end them (Aborted)."""
        with self._lock:
            self.draining = True
        self._deadline = time.monotonic() + grace
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        running = self.engine.n_running
        return {"running": running, "waiting": max(self.outstanding - running, 0), "capacity": self.capacity}

    def _send(self, what: str, job: Job) -> None:
        self._inbox.put((what, job))
        self._wake.set()

    # ---- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_inbox()
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._end_all(lambda job, index: Aborted(index))
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out of memory: every request in flight fails, the server goes on
                self._end_all(lambda job, index, e=e: e)
                continue
            self.peak_running = max(self.peak_running, len(outputs))
            for out in outputs:
                job, index = self._owner[out.request_id]
                job.deliver(index, out)
                if out.finish_reason is not None:
                    self._done(out.request_id)
        self._end_all(lambda job, index: Aborted(index))

    def _take_inbox(self) -> None:
        while True:
            try:
                what, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add":
                for index, (prompt, params) in enumerate(job.prompts):
                    try:
                        rid = self.engine.add(prompt, params)
                    except Exception as e:  # validated by the handler already; never leave the client hanging
                        job.deliver(index, e)
                        self._release(1)
                        continue
                    job.request_ids.append(rid)
                    self._owner[rid] = (job, index)
            else:
                for rid in job.request_ids:
                    if rid in self._owner and self.engine.abort(rid):
                        self.aborted += 1
                        self._done(rid)

    def _end_all(self, item: Callable[[Job, int], Aborted | BaseException]) -> None:
        """End every request in flight, telling each client `item(job, index)`."""
        for rid, (job, index) in list(self._owner.items()):
            self.engine.abort(rid)
            job.deliver(index, item(job, index))
            self._done(rid)

    def _done(self, rid: int) -> None:
        self._owner.pop(rid, None)
        self._release(1)

    def _release(self, n: int) -> None:
        with self._lock:
            self.outstanding -= n
