"""``teacher-push``: send a transfer set to a teacher service, which caches the teacher's outputs.

The push loop (``push_arrays``, ``push_source``; ``TeacherClient.push`` and ``push_source`` call
them) keeps a bounded window of requests in flight from ``concurrency`` threads, batch ``k`` to
the client's replica ``k`` in turn (so a re-push with the same batches meets each sample's cache
again), shows the progress and adds up the summary. The command reads ``--data`` (an .npz whole,
anything else as a ``Source`` streamed batch by batch) fitted to the model's metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..offline.cache import CacheError, normalize_ids, read_transfer_set
from ..offline.cache.label_names import merge_label_names
from ..offline.cache.transfer_set import DEFAULT_MAX_NPZ_MB
from ..offline.malloc import return_large_blocks
from ..offline.sources import (
    DEFAULT_MAX_PIXELS,
    ON_ERROR,
    RESIZE_MODES,
    TEXT_OPTIONS,
    SampleSpec,
    Source,
    SourceBatch,
    TokenSpec,
    fit_inputs,
    is_token_npz,
    open_source,
)
from .client import ClientError, InferResult, TeacherClient, one_line

DEFAULT_URL = "http://127.0.0.1:8000"  # where teacher-serve listens unless told otherwise


@dataclass
class PushSummary:
    samples: int
    cache_hits: int
    cache_misses: int
    seconds: float
    requests: int
    retries: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason) the source could not read
    answered: dict[str, int] = field(default_factory=dict)  # requests each replica answered, by its URL

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def add(self, samples: int, result: InferResult, retries: int) -> None:
        """Count one answered request of ``samples`` samples."""
        self.samples += samples
        self.cache_hits += result.cache_hits
        self.cache_misses += result.cache_misses
        self.requests += 1
        self.retries += retries
        self.answered[result.replica_url] = self.answered.get(result.replica_url, 0) + 1

    def line(self) -> str:
        return (
            f"{self.samples} samples, {self.cache_hits} hits, {self.cache_misses} misses, {self.seconds:.1f} s, "
            f"{self.samples_per_s:.0f} samples/s ({self.requests} requests, {self.retries} retries)"
            + (f", answered: {', '.join(f'{url} {count}' for url, count in self.answered.items())}" if len(self.answered) > 1 else "")
            + (f", {len(self.skipped)} skipped: {describe_skipped(self.skipped)}" if self.skipped else "")
        )


@dataclass
class PushBatch:
    inputs: np.ndarray
    ids: Any  # None: the server keys the samples by their content
    labels: Any  # None: unknown
    input_name: str = "input"  # a language model's: input_ids
    extra: list[tuple[str, np.ndarray]] = field(default_factory=list)  # more named input tensors (lengths)


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = 3) -> str:
    """The first ``limit`` skipped items with their reasons, and how many more."""
    named = "; ".join(f"{item} ({one_line(reason, 120)})" for item, reason in skipped[:limit])
    return named + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")


def numbered_as_recorded(source: Source, recorded: Any) -> Source:
    """``source``, or ``source`` numbered by the class names a cache records (``recorded``, from the
    model metadata) where its own names conflict with them but are all among them (a folder of
    some of the classes), so that only real conflicts reach the service, which refuses them."""
    if source.label_names is None or not isinstance(recorded, list) or not recorded:
        return source
    try:
        merge_label_names(recorded, source.label_names, "")
    except CacheError:
        if set(source.label_names) <= set(recorded):
            return source.numbered_by(recorded)
    return source


def _check_push_options(batch_size: int, concurrency: int) -> None:
    if batch_size < 1 or concurrency < 1:
        raise ClientError(f"batch_size and concurrency must be at least 1, got {batch_size} and {concurrency}")


def length_input_of(metadata: dict[str, Any]) -> str | None:
    """The input a language model takes sequence lengths by: ``lengths``, else ``attention_mask``, else None."""
    names = {t.get("name") for t in metadata.get("inputs") or [] if isinstance(t, dict)}
    return next((name for name in ("lengths", "attention_mask") if name in names), None)


def token_batch_size(batch_size: int, width: int, metadata: dict[str, Any]) -> int:
    """``batch_size`` sequences, or fewer where the model's ``max_batch_tokens`` parameter (the
    tokens one request may cost: sequences x the longest) would refuse that many ``width`` long."""
    budget = (metadata.get("parameters") or {}).get("max_batch_tokens")
    if type(budget) is not int or budget < 1:
        return batch_size
    return max(1, min(batch_size, budget // max(1, width)))


def token_batch(batch: SourceBatch, length_input: str | None, where: str) -> PushBatch:
    """A token source's batch as a request carries it: ``input_ids`` [B, l] INT64, and, when a
    row is shorter than l, ``lengths`` [B] (or an ``attention_mask`` [B, l] of 1s then 0s)."""
    extra = []
    if batch.lengths is not None:
        if length_input is None:
            raise ClientError(f"{where}: the model takes neither lengths nor attention_mask, and a sequence is shorter than the others")
        lengths = batch.lengths.astype(np.int64)
        if length_input == "lengths":
            extra.append(("lengths", lengths))
        else:
            extra.append(("attention_mask", (np.arange(batch.inputs.shape[1]) < lengths[:, None]).astype(np.int64)))
    return PushBatch(batch.inputs.astype(np.int64, copy=False), batch.ids, None, input_name="input_ids", extra=extra)


# ---------------------------------------------------------------------------------------------
# The push loop


def push_arrays(
    client: TeacherClient,
    inputs: Any,
    *,
    ids: Any = None,
    labels: Any = None,
    batch_size: int = 256,
    concurrency: int = 4,
    temperature: float | None = None,
    progress: bool = True,
) -> PushSummary:
    """Send every sample of in-memory arrays (store=true) in batches from ``concurrency``
    threads; stops at the first request that fails for good. Re-pushing what is cached
    already costs only hits."""
    _check_push_options(batch_size, concurrency)
    inputs = np.asarray(inputs)
    count = len(inputs)
    try:
        ids = None if ids is None else normalize_ids(ids, count)
    except ValueError as exc:
        raise ClientError(f"ids: {exc}") from None
    labels = None if labels is None else np.asarray(labels)
    batches = (
        PushBatch(
            inputs[start : start + batch_size],
            None if ids is None else ids[start : start + batch_size],
            None if labels is None else labels[start : start + batch_size],
        )
        for start in range(0, count, batch_size)
    )
    return push_batches(client, batches, count, concurrency=concurrency, temperature=temperature, progress=progress)


def push_source(
    client: TeacherClient,
    source: Source,
    *,
    batch_size: int = 256,
    concurrency: int = 4,
    temperature: float | None = None,
    progress: bool = True,
) -> PushSummary:
    """Stream a ``Source`` (kdcache.offline.sources) to the service as ``push_arrays`` sends
    arrays: the source decodes batch by batch, so at most the window of requests in flight
    is held, never the whole set. Every request carries the source's ``label_names``, which
    the service records in the cache's manifest (and refuses when they conflict with the
    recorded ones); a source of some of the recorded classes is numbered as the cache numbers
    them first (``numbered_as_recorded``). The summary lists the items the source skipped. A
    token source (a ``TokenSpec``) is sent as ``input_ids`` with ``lengths`` (``token_batch``),
    in batches the model's token budget allows (``token_batch_size``)."""
    _check_push_options(batch_size, concurrency)
    if source.label_names is not None:
        source = numbered_as_recorded(source, (client.metadata().get("parameters") or {}).get("label_names"))
    if isinstance(source.spec, TokenSpec):
        metadata, where = client._metadata()
        length_input = length_input_of(metadata)
        batch_size = token_batch_size(batch_size, getattr(source, "width", 1), metadata)
        batches = (token_batch(batch, length_input, where) for batch in source.batches(batch_size))
    else:
        batches = (PushBatch(batch.inputs, batch.ids, batch.labels) for batch in source.batches(batch_size))
    summary = push_batches(
        client, batches, source.total(), concurrency=concurrency, temperature=temperature, progress=progress,
        label_names=source.label_names, skipped=source.skipped,
    )  # fmt: skip
    summary.skipped = list(source.skipped)
    return summary


