"""Label names: the rules a cache's ``label_names`` obey, and text from a cache made safe to print.

One home for both sides: the service checks a request's ``label_names`` parameter with
``check_label_names`` before anything is queued, the writer before it records them, the manifest
reader when it opens a cache, and every source (image folders, Hugging Face ClassLabel) when it
reads its class names. The rules:

* a list of at most ``num_classes`` strings (label ``i`` is ``names[i]``);
* each one non-empty, at most ``MAX_NAME_CHARS`` characters; all of them together at most
  ``MAX_TOTAL_CHARS`` characters, which bounds the manifest and the model metadata;
* valid Unicode, printable on one line: no lone surrogate (JSON can carry one as ``"\\ud800"``,
  which no UTF-8 encoder takes), no control character (Unicode category Cc: C0, DEL, C1), no
  line or paragraph separator (U+2028, U+2029) and no bidirectional control (U+061C, U+200E,
  U+200F, U+202A to U+202E, U+2066 to U+2069), which would forge or reorder what a terminal shows;
* no name twice (a set: linear time, so that a request cannot hold the event loop).

Each check is linear in the size of the names, and the size is checked first.

``printable`` escapes anything read from a cache before it reaches a terminal (names, teacher
and policy names, provenance): a name recorded by an older version, or a manifest edited by
hand, may hold what the rules now refuse.
"""

from __future__ import annotations

import bisect
import itertools
import re
from typing import Any

from .contract import CacheError

MAX_NAME_CHARS = 256  # per name
MAX_TOTAL_CHARS = 1 << 20  # all names together: 1,048,576 characters

# What a name may not hold; ``printable`` escapes these too (and repr() does, in messages).
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_REFUSED = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI_CONTROLS}\ud800-\udfff]")


class LabelNamesError(CacheError):
    """Label names that break a rule; the message names ``label_names``, the first bad index and
    why. ``reason`` is the message without its location."""

    def __init__(self, where: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{where}: label_names: {reason}" if where else f"label_names: {reason}")


def _kind(character: str) -> str:
    code = ord(character)
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate U+{code:04X} (not valid Unicode)"
    if code in (0x2028, 0x2029):
        return f"the {'line' if code == 0x2028 else 'paragraph'} separator U+{code:04X}"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"the control character U+{code:04X}"
    return f"the bidirectional control U+{code:04X}"


def check_label_names(names: Any, num_classes: int | None, where: str = "", *, owner: str = "the cache") -> list[str]:
    """``names`` if they obey the rules above, else a ``LabelNamesError`` naming ``where`` (a
    file, or "" for a request) and the first bad index. ``num_classes``: how many labels there
    are (None: not known here); ``owner`` says whose classes, in the message."""
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list):
        raise LabelNamesError(where, f"must be a list of non-empty strings, got {type(names).__name__}")
    if num_classes is not None and len(names) > num_classes:
        raise LabelNamesError(where, f"{len(names)} names, but {owner} has {num_classes} classes")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            got = "empty" if isinstance(name, str) else f"not a string ({type(name).__name__})"
            raise LabelNamesError(where, f"must be a list of non-empty strings: name {index} is {got}")
    lengths = [len(name) for name in names]
    if max(lengths, default=0) > MAX_NAME_CHARS:
        index = next(i for i, length in enumerate(lengths) if length > MAX_NAME_CHARS)
        raise LabelNamesError(where, f"name {index} has {lengths[index]:,} characters; the limit is {MAX_NAME_CHARS}")
    total = sum(lengths)
    if total > MAX_TOTAL_CHARS:
        raise LabelNamesError(where, f"{total:,} characters in all; the limit is {MAX_TOTAL_CHARS:,}")
    bad = _REFUSED.search("".join(names))
    if bad is not None:
        index = bisect.bisect_right(list(itertools.accumulate(lengths)), bad.start())
        raise LabelNamesError(where, f"name {index} ({names[index]!r}) holds {_kind(bad.group())}")
    if len(set(names)) != len(names):
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                raise LabelNamesError(where, f"names {name!r} more than once (names {first[name]} and {index})")
            first[name] = index
    return names


def merge_label_names(recorded: list[str] | None, given: list[str], where: str) -> list[str]:
    """The names that agree with both ``recorded`` and ``given``: they agree when every label
    index they both name has the same name, so one may extend the other (a source that lacks the
    last classes). A CacheError names the first index that differs."""
    if recorded is None:
        return given
    for index, (old, new) in enumerate(zip(recorded, given, strict=False)):
        if old != new:
            raise CacheError(
                f"{where + ': ' if where else ''}label {index} is named {new!r}, but the cache's label_names name it "
                f"{old!r} ({describe_label_names(recorded)}): the two sources number their classes differently"
            )
    return given if len(given) > len(recorded) else recorded


def describe_label_names(names: list[str], limit: int = 10) -> str:
    """``0=cat, 1=dog, …``: the first ``limit`` names with their indices, and how many more;
    escaped for a terminal."""
    shown = ", ".join(f"{index}={printable(name)}" for index, name in enumerate(names[:limit]))
    return shown + (f", … ({len(names) - limit} more, {len(names)} in all)" if len(names) > limit else "")


def printable(text: Any) -> str:
    """``text`` as a terminal shows it safely: what ``str.isprintable`` refuses (controls such as
    ESC and newline, bidirectional controls, separators, lone surrogates, unassigned code points)
    becomes an escape, ``\\x1b``, ``\\u202e``, ``\\U000e0001``; anything else is kept as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        character
        if character.isprintable()
        else f"\\x{ord(character):02x}"
        if ord(character) < 0x100
        else f"\\u{ord(character):04x}"
        if ord(character) < 0x10000
        else f"\\U{ord(character):08x}"
        for character in text
    )
