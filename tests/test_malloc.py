"""offline.malloc.tune_malloc: glibc keeps freed memory, unless the environment says otherwise."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Frees a 20 MiB block and reports how much of it the process still holds. Untuned, glibc serves
# a block that large with mmap and unmaps it on free; tuned, it comes from the heap and stays.
PROBE = r"""
import ctypes, json, sys
from kdcache.offline.malloc import tune_malloc

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

tuned = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 20 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
before_free = rss()
libc.free(ctypes.c_void_p(block))
print(json.dumps({"tuned": tuned, "released": before_free - rss()}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_tuned_malloc_keeps_a_freed_block_that_glibc_would_unmap():
    result = probe()
    assert result["tuned"] is True
    assert result["released"] < 1 << 20, result


def test_any_malloc_variable_in_the_environment_wins():
    result = probe(MALLOC_ARENA_MAX="0")
    assert result["tuned"] is False
    assert result["released"] >= 19 << 20, result  # glibc's own default: the block is unmapped


# Frees a 20 MiB block twice, from another thread the second time, and reports how much of the
# second one the process still holds. glibc unmaps the first and then raises its mmap threshold
# past 20 MiB, so the second comes from the thread's arena and stays there; teacher-push's
# setting (return_large_blocks) fixes the threshold, so both are unmapped.
SECOND_BLOCK = r"""
import ctypes, json, sys, threading
from kdcache.offline.malloc import return_large_blocks

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

fixed = return_large_blocks() if sys.argv[1] == "fixed" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size, released = 20 << 20, []

def cycle():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before_free = rss()
    libc.free(ctypes.c_void_p(block))
    released.append(before_free - rss())

cycle()
thread = threading.Thread(target=cycle)
thread.start()
thread.join()
print(json.dumps({"fixed": fixed, "released": released[1]}))
"""


@pytest.mark.parametrize("mode", ["glibc", "fixed"])
def test_teacher_push_hands_large_freed_blocks_back(mode):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", SECOND_BLOCK, mode], env=clean, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if mode == "glibc":
        assert result["released"] < 1 << 20, result  # kept in the thread's arena: what each decoding thread held
    else:
        assert result["fixed"] is True and result["released"] >= 19 << 20, result
