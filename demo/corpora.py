"""Text corpora present on every machine with Python, a byte-level BPE tokenizer trained on them,
and packing into fixed-length token sequences (``distill-demo --task lm`` and the benchmarks).

Two corpora of different kinds, both behind :func:`load_corpus`:

* ``python-stdlib``: the standard library's own ``*.py`` files (no tests, no idlelib, no
  site-packages, no pydoc_data), split by file;
* ``python-docs``: English prose, the documentation topics of ``pydoc_data.topics`` (what
  ``help("assert")`` prints), split by topic.

A document goes to the test split when a hash of its name (the path relative to the standard
library, or the topic key) falls in the lowest ``TEST_PERCENT`` of 100 buckets: the split is
disjoint by document and the same on every machine with the same Python. Each split is then
capped to a byte budget, taking documents in the order of their hash, which samples the whole
library rather than its alphabetically first packages.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

CORPORA = ("python-stdlib", "python-docs")
EOS = "<|endoftext|>"  # joins documents; the tokenizer's only special token
VOCAB_SIZE = 4096
TEST_PERCENT = 10
TRAIN_BYTES = 2_000_000  # train text per corpus: what the teacher trains on and the transfer set
TEST_BYTES = 300_000  # test text, more than the eval set needs (it keeps EVAL_SEQUENCES)
MAX_DOC_BYTES = 64_000  # longer files are truncated, so a few big modules do not fill the budget
SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "pydoc_data"})


def split_bucket(name: str) -> int:
    """A stable bucket in 0..99 for a document name (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100


def split_documents(docs: Iterable[tuple[str, str]], train_bytes: int, test_bytes: int) -> tuple[list[str], list[str]]:
    """``(name, text)`` pairs into train and test texts by :func:`split_bucket`, each split capped
    to its byte budget (documents taken in the order of their name's hash, the last one cut)."""
    ordered = sorted(docs, key=lambda doc: (hashlib.sha256(doc[0].encode("utf-8")).digest(), doc[0]))
    splits: tuple[list[str], list[str]] = ([], [])
    left = [train_bytes, test_bytes]
    for name, text in ordered:
        side = int(split_bucket(name) < TEST_PERCENT)
        if left[side] <= 0 or not text.strip():
            continue
        data = text.encode("utf-8")[: min(MAX_DOC_BYTES, left[side])]
        splits[side].append(data.decode("utf-8", errors="ignore"))
        left[side] -= len(data)
    return splits


def stdlib_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            docs.append((relative.as_posix(), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return docs


def docs_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def load_corpus(name: str, train_bytes: int = TRAIN_BYTES, test_bytes: int = TEST_BYTES) -> tuple[list[str], list[str]]:
    """``(train_texts, test_texts)`` of corpus ``name`` (one of :data:`CORPORA`)."""
    if name == "python-stdlib":
        docs = stdlib_documents()
    elif name == "python-docs":
        docs = docs_documents()
    else:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return split_documents(docs, train_bytes, test_bytes)


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``, GPT-2's pre-tokenizer) trained on
    ``texts``, with :data:`EOS` as id 0. Any text round-trips through encode and decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer, directory: Path):
    """``tokenizer.json`` and the ``transformers`` files in ``directory``, so that
    ``AutoTokenizer.from_pretrained(directory)`` loads it; returns the ``transformers`` wrapper."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    wrapped.save_pretrained(str(directory))
    return wrapped


def pack(tokenizer, texts: Sequence[str], seq_len: int, max_sequences: int | None = None) -> np.ndarray:
    """The texts encoded, each followed by :data:`EOS`, concatenated and cut into int64 rows of
    ``seq_len`` tokens (the incomplete last row dropped; at most ``max_sequences`` rows)."""
    eos = tokenizer.token_to_id(EOS)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        stream.extend(encoding.ids)
        stream.append(eos)
        if max_sequences is not None and len(stream) >= max_sequences * seq_len:
            break
    rows = len(stream) // seq_len if max_sequences is None else min(len(stream) // seq_len, max_sequences)
    return np.asarray(stream[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)