def push_batches(
    client: TeacherClient,
    batches: Iterator[PushBatch],
    total: int | None,  # None: unknown (text, counted as it is tokenized)
    *,
    concurrency: int,
    temperature: float | None,
    progress: bool,
    label_names: list[str] | None = None,
    skipped: Sequence[Any] = (),  # grows while ``batches`` runs; counted on the progress bar
) -> PushSummary:
    """The one push loop: a bounded window of requests in flight, filled from ``batches``
    on this thread as requests complete (so a source decodes while the server works)."""
    summary = PushSummary(samples=0, cache_hits=0, cache_misses=0, seconds=0.0, requests=0, retries=0)
    summary.answered = dict.fromkeys(client.urls, 0)
    started = time.perf_counter()

    def send(batch: PushBatch, turn: int) -> tuple[InferResult, int]:
        return client._infer(
            batch.inputs, ids=batch.ids, labels=batch.labels, temperature=temperature, store=True, outputs=(),
            binary=True, label_names=label_names, input_name=batch.input_name, extra=batch.extra, turn=turn,
        )  # fmt: skip

    with tqdm(total=total, unit="sample", desc="push", disable=not progress, file=sys.stderr) as bar:
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-push")
        pending: dict[Future[tuple[InferResult, int]], int] = {}
        counted_skips = 0
        sent = 0

        def submit_next() -> bool:
            nonlocal sent
            batch = next(batches, None)
            if batch is None:
                return False
            pending[pool.submit(send, batch, sent)] = len(batch.inputs)
            sent += 1
            return True

        try:
            # A bounded window of batches in flight: enough to keep every worker busy.
            while len(pending) < 2 * concurrency and submit_next():
                pass
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    samples = pending.pop(future)
                    result, retries = future.result()
                    summary.add(samples, result, retries)
                    bar.update(samples + len(skipped) - counted_skips)
                    counted_skips = len(skipped)
                    postfix = {"hits": summary.cache_hits, "misses": summary.cache_misses}
                    bar.set_postfix(**postfix, **({"skipped": counted_skips} if counted_skips else {}), refresh=False)
                    submit_next()
            bar.update(len(skipped) - counted_skips)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------------------------------
