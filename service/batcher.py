"""Dynamic batching: one bounded asyncio queue in front of one worker thread that owns the model.

Requests put their cache misses on the queue as jobs of at most ``max_batch`` samples (for a
language model, tokens: a batch of sequences costs its rows times its longest sequence, which
is what its forward pass computes; ``--max-batch-tokens``). A batching task on the event loop
takes the first waiting job, adds more until the batch is full or ``max_delay`` has passed
since it started, and hands the batch to the
worker thread. It waits only while another request could still join: the route counts the
requests it is handling (``enter``/``leave``), and when every one of them has already queued
its samples, the batch runs at once (one client sending requests one after another never waits
out ``max_delay``). The batch goes to the
worker thread (a one-thread executor, so the model is only ever touched by that thread). At
most two batches are in flight: one running and one formed and waiting, so the worker never
waits for the event loop; a third batch is formed only when a slot frees, from everything that
queued up meanwhile. The event loop is never blocked by the model.

The worker thread runs the teacher and encodes its outputs in the cache's target layout on the
teacher's device (``Teacher.encode``): only the encoded fields come back to the host, and they
are what the journal, the shard and the answer hold, so that a sample's answer does not change
once it is a cache hit. The worker hands the samples that are to be stored to the cache writer
(``CacheStore.write``) and gives each job its fields plus the write's future.
The first thousand samples computed also go to a ``SoftTargetWatch`` (``offline.cache.diagnostics``),
which logs once what their soft targets suggest is wrong with the setup, then looks at no more.

The queue is bounded by bytes, of the inputs and of the targets they will be encoded into: a
request that would take it past ``max_queue_bytes``
is refused at once with ``QueueFull`` (the route answers 503 with ``Retry-After``). Before
that, ``BodyBudget`` bounds the request bodies the server holds at once, from the first byte read
to the answer, so that many clients sending large bodies together cannot pile up memory either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..offline.cache import TargetLayout
from ..offline.cache.diagnostics import SoftTargetWatch
from .metrics import Metrics
from .store import CacheStore


class QueueFull(Exception):
    """The teacher's queue has no room for this request now; try again later."""


class BodyBudget:
    """Bytes of request bodies held at once. Used from the event loop only, so no lock."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``, or refuse. A body larger than the whole budget is taken when
        nothing else is held, so that it is served eventually rather than refused forever."""
        if self.held + nbytes > self.limit and self.held > 0:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


@dataclass
class Job:
    inputs: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    store: bool
    lengths: np.ndarray | None = None  # token counts of a language model's sequences
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    request: Pending | None = None

    @property
    def size(self) -> int:
        return len(self.inputs)

    @property
    def longest(self) -> int:
        """The padded length a batch holding this job runs at: its longest sequence (1 for samples)."""
        return 1 if self.lengths is None else int(self.lengths.max())


@dataclass
class Pending:
    """One request's jobs not yet answered: when the last is, the request can join no batch."""

    jobs: int


@dataclass
class JobResult:
    fields: dict[str, np.ndarray]  # the target layout's fields of the job's samples, as the cache keeps them
    write: Future | None  # the cache write holding this job's samples, if it stores


