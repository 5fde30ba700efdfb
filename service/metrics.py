"""Prometheus metrics of one service instance, in a registry of its own (so that tests can run
several services in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kd_requests", "Inference requests answered, by HTTP status", ["status"], registry=r)
        self.samples = Counter("kd_samples", "Samples answered", registry=r)
        self.cache_hits = Counter("kd_cache_hits", "Samples answered from the cache", registry=r)
        self.cache_misses = Counter("kd_cache_misses", "Samples the teacher computed", registry=r)
        self.stored = Counter("kd_stored_samples", "Samples newly written to the cache", registry=r)
        self.errors = Counter("kd_errors", "Failed requests, by kind", ["kind"], registry=r)
        self.batch_size = Histogram("kd_batch_size", "Samples per teacher forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.teacher_seconds = Histogram("kd_teacher_seconds", "Teacher forward time per batch", buckets=SECONDS_BUCKETS, registry=r)
        self.write_seconds = Histogram(
            "kd_write_seconds", "Cache write time per group commit (journal, fsync, shard)", buckets=SECONDS_BUCKETS, registry=r
        )
        self.queue_samples = Gauge("kd_queue_samples", "Samples waiting for the teacher", registry=r)
        self.queue_bytes = Gauge("kd_queue_bytes", "Input bytes waiting for the teacher", registry=r)
        self.cache_samples = Gauge("kd_cache_samples", "Samples in the cache", registry=r)

    def observe_write(self, stored: int, seconds: float, cache_samples: int) -> None:
        """``CacheStore``'s ``on_write``: one group commit done, from the writer thread."""
        self.write_seconds.observe(seconds)
        self.stored.inc(stored)
        self.cache_samples.set(cache_samples)

    def render(self) -> bytes:
        return generate_latest(self.registry)
