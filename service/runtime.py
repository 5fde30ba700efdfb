"""One running service: the teacher, its batcher, the cache store and the metrics, and the answer
to one inference request.

``TeacherService.handle`` takes a request body as sent: ``service.protocol`` decodes it,
``service.signature`` validates it against the model, the cache store answers the samples it
already holds, the batcher runs the others through the teacher (and hands them to the store),
and the answer is encoded back. Refusals are exceptions (``ProtocolError``, ``QueueFull``,
``ServiceUnavailable``, ``StoreError``) that ``service.app`` maps to HTTP statuses. Nothing here
touches HDF5 or the model directly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..offline.cache import CacheError, LocalStorage, content_ids
from ..offline.cache.diagnostics import SoftTargetWatch
from ..offline.cache.label_names import merge_label_names
from ..offline.cache.manifest import load_manifest
from ..offline.cache.rng import view_seeds
from .batcher import Batcher
from .metrics import Metrics
from .protocol import DecodedRequest, ProtocolError, decode_request, encode_response
from .settings import ServeSettings
from .signature import InferBatch, ModelSpec, model_metadata, validate
from .store import CacheStore

log = logging.getLogger("teacher-serve")

# Below these sizes decoding and hashing are cheaper than a hop to the thread pool.
INLINE_BODY_BYTES = 256 << 10


class ServiceUnavailable(Exception):
    """The service cannot answer yet (the teacher is warming up)."""


def soft_targets(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis (classes), in float32."""
    # Shift, then scale: softmax is shift-invariant, and a tiny temperature then sends the other
    # logits to -inf (exp 0) where logits / T overflowed and inf - inf made NaN soft targets, sent
    # as NaN literals, which are not JSON (found by tests/test_fuzz.py).
    z = logits - logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        z /= np.float32(temperature)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class TeacherService:
    """Everything one running service holds: the teacher, its batcher, the cache, metrics.
    ``open`` builds one from the settings; the constructor takes the parts."""

    def __init__(self, settings: ServeSettings, teacher: Any, store: CacheStore, metrics: Metrics, api_key: str | None = None) -> None:
        self.settings = settings
        self.teacher = teacher
        self.store = store
        self.api_key = api_key
        self.metrics = metrics
        self.metrics.cache_samples.set(store.num_samples)
        self.batcher = Batcher(
            teacher.forward,
            store=store,
            max_batch=settings.max_batch,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_bytes=settings.max_queue_bytes,
            layout=store.meta.layout,
            view_seeds=self._view_seeds if store.meta.has_views else None,
            metrics=metrics,
            # Once, after the first samples computed: a teacher fed inputs it was not trained on says so here.
            watch=SoftTargetWatch(store.meta.serving_temperature, lambda warning: log.warning("warning: %s", warning)),
        )
        contract = teacher.contract
        layout = store.meta.layout
        self.spec = ModelSpec(
            input_shape=tuple(contract.input_shape),
            input_dtype=contract.input_dtype,
            num_classes=teacher.num_classes,
            temperature=settings.temperature,
            max_samples=max(
                1, settings.max_queue_bytes // max(1, int(np.prod(contract.input_shape)) * np.dtype(contract.input_dtype).itemsize)
            ),
            views=store.meta.views_per_id,
            **_fixed_temperature(store.meta.temperature_rule, layout),
        )
        self.ready = False
        self._warmup: asyncio.Task | None = None
        # The label names of every request admitted so far, recorded or about to be: a request is
        # checked against these, so that two admitted requests never number the classes apart.
        self._admitted_label_names: list[str] | None = store.label_names

    @classmethod
    def open(cls, settings: ServeSettings, teacher: Any, api_key: str | None = None) -> TeacherService:
        """Open the cache for ``teacher`` as the settings say (raises ``CacheError`` for a cache of
        another teacher, ``OSError`` for one it cannot open) and build the service around it."""
        metrics = Metrics()
        meta = teacher.cache_meta(settings.logits_dtype, settings.targets, _target_seed(settings))
        store = CacheStore(
            settings.cache, meta, durable=settings.ack == "durable",
            max_shard_samples=settings.shard_samples, max_shard_bytes=int(settings.shard_mb * (1 << 20)), on_write=metrics.observe_write,
        )  # fmt: skip
        try:
            return cls(settings, teacher, store, metrics, api_key)
        except BaseException:
            store.close()
            raise

    async def start(self) -> None:
        self.batcher.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            await self.batcher.run_in_worker(self.teacher.warmup, self.settings.max_batch)
        except Exception:
            log.exception("teacher warm-up failed; the service stays not ready")
            return
        self.ready = True
        log.info("ready: model %r, %d samples in the cache", self.settings.model_name, self.store.num_samples)

    async def stop(self) -> None:
        self.ready = False
        if self._warmup is not None and not self._warmup.done():
            await asyncio.gather(self._warmup, return_exceptions=True)
        await self.batcher.stop()
        await run_in_threadpool(self.store.close)
        log.info("stopped: cache %s holds %d samples, all published", self.store.directory, self.store.num_samples)

    def model_metadata(self) -> dict[str, Any]:
        parameters = {
            "temperature": self.settings.temperature,
            "ack": self.settings.ack,
            "max_batch": self.settings.max_batch,
            "cache_samples": self.store.num_samples,
            "teacher": self.teacher.describe(),
            "label_names": self.store.label_names,
            "targets": self.store.meta.logits_layout,
            # Whether a request may ask for another temperature than the serving one; when not, why.
            "fixed_temperature": self.spec.fixed_temperature,
            **({"fixed_temperature_reason": self.spec.fixed_temperature_reason} if self.spec.fixed_temperature else {}),
        }
        return model_metadata(self.settings.model_name, self.spec, parameters)

    # -- inference --------------------------------------------------------------------------
    async def handle(self, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """An inference request body as sent, with its ``Inference-Header-Content-Length`` header
        → the response body and its HTTP headers."""
        if len(body) > INLINE_BODY_BYTES:
            decoded = await run_in_threadpool(decode_request, body, header_length)
        else:
            decoded = decode_request(body, header_length)
        return await self._answer(decoded)

    async def _answer(self, decoded: DecodedRequest) -> tuple[bytes, dict[str, str]]:
        batch = validate(decoded, self.spec)
        if not self.ready:
            raise ServiceUnavailable("the teacher is still warming up")
        logits, hits = await self._logits(batch)
        n = len(logits)
        self.metrics.samples.inc(n)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(n - hits)
        outputs = []
        for requested in batch.outputs:
            values = soft_targets(logits, batch.temperature) if requested.name == "soft_targets" else logits
            outputs.append((requested.name, values, requested.binary))
        parameters = {"cache_hits": hits, "cache_misses": n - hits, "temperature": batch.temperature, "stored": batch.store}
        return encode_response(self.settings.model_name, decoded.id, parameters, outputs)

    def _check_label_names(self, batch: InferBatch) -> list[str] | None:
        """The label names the cache will know once ``batch`` is admitted (None: no change), or
        a 422 when they conflict with those of the requests admitted before, like any request the
        cache cannot take. On the event loop, with no await before the batch is queued."""
        if batch.label_names is None:
            return None
        try:
            merged = merge_label_names(self._admitted_label_names, batch.label_names, "label_names")
        except CacheError as exc:
            raise ProtocolError(422, None, str(exc)) from None
        return merged if batch.store else None

    async def _record_label_names(self, names: list[str]) -> None:
        """Record an admitted request's label names, durably in the manifest, before any of its
        samples is answered; nothing when the manifest has them already (every request of a push
        after its first)."""
        try:
            recorded = self.store.label_names
            if recorded is not None and merge_label_names(recorded, names, "label_names") == recorded:
                return
            await asyncio.wrap_future(self.store.record_label_names(names))
        except CacheError as exc:
            raise ProtocolError(422, None, str(exc)) from None

    def _view_seeds(self, ids: np.ndarray) -> np.ndarray:
        meta = self.store.meta
        return view_seeds(meta.view_salt, ids, meta.views_per_id)

    async def _logits(self, batch: InferBatch) -> tuple[np.ndarray, int]:
        """The stored logits of every sample, [n, C] ([n, V, C] with views), and how many came
        from the cache."""
        n = len(batch.inputs)
        ids = batch.ids
        if ids is None:
            ids = (
                await run_in_threadpool(content_ids, batch.inputs) if batch.inputs.nbytes > INLINE_BODY_BYTES else content_ids(batch.inputs)
            )
        labels = batch.labels if batch.labels is not None else np.full(n, -1, dtype=np.int64)

        if self.store.known(ids):
            rows, hit_logits = await asyncio.wrap_future(self.store.lookup(ids))
        else:
            rows, hit_logits = np.full(n, -1, dtype=np.int64), None
        miss = rows < 0
        misses = int(miss.sum())
        # No await from the check of the label names to their claim: the request is refused
        # (422, or 503 from a full queue) before anything of it is queued or recorded.
        label_names = self._check_label_names(batch)
        if misses:
            if misses == n:
                jobs = self.batcher.submit(batch.inputs, ids, labels, batch.store)
            else:
                jobs = self.batcher.submit(batch.inputs[miss], ids[miss], labels[miss], batch.store)
        if label_names is not None:  # admitted: claimed now, durable before the answer
            self._admitted_label_names = label_names
            await self._record_label_names(batch.label_names)
        logits = np.empty((n, *self.store.meta.teacher_output_shape()), dtype=np.float32)
        if misses < n:
            logits[~miss] = hit_logits
        if misses:
            results = await asyncio.gather(*(job.future for job in jobs))
            logits[miss] = results[0].logits if len(results) == 1 else np.concatenate([r.logits for r in results])
            writes = {id(r.write): r.write for r in results if r.write is not None}
            if writes:
                if self.settings.ack == "durable":
                    await asyncio.gather(*(asyncio.wrap_future(w) for w in writes.values()))
                else:
                    for write in writes.values():
                        write.add_done_callback(self._log_buffered_failure)
        return logits, n - misses

    def _log_buffered_failure(self, write: Any) -> None:
        if write.exception() is not None:
            self.metrics.errors.labels(kind="buffered_write").inc()
            log.error("a buffered write was lost: %s", write.exception())


def _fixed_temperature(rule: str, layout: Any) -> dict[str, Any]:
    """ModelSpec's ``fixed_temperature`` and its reason: a cache hit answers what the cache keeps,
    so a layout defined only at the serving temperature fixes it, as the rule "serving" does."""
    if layout.fixed_temperature:
        reason = f"this model's cache keeps {layout.spec} targets, which are defined only at the serving temperature"
        return {"fixed_temperature": True, "fixed_temperature_reason": reason}
    if rule == "serving":
        return {"fixed_temperature": True}
    return {}


def _target_seed(settings: ServeSettings) -> int:
    """``--target-seed``, else the one the cache records (a restart keeps drawing from the
    cache's stream), else 0."""
    if settings.target_seed is not None:
        return settings.target_seed
    try:
        return load_manifest(LocalStorage(settings.cache)).meta.target_seed
    except CacheError:  # no cache yet (or one the writer will refuse with its own message)
        return 0