class Batcher:
    def __init__(
        self,
        encode: Callable[..., dict[str, np.ndarray]],
        *,
        store: CacheStore | None,
        layout: TargetLayout,
        max_batch: int = 256,
        max_delay_s: float = 0.005,
        max_queue_bytes: int = 256 << 20,
        view_seeds: Callable[[np.ndarray], np.ndarray] | None = None,
        draw_seeds: Callable[[np.ndarray], np.ndarray | None] | None = None,
        metrics: Metrics | None = None,
        watch: SoftTargetWatch | None = None,
    ) -> None:
        # (inputs, view seeds, draw seeds, lengths) → the layout's fields, encoded on the teacher's device.
        self.encode = encode
        # ids → the [B, V] seeds of their views, passed to encode, when the teacher serves views.
        self.view_seeds = view_seeds
        self.draw_seeds = draw_seeds  # ids → the draw seeds of a randomized layout
        self.store = store
        # Samples per batch; for a language model, tokens: rows x the batch's longest sequence.
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue_bytes = max_queue_bytes
        self.layout = layout  # the cache's target layout
        self._row_bytes = layout.row_bytes(1 if store is None else store.meta.num_classes)
        self.metrics = metrics or Metrics()
        self.watch = watch  # soft-target statistics of the first computed samples, warned about once
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._queued_bytes = 0
        self._queued_samples = 0
        self._handling = 0  # requests the route is handling (enter/leave)
        self._submitted = 0  # of them, those whose jobs are queued or running

    # -- lifecycle (event loop) -------------------------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._inflight = asyncio.Semaphore(2)
        self._task = asyncio.get_running_loop().create_task(self._batch_loop(), name="batcher")

    async def stop(self) -> None:
        """Finish every queued job, then stop the worker thread."""
        if self._task is None:
            return
        assert self._queue is not None
        await self._queue.join()
        self._task.cancel()
        for _ in range(2):  # wait for the batches in flight
            await self._inflight.acquire()
        self._task = None
        self.executor.shutdown(wait=True)

    def run_in_worker(self, fn: Callable, *args) -> asyncio.Future:
        """Run ``fn`` on the model's thread (warm-up, anything that touches the model)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- requests (event loop) --------------------------------------------------------------
    def enter(self) -> None:
        """A request has arrived: until it leaves or queues its samples, a batch may wait for it."""
        self._handling += 1

    def leave(self) -> None:
        self._handling -= 1

    def _others_may_join(self) -> bool:
        return self._handling > self._submitted

    def submit(self, inputs: np.ndarray, ids: np.ndarray, labels: np.ndarray, store: bool, lengths: np.ndarray | None = None) -> list[Job]:
        """Queue samples for the teacher, split into jobs of at most ``max_batch`` (samples, or
        tokens of a language model's sequences: rows x the longest). The queue's bound counts
        the inputs' bytes and the bytes their encoded targets will take."""
        if self._queue is None or self._task is None:
            raise QueueFull("the teacher is not running")
        nbytes = int(inputs.nbytes) + len(inputs) * self._row_bytes
        if self._queued_bytes and self._queued_bytes + nbytes > self.max_queue_bytes:
            raise QueueFull(f"the teacher's queue is full ({self._queued_samples} samples waiting)")
        longest = 1 if lengths is None else int(lengths.max())
        rows = max(1, self.max_batch // longest)
        jobs = []
        request = Pending(-(-len(inputs) // rows))
        for start in range(0, len(inputs), rows):
            part = slice(start, start + rows)
            jobs.append(Job(inputs[part], ids[part], labels[part], store, None if lengths is None else lengths[part], request=request))
        self._submitted += 1
        for job in jobs:
            self._queue.put_nowait(job)
        self._account(len(inputs), nbytes)
        return jobs

    def _account(self, samples: int, nbytes: int) -> None:
        self._queued_samples += samples
        self._queued_bytes += nbytes
        self.metrics.queue_samples.set(self._queued_samples)
        self.metrics.queue_bytes.set(self._queued_bytes)

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    # -- batching (event loop) --------------------------------------------------------------
    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: Job | None = None
        while True:
            # Take a slot first and only then form the batch: while the worker is busy, requests
            # pile up in the queue, and the next batch is formed from all of them at once.
            await self._inflight.acquire()
            try:
                first = carry or await self._queue.get()
            except asyncio.CancelledError:
                self._inflight.release()
                raise
            carry = None
            batch, size, longest = [first], first.size, first.longest
            deadline = loop.time() + self.max_delay_s
            while size * longest < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not self._others_may_join():
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:  # noqa: UP041 - a different class before Python 3.11
                        break
                if (size + job.size) * max(longest, job.longest) > self.max_batch:
                    carry = job
                    break
                batch.append(job)
                size, longest = size + job.size, max(longest, job.longest)
            self._account(-size, -sum(int(j.inputs.nbytes) + j.size * self._row_bytes for j in batch))
            done = loop.run_in_executor(self.executor, self._run_batch, batch)
            done.add_done_callback(lambda fut, batch=batch: self._finish(fut, batch))

    def _finish(self, done: asyncio.Future, batch: list[Job]) -> None:
        self._inflight.release()
        assert self._queue is not None
        error = done.exception()
        results = None if error is not None else done.result()
        for index, job in enumerate(batch):
            if job.request is not None:
                job.request.jobs -= 1
                if job.request.jobs == 0:
                    self._submitted -= 1
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    assert results is not None
                    job.future.set_result(results[index])
            self._queue.task_done()

    # -- the worker thread ------------------------------------------------------------------
    def _run_batch(self, batch: list[Job]) -> list[JobResult]:
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([job.inputs for job in batch])
        ids = np.concatenate([job.ids for job in batch])
        lengths = None if batch[0].lengths is None else np.concatenate([job.lengths for job in batch])
        started = time.perf_counter()
        views = None if self.view_seeds is None else self.view_seeds(ids)
        draws = None if self.draw_seeds is None else self.draw_seeds(ids)
        fields = self.encode(inputs, views, draws, lengths)
        self.metrics.teacher_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(inputs))
        labels = batch[0].labels if len(batch) == 1 else np.concatenate([job.labels for job in batch])
        if self.watch is not None and not self.watch.done:
            self.watch.observe(self.layout.decode(fields), labels)  # as a cache hit will answer them
        write = None
        offsets = np.cumsum([0] + [job.size for job in batch])
        if self.store is not None and any(job.store for job in batch):
            keep = np.concatenate([np.full(job.size, job.store) for job in batch])
            if keep.all():
                write = self.store.write(ids, inputs, fields, labels)
            else:
                write = self.store.write(ids[keep], inputs[keep], {name: values[keep] for name, values in fields.items()}, labels[keep])
        return [
            JobResult({name: values[offsets[i] : offsets[i + 1]] for name, values in fields.items()}, write if job.store else None)
            for i, job in enumerate(batch)
        ]