# teacher-push


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="teacher-push",
        description="Send a transfer set to a teacher service, which caches the teacher's outputs: an .npz (inputs, optional "
        "labels and ids, read whole), an .npy, a folder of images (one sub-folder per class: the labels), Parquet "
        "files or a saved Hugging Face dataset (these decoded as they stream), each fitted to the model's input shape and "
        "dtype. A language-model teacher takes token sequences instead: an .npz of input_ids (optional lengths and ids), or "
        "a .txt, .jsonl or Parquet text tokenized with --tokenizer and packed into --seq-len tokens. Safe to re-run: samples "
        "cached already come back as hits.",
    )  # each help states its default: the service imports no CLI helper from offline/ (tests/test_boundaries.py)
    p.add_argument(
        "--url", action="append", metavar="URL",
        help="the service, e.g. http://gpu-host:8000 (default: http://127.0.0.1:8000, where teacher-serve listens unless told "
        "otherwise); repeat for replicas (one teacher-serve each): each request goes to the next in turn, and one a replica "
        "fails (unreachable, timed out, 5xx) to another",
    )  # fmt: skip
    p.add_argument("--data", required=True, metavar="SOURCE", help="transfer set: .npz, .npy, image folder, Parquet file or folder, "
                   "Hugging Face save_to_disk folder; for a language model, an .npz of input_ids or .txt, .jsonl, Parquet text")  # fmt: skip
    p.add_argument(
        "--model", default="teacher", help="the model's name in the service's URLs (teacher-serve --model-name; default: teacher)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, help="samples per request (default: 256)")
    p.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (default: 4)")
    p.add_argument(
        "--temperature", type=float, default=None, help="temperature of the soft targets (default: the service's serving temperature)"
    )
    p.add_argument("--api-key-env", metavar="VAR", default=None, help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument("--max-retries", type=int, default=8, help="per request, on 429/503 and connection failures (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # Source options: None when not given, so that an .npz (read whole) can refuse them.
    p.add_argument("--resize", choices=RESIZE_MODES, default=None, help="images: scale the short side to fit and center-crop "
                   "(short-side, the default), or stretch to the model's size")  # fmt: skip
    p.add_argument("--input-column", metavar="NAME", help="Parquet/Hugging Face: the inputs (default: image, img or pixel_values)")
    p.add_argument("--label-column", metavar="NAME", help="Parquet/Hugging Face: the labels (default: label or labels)")
    p.add_argument("--id-column", metavar="NAME", help="Parquet/Hugging Face: the ids (default: id, else FILE:ROW)")
    p.add_argument("--on-error", choices=ON_ERROR, default=None, help="a bad item (an image that does not decode, a label out "
                   "of range): stop at it (the default) or skip it and name it in the summary")  # fmt: skip
    p.add_argument("--workers", type=_positive_int, default=None, help="image-decoding threads (default: the CPU count)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="images: the most pixels one may decode into, read from "
                   f"its header (a JPEG's at the scale it decodes at); a larger one is a bad item (default: {DEFAULT_MAX_PIXELS:,})")  # fmt: skip
    p.add_argument("--max-npz-mb", type=_positive_int, default=DEFAULT_MAX_NPZ_MB, help="an .npz is read whole: the most MiB "
                   f"its inputs, labels or ids may take (default: {DEFAULT_MAX_NPZ_MB}; an .npy is memory-mapped instead)")  # fmt: skip
    # Text for a language-model teacher (its metadata has "task": "lm"); None when not given, so other teachers refuse them.
    p.add_argument("--tokenizer", metavar="DIR", help="text (.txt, .jsonl, Parquet) for a language-model teacher: the Hugging "
                   "Face tokenizer directory (its tokenizer.json) to tokenize it with; needs pip install 'kdcache[lm]'")  # fmt: skip
    p.add_argument("--text-column", metavar="NAME", help="JSONL/Parquet text: the field or column holding each document (default: text)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="text: tokens per packed sequence, at most the model's "
                   "(default: the model's sequence_length)")  # fmt: skip
    return p


SOURCE_OPTIONS = ("resize", "input_column", "label_column", "id_column", "on_error", "workers", "max_pixels")
IMAGE_OPTIONS = ("resize", "input_column", "label_column", "id_column", "workers", "max_pixels")  # not for token sequences


def _flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def _refuse_misplaced_options(args: argparse.Namespace, spec: SampleSpec | TokenSpec, url: str) -> None:
    """A language model refuses the image and column options; other models refuse the text ones."""
    if isinstance(spec, TokenSpec) and (misplaced := _flags(args, IMAGE_OPTIONS)):
        raise ClientError(f"{' '.join(misplaced)}: for images and arrays; {url} serves a language model, which takes token sequences")
    if not isinstance(spec, TokenSpec) and (misplaced := _flags(args, TEXT_OPTIONS)):
        raise ClientError(f"{' '.join(misplaced)}: for text and a language-model teacher; {url} takes fixed-shape inputs")


def open_push_source(client: TeacherClient, args: argparse.Namespace, spec: SampleSpec | TokenSpec | None = None) -> Source:
    """``--data`` opened as a source fitted to the model's metadata (``push_source`` numbers its
    classes as the cache does): token sequences for a language model, which refuses the image
    and column options, as other models refuse the text ones."""
    spec = client.sample_spec() if spec is None else spec
    _refuse_misplaced_options(args, spec, client.url)
    names = SOURCE_OPTIONS + (TEXT_OPTIONS if isinstance(spec, TokenSpec) else ())
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}

    def warn(message: str) -> None:
        tqdm.write(f"teacher-push: warning: {message}", file=sys.stderr)

    return open_source(args.data, spec, warn=warn, max_npz_mb=args.max_npz_mb, **options)


def _api_key(args: argparse.Namespace) -> str | None:
    if not args.api_key_env:
        return None
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise ClientError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    return api_key


def _read_npz(args: argparse.Namespace) -> dict[str, np.ndarray] | None:
    """``--data``'s inputs when it is an .npz of inputs, read whole (one of input_ids is a
    source: its checks need the model's); None for any other source, checked to exist."""
    if Path(args.data).suffix.lower() == ".npz":
        given = _flags(args, SOURCE_OPTIONS)
        if given:
            raise ClientError(f"{' '.join(given)}: an .npz is read whole (inputs, labels, ids); these options are for other sources")
        return None if is_token_npz(args.data) else read_transfer_set(args.data, max_bytes=args.max_npz_mb << 20)
    if not Path(args.data).exists():  # before asking the server for the model's metadata
        raise CacheError(f"{args.data}: no such file or directory")
    return None


def push_main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_cli

    args = push_parser().parse_args(argv)
    return_large_blocks()  # a decoding thread keeps no image's memory once done with it

    def body() -> int:
        api_key = _api_key(args)
        push = {
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "temperature": args.temperature,
            "progress": not args.no_progress,
        }
        transfer = _read_npz(args)
        urls = args.url or [DEFAULT_URL]
        with TeacherClient(urls, args.model, api_key=api_key, timeout=args.timeout, max_retries=args.max_retries) as client:
            spec = client.sample_spec()
            _refuse_misplaced_options(args, spec, client.url)
            if transfer is not None and isinstance(spec, TokenSpec):
                raise ClientError(
                    f"{args.data}: an .npz of inputs; {client.url} serves a language model: give an .npz of input_ids, or text with --tokenizer"
                )
            if transfer is not None:
                inputs = fit_inputs(transfer["inputs"], spec, args.data)  # as .npy and every other source
                summary = push_arrays(client, inputs, ids=transfer.get("ids"), labels=transfer.get("labels"), **push)
            else:
                summary = push_source(client, open_push_source(client, args, spec), **push)
        print(f"teacher-push: {summary.line()}")
        return 0

    return run_cli("teacher-push", body, (CacheError, ClientError))


__all__ = ["PushSummary", "push_arrays", "push_main", "push_parser", "push_source"]
