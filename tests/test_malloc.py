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
