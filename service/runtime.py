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

from ..offline.cache import CacheError, content_ids
from ..offline.cache.diagnostics import SoftTargetWatch
from ..offline.cache.label_names import merge_label_names
from ..offline.cache.manifest import load_namespace
from ..offline.cache.reader import open_storage
from ..offline.cache.rng import view_seeds
from .batcher import Batcher
from .metrics import Metrics
from .protocol import DecodedRequest, ProtocolError, decode_request, encode_response
from .settings import ServeSettings
from .signature import DENSE_LIMIT, InferBatch, ModelSpec, model_metadata, validate
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
        meta = store.meta
        self.tokens = meta.task == "lm"
        self.batcher = Batcher(
            self._encode,
            store=store,
            layout=meta.layout,
            max_batch=settings.max_batch_tokens if self.tokens else settings.max_batch,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_bytes=settings.max_queue_bytes,
            view_seeds=self._view_seeds if meta.has_views else None,
            draw_seeds=meta.draw_seeds if meta.layout.randomized else None,
            metrics=metrics,
            # Once, after the first samples computed: a teacher fed inputs it was not trained on says so here.
            watch=None if self.tokens else SoftTargetWatch(meta.serving_temperature, lambda warning: log.warning("warning: %s", warning)),
        )
        self.spec = _model_spec(settings, teacher, meta)
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
            settings.cache, meta, spool=settings.spool, writer_id=settings.writer_id, durable=settings.ack == "durable",
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
            await self.batcher.run_in_worker(self.teacher.warmup, self.batcher.max_batch)
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
            **(
                {
                    "task": "lm",
                    "vocab_size": self.spec.num_classes,
                    "sequence_length": self.spec.sequence_length,
                    "max_batch_tokens": self.settings.max_batch_tokens,
                }
                if self.tokens
                else {}
            ),
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
        fields, hits = await self._targets(batch)
        n = len(batch.inputs)
        self.metrics.samples.inc(n)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(n - hits)
        parameters = {"cache_hits": hits, "cache_misses": n - hits, "temperature": batch.temperature, "stored": batch.store}
        return encode_response(self.settings.model_name, decoded.id, parameters, self._outputs(batch, fields))

    def _encode(self, inputs: np.ndarray, views: np.ndarray | None, draws: np.ndarray | None, lengths: np.ndarray | None) -> dict:
        """The batcher's call, on the worker thread: the layout's fields, encoded on the teacher's device."""
        return self.teacher.encode(inputs, self.store.meta.layout, views, draws, lengths)

    def _outputs(self, batch: InferBatch, fields: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, bool]]:
        """The requested outputs: the layout's fields as stored, or the dense ones decoded from
        them (what a cache hit answers, fresh or not). A language model's keep the request's
        sequence axis."""
        outputs, logits = [], None
        for requested in batch.outputs:
            if requested.name in ("soft_targets", "logits"):
                if logits is None:
                    logits = self.store.meta.layout.decode(fields)
                    if self.tokens:
                        logits = logits[:, : batch.width]
                values = soft_targets(logits.copy(), batch.temperature) if requested.name == "soft_targets" else logits
            else:
                values = fields[requested.name]
                if self.tokens and values.ndim > 1:
                    values = values[:, : batch.width]
            outputs.append((requested.name, np.ascontiguousarray(values), requested.binary))
        return outputs

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

    def _content_ids(self, batch: InferBatch) -> np.ndarray:
        """The sha256 of each sample's bytes; of a token sequence's ids and its length (padding is zeros)."""
        if batch.lengths is None:
            return content_ids(batch.inputs)
        return content_ids(np.concatenate([batch.inputs, batch.lengths[:, None].astype(np.int64)], axis=1))

    async def _targets(self, batch: InferBatch) -> tuple[dict[str, np.ndarray], int]:
        """The stored target fields of every sample (the layout's), and how many came from the cache."""
        n = len(batch.inputs)
        ids = batch.ids
        if ids is None:
            ids = await run_in_threadpool(self._content_ids, batch) if batch.inputs.nbytes > INLINE_BODY_BYTES else self._content_ids(batch)
        labels = batch.labels if batch.labels is not None else np.full(n, -1, dtype=np.int64)

        if self.store.known(ids):
            rows, hit_fields = await asyncio.wrap_future(self.store.lookup(ids))
        else:
            rows, hit_fields = np.full(n, -1, dtype=np.int64), None
        miss = rows < 0
        misses = int(miss.sum())
        # No await from the check of the label names to their claim: the request is refused
        # (422, or 503 from a full queue) before anything of it is queued or recorded.
        label_names = self._check_label_names(batch)
        if misses:
            lengths = None if batch.lengths is None else batch.lengths[miss] if misses < n else batch.lengths
            if misses == n:
                jobs = self.batcher.submit(batch.inputs, ids, labels, batch.store, lengths)
            else:
                jobs = self.batcher.submit(batch.inputs[miss], ids[miss], labels[miss], batch.store, lengths)
        if label_names is not None:  # admitted: claimed now, durable before the answer
            self._admitted_label_names = label_names
            await self._record_label_names(batch.label_names)
        meta = self.store.meta
        fields = {name: np.empty((n, *shape), dtype=dtype) for name, (shape, dtype) in meta.layout.fields(meta.num_classes).items()}
        if misses < n:
            for name, values in hit_fields.items():
                fields[name][~miss] = values
        if misses:
            results = await asyncio.gather(*(job.future for job in jobs))
            for name in fields:
                fields[name][miss] = results[0].fields[name] if len(results) == 1 else np.concatenate([r.fields[name] for r in results])
            writes = {id(r.write): r.write for r in results if r.write is not None}
            if writes:
                if self.settings.ack == "durable":
                    await asyncio.gather(*(asyncio.wrap_future(w) for w in writes.values()))
                else:
                    for write in writes.values():
                        write.add_done_callback(self._log_buffered_failure)
        return fields, n - misses

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


def _model_spec(settings: ServeSettings, teacher: Any, meta: Any) -> ModelSpec:
    """What requests are checked against: the teacher's input contract and the cache's layout."""
    contract, layout = teacher.contract, meta.layout
    fields = tuple((name, shape, dtype.name) for name, (shape, dtype) in layout.fields(meta.num_classes).items())
    sample_bytes = int(np.prod(contract.input_shape)) * np.dtype(contract.input_dtype).itemsize
    return ModelSpec(
        input_shape=tuple(contract.input_shape),
        input_dtype=contract.input_dtype,
        num_classes=teacher.num_classes,
        temperature=settings.temperature,
        max_samples=max(1, settings.max_queue_bytes // max(1, sample_bytes + layout.row_bytes(meta.num_classes))),
        views=meta.views_per_id,
        task=meta.task,
        fields=() if layout.name == "full" else fields,
        dense=layout.name == "full" or meta.num_classes <= DENSE_LIMIT,
        max_tokens=settings.max_batch_tokens,
        **_fixed_temperature(meta.temperature_rule, layout),
    )


def _target_seed(settings: ServeSettings) -> int:
    """``--target-seed``, else the one the cache records (a restart keeps drawing from the
    cache's stream), else 0."""
    if settings.target_seed is not None:
        return settings.target_seed
    try:
        return load_namespace(open_storage(settings.cache)).meta.target_seed
    except (CacheError, OSError):  # no cache yet (or one the writer will refuse with its own message)
        return 0
