"""glibc malloc settings for long-running processes that allocate the same large buffers again and
again: the teacher service (forward passes, request bodies) and the trainer (activations and
gradients of every step). Imports nothing from the project, so both halves can use it."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1))


def tune_malloc() -> bool:
    """Tell glibc's malloc to keep freed memory instead of handing it back to the OS.

    By default glibc returns large freed blocks at once (anything over its dynamic mmap
    threshold, and the top of the heap past 128 KiB), so every forward pass or training step
    faults tens of thousands of zero-filled pages back in. Measured on a 2-core VM: forward
    passes in the server up to 25% slower, and ``offline-distill`` with the CNN student 1.3-1.55x
    slower (bench/malloc.py, docs/benchmarks.md). The same sizes come back every step, so keeping them costs only
    a stable RSS. Returns False, changing nothing, where libc is not glibc or where any
    ``MALLOC_*`` variable is set (the environment wins; ``MALLOC_ARENA_MAX=0`` keeps glibc's
    defaults).

    One arena: each thread other than the main one (the service's teacher worker and cache
    writer, a trainer's pin-memory thread) otherwise gets an arena of its own, whose heaps
    glibc unmaps whenever they fall empty, whatever the trim threshold. Call it before those
    threads start; forked DataLoader workers inherit the settings."""
    return _mallopt(*SETTINGS)


def return_large_blocks(threshold: int = 4 << 20) -> bool:
    """Tell glibc's malloc to hand blocks of ``threshold`` bytes or more back to the OS as soon as
    they are freed: for ``teacher-push``, whose decoding threads each hold a large image for a
    moment (Pillow allocates it in blocks of up to 16 MiB).

    glibc's own threshold is dynamic: once such a block is freed, blocks that large come from
    the freeing thread's arena instead, which keeps them, so every decoding thread ends up
    holding a large image's worth. Three 40 MP RGBA PNGs on 2 threads took 672 MB of RSS, against
    367 MB with the threshold fixed (docs/reliability.md § 8). Returns False, changing nothing,
    where libc is not glibc or where any ``MALLOC_*`` variable is set."""
    return _mallopt((M_MMAP_THRESHOLD, threshold))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False, changing nothing, where libc is not glibc or
    where any ``MALLOC_*`` variable is set (the environment wins)."""
    if any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(option, value)) for option, value in settings])
