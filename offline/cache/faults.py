"""Crash points, for the crash trials (bench/crash.py, docs/reliability.md).

With ``KDCACHE_CRASH_AT=<point>[:<n>]`` in its environment, a process kills itself with SIGKILL
the n-th time (default 1) it reaches ``crash_point(<point>)``, so that a trial can stop the
writer exactly between two steps that a random ``kill -9`` would hit only rarely. Unset, a
crash point costs one comparison. Each point is a named constant, so that a search for its
name finds the one place that reaches it.
"""

from __future__ import annotations

import os
import signal

JOURNAL_SYNCED = "journal-synced"  # service: a group is durable in the journal, not yet in the shard
SHARD_PARTLY_WRITTEN = "shard-partly-written"  # some of the open shard's datasets hold the new rows, the others not yet
SHARD_CLOSED = "shard-closed"  # rollover: the full shard's image is written and fsynced, not yet renamed
SHARD_RENAMED = "shard-renamed"  # rollover: renamed to its final name, not yet in the manifest
MANIFEST_TMP_WRITTEN = "manifest-tmp-written"  # the new manifest is fsynced beside the old one, not yet replacing it
MANIFEST_REPLACED = "manifest-replaced"  # the manifest lists the new shard; the journal is not yet emptied

CRASH_POINTS = (JOURNAL_SYNCED, SHARD_PARTLY_WRITTEN, SHARD_CLOSED, SHARD_RENAMED, MANIFEST_TMP_WRITTEN, MANIFEST_REPLACED)

_CRASH_AT = os.environ.get("KDCACHE_CRASH_AT")
_crash_point, _, _crash_nth = (_CRASH_AT or "").partition(":")
_crash_countdown = int(_crash_nth) if _crash_nth.isdigit() else 1


def crash_point(point: str | None) -> None:
    """SIGKILL this process if ``point`` is the armed crash point and its count is reached."""
    global _crash_countdown
    if _CRASH_AT is None or point != _crash_point:
        return
    _crash_countdown -= 1
    if _crash_countdown <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
