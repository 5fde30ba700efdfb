"""Token-sequence transfer sets for a language-model teacher (offline/sources/tokens.py, text.py):
an .npz of input_ids, and .txt, JSONL and Parquet text tokenized with a real ``tokenizers`` BPE
tokenizer trained here, packed into sequences; and what teacher-push sends for them (a fake
server: the real one is tested end to end elsewhere)."""

from __future__ import annotations

import functools
import json
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.offline.sources import SampleSpec, SourceError, TokenSpec, detect_kind, open_source, sequence_ids
from kdcache.offline.sources import text as text_module
from kdcache.service import push as push_module
from kdcache.service.client import ClientError, TeacherClient, sample_spec_of
from kdcache.service.protocol import HEADER_LENGTH, decode_request, encode_response
from kdcache.service.push import push_main, token_batch_size

SPEC = TokenSpec(seq_len=8, vocab_size=1000)
LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token",
    "knowledge distillation from a cached teacher",
    "sphinx of black quartz judge my vow",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(LINES * 5, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def prose(lines: int, seed: int = 0) -> str:
    """Lines of the training words in a random order: no two sequences alike (repeats within a
    batch would be sent once)."""
    words = " ".join(LINES).split()
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(words, 8)) for _ in range(lines)) + "\n"


def encode(tokenizer_dir, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def separator(tokenizer_dir) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id("<|endoftext|>")


def unpack(batches) -> list[int]:
    """The token stream the batches hold, padding left out."""
    stream = []
    for batch in batches:
        lengths = batch.lengths if batch.lengths is not None else [batch.inputs.shape[1]] * len(batch)
        for row, n in zip(batch.inputs, lengths, strict=True):
            stream.extend(int(t) for t in row[:n])
    return stream


# ---------------------------------------------------------------------------------------------
# an .npz of input_ids


def test_an_npz_of_input_ids_is_trimmed_per_batch_padded_with_zeros_and_keyed_by_content(tmp_path):
    tokens = np.arange(1, 25, dtype=np.int32).reshape(4, 6)
    tokens[3] = [7, 8, 99, 99, 99, 99]  # junk beyond its length
    np.savez(tmp_path / "t.npz", input_ids=tokens, lengths=np.array([6, 3, 2, 2]))
    source = open_source(tmp_path / "t.npz", SPEC)
    assert (source.kind, len(source), source.total()) == ("token-npz", 4, 4)
    first, second = list(source.batches(2))
    np.testing.assert_array_equal(first.inputs, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(first.lengths, [6, 3])
    assert first.inputs.dtype == np.int64 and (first.labels == -1).all()
    # both rows are 2 long: the batch is 2 wide and needs no lengths
    np.testing.assert_array_equal(second.inputs, [[13, 14], [7, 8]])
    assert second.lengths is None
    assert first.ids[0] == sequence_ids(np.arange(1, 7)[None], [6])[0]
    # ids hash the tokens within the length only, whatever the width or the padding
    assert second.ids[1] == sequence_ids(np.array([[7, 8, 0]]), [2])[0]
    assert list(open_source(tmp_path / "t.npz", SPEC).batches(4))[0].ids == first.ids + second.ids  # stable


def test_without_lengths_every_row_is_full_and_given_ids_are_kept(tmp_path):
    np.savez(tmp_path / "t.npz", input_ids=np.ones((3, 5), dtype=np.uint16), ids=np.array(["a", "b", "c"]))
    (batch,) = open_source(tmp_path / "t.npz", SPEC).batches(8)
    assert batch.ids == ["a", "b", "c"] and batch.lengths is None and batch.inputs.shape == (3, 5)


def test_a_sequence_repeated_within_a_batch_is_sent_once(tmp_path):
    np.savez(tmp_path / "t.npz", input_ids=np.array([[1, 2, 3], [1, 2, 9], [4, 5, 6]]), lengths=np.array([2, 2, 3]))
    (batch,) = open_source(tmp_path / "t.npz", SPEC).batches(8)
    assert len(batch) == 2 and len(set(batch.ids)) == 2
    np.testing.assert_array_equal(batch.inputs, [[1, 2, 0], [4, 5, 6]])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"input_ids": np.array([[1, 2], [3, 1000]])},
            r"input_ids: row 1 holds token 1000 at position 1, outside the teacher's vocabulary \[0, 1000\)",
        ),
        ({"input_ids": np.array([[1, -5], [3, -1]])}, r"row 0 holds token -5 at position 1, .* \(1 more such tokens\)"),
        ({"input_ids": np.ones((2, 10), dtype=np.int64)}, r"input_ids are 10 tokens wide, the teacher takes at most 8"),
        ({"input_ids": np.ones((2, 3)), "lengths": np.array([1, 1])}, r"input_ids must be integers \[N, L\], got \[2, 3\] of float64"),
        ({"input_ids": np.ones((2, 3), dtype=int), "lengths": np.array([3, 4])}, r"lengths: row 1 is 4, outside 1..3"),
        ({"input_ids": np.ones((2, 3), dtype=int), "lengths": np.array([0, 1])}, r"lengths: row 0 is 0, outside 1..3"),
        ({"inputs": np.ones((2, 3), dtype=int)}, r"has no 'input_ids' array \(found: inputs\)"),
    ],
)
def test_bad_token_npz_files_are_refused_in_one_line_before_any_batch(tmp_path, arrays, message):
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(Exception, match=message) as raised:
        open_source(tmp_path / "t.npz", SPEC)
    assert "\n" not in str(raised.value)


def test_a_bad_token_beyond_a_rows_length_is_padding_not_an_error(tmp_path):
    np.savez(tmp_path / "t.npz", input_ids=np.array([[1, 5000]]), lengths=np.array([1]))
    (batch,) = open_source(tmp_path / "t.npz", SPEC).batches(4)
    np.testing.assert_array_equal(batch.inputs, [[1]])


def test_text_options_belong_to_token_sources_and_image_options_do_not(tmp_path, tokenizer_dir):
    np.savez(tmp_path / "t.npz", input_ids=np.ones((1, 2), dtype=int))
    with pytest.raises(SourceError, match="tokenizer applies to text, not to an .npz of input_ids"):
        open_source(tmp_path / "t.npz", SPEC, tokenizer=tokenizer_dir)
    with pytest.raises(SourceError, match="tokenizer=.* applies to text for a language-model teacher"):
        open_source(tmp_path / "t.npz", SampleSpec((2,), "int64"), tokenizer=tokenizer_dir)
    with pytest.raises(SourceError, match="input_column='x' applies to Parquet and Hugging Face sources of inputs"):
        open_source(tmp_path / "t.npz", SPEC, input_column="x")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(SourceError, match=r"not a transfer set this can read \(token-npz, text, jsonl, text-parquet\)"):
        open_source(tmp_path / "notes.md", SPEC)
    assert detect_kind(tmp_path / "t.npz", SPEC).kind == "token-npz" and detect_kind(tmp_path / "t.npz").kind == "npz"


# ---------------------------------------------------------------------------------------------
# text, tokenized and packed


def test_a_text_file_is_packed_into_full_sequences_and_a_shorter_last_one_with_stable_ids(tmp_path, tokenizer_dir):
    text = prose(12)
    (tmp_path / "corpus.txt").write_text(text)
    source = open_source(tmp_path / "corpus.txt", SPEC, tokenizer=tokenizer_dir, seq_len=6)
    assert source.kind == "text" and source.total() is None
    batches = list(source.batches(4))
    expected = encode(tokenizer_dir, text)  # one piece: the file is smaller than PIECE_CHARS
    assert unpack(batches) == expected
    full, rest = divmod(len(expected), 6)
    assert sum(len(b) for b in batches) == full + (rest > 0)
    assert all(b.inputs.shape[1] == 6 for b in batches[:-1]) and all(b.lengths is None for b in batches[:-1])
    assert rest, "the text should end in a partial sequence"
    # alone in its batch, the partial sequence is as wide as it is long; among full ones, padded
    assert batches[-1].inputs.shape[1] == (rest if len(batches[-1]) == 1 else 6)
    (whole,) = open_source(tmp_path / "corpus.txt", SPEC, tokenizer=tokenizer_dir, seq_len=6).batches(1000)
    assert whole.lengths is not None and whole.lengths[-1] == rest and (whole.lengths[:-1] == 6).all()
    assert (whole.inputs[-1, rest:] == 0).all() and whole.inputs.shape == (full + 1, 6)
    again = list(open_source(tmp_path / "corpus.txt", SPEC, tokenizer=tokenizer_dir, seq_len=6).batches(3))
    assert [i for b in again for i in b.ids] == [i for b in batches for i in b.ids]  # the same file and options: the same ids


def test_a_large_text_is_tokenized_in_pieces_cut_before_a_line_break_the_same_way_every_time(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(text_module, "PIECE_CHARS", 50)
    monkeypatch.setattr(text_module, "GROUP_CHARS", 120)
    letters = "".join(np.random.default_rng(1).choice(list("abcdefghijklmnopqrstuvwxyz"), 130))
    text = prose(16) + letters  # a last "line" longer than a piece, with no white space
    (tmp_path / "big.txt").write_text(text)
    with open(tmp_path / "big.txt", newline="") as handle:
        pieces = list(text_module._cut(handle))
    assert "".join(pieces) == text and all(p.startswith("\n") for p in pieces[1:-2])
    stream = [t for piece in pieces for t in encode(tokenizer_dir, piece)]
    runs = [list(open_source(tmp_path / "big.txt", SPEC, tokenizer=tokenizer_dir).batches(5)) for _ in range(2)]
    assert unpack(runs[0]) == stream
    assert [i for b in runs[0] for i in b.ids] == [i for b in runs[1] for i in b.ids]


def test_jsonl_documents_are_joined_with_the_separator_token(tmp_path, tokenizer_dir):
    rows = [{"text": LINES[0], "n": 1}, {"text": ""}, {"text": LINES[1]}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    batches = list(open_source(tmp_path / "docs.jsonl", SPEC, tokenizer=tokenizer_dir).batches(100))
    # the empty document adds nothing, not even a separator
    assert unpack(batches) == [*encode(tokenizer_dir, LINES[0]), separator(tokenizer_dir), *encode(tokenizer_dir, LINES[1])]
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": LINES[2]}) + "\n")
    named = list(open_source(tmp_path / "other.jsonl", SPEC, tokenizer=tokenizer_dir, text_column="body").batches(100))
    assert unpack(named) == encode(tokenizer_dir, LINES[2])


def test_bad_jsonl_lines_stop_or_are_skipped(tmp_path, tokenizer_dir):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": LINES[0]}) + "\n{oops\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SourceError, match=r"docs.jsonl: line 2: not JSON"):
        list(open_source(tmp_path / "docs.jsonl", SPEC, tokenizer=tokenizer_dir).batches(4))
    source = open_source(tmp_path / "docs.jsonl", SPEC, tokenizer=tokenizer_dir, on_error="skip")
    assert unpack(source.batches(4)) == encode(tokenizer_dir, LINES[0])
    assert [item for item, _ in source.skipped] == ["docs.jsonl:2", "docs.jsonl:3"]
    assert "not an object with a string 'text' (keys: body); name the field with --text-column" in source.skipped[1][1]


def test_parquet_text_rows_are_documents(tmp_path, tokenizer_dir):
    pq.write_table(pa.table({"content": LINES[:2], "id": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"has no text column 'text' \(columns: content, id\); name it with --text-column"):
        open_source(tmp_path / "a.parquet", SPEC, tokenizer=tokenizer_dir)
    with pytest.raises(SourceError, match="text column 'id' is int64, not strings"):
        open_source(tmp_path / "a.parquet", SPEC, tokenizer=tokenizer_dir, text_column="id")
    source = open_source(tmp_path, SPEC, tokenizer=tokenizer_dir, text_column="content")  # the folder of it
    assert source.kind == "text-parquet"
    assert unpack(source.batches(3)) == [*encode(tokenizer_dir, LINES[0]), separator(tokenizer_dir), *encode(tokenizer_dir, LINES[1])]


def test_the_tokenizer_and_seq_len_are_checked_when_the_source_opens(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "c.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"c.txt: text needs a tokenizer to become token sequences \(--tokenizer DIR\)"):
        open_source(tmp_path / "c.txt", SPEC)
    with pytest.raises(SourceError, match=r"no tokenizer.json \(a Hugging Face tokenizer directory"):
        open_source(tmp_path / "c.txt", SPEC, tokenizer=tmp_path)
    with pytest.raises(SourceError, match="seq_len 9 is outside 1..8"):
        open_source(tmp_path / "c.txt", SPEC, tokenizer=tokenizer_dir, seq_len=9)
    with pytest.raises(SourceError, match=r"the tokenizer has \d+ tokens, more than the teacher's vocabulary of 100"):
        open_source(tmp_path / "c.txt", TokenSpec(8, 100), tokenizer=tokenizer_dir)
    with pytest.raises(SourceError, match="text_column='x' applies to JSONL and Parquet sources, not to text sources"):
        open_source(tmp_path / "c.txt", SPEC, tokenizer=tokenizer_dir, text_column="x")
    assert list(open_source(tmp_path / "c.txt", SPEC, tokenizer=tokenizer_dir / "tokenizer.json").batches(2))  # the file itself
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(SourceError, match=r"needs the tokenizers package: pip install 'kdcache\[lm\]'"):
        open_source(tmp_path / "c.txt", SPEC, tokenizer=tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# what teacher-push sends a language model (a fake server)

LM_METADATA = {
    "name": "teacher",
    "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, 8]},
        {"name": "lengths", "datatype": "INT64", "shape": [-1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, 8]},
    ],
    "outputs": [],
    "parameters": {"task": "lm", "vocab_size": 1000, "sequence_length": 8, "max_batch_tokens": 24},
}


CLASSIFIER_METADATA = {
    "name": "teacher",
    "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1, 4]}],
    "outputs": [{"name": "soft_targets", "datatype": "FP32", "shape": [-1, 3]}],
    "parameters": {},
}


class FakeLM:
    """Answers metadata and infer requests as a language-model teacher would, cache included."""

    def __init__(self, metadata: dict = LM_METADATA) -> None:
        self.metadata = metadata
        self.requests: list[dict] = []
        self.cached: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=self.metadata)
        decoded = decode_request(request.read(), request.headers.get(HEADER_LENGTH))
        arrays = {name: np.array(array) for name, array in decoded.inputs.items()}
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in arrays["id"]]
        assert len(set(ids)) == len(ids)  # the service refuses an id twice in one request
        self.requests.append({"arrays": arrays, "datatypes": decoded.datatypes, "parameters": decoded.parameters})
        hits = sum(i in self.cached for i in ids)
        self.cached.update(ids)
        body, headers = encode_response("teacher", decoded.id, {"cache_hits": hits, "cache_misses": len(ids) - hits}, [])
        return httpx.Response(200, content=body, headers=headers)


def test_the_token_spec_comes_from_a_language_models_metadata():
    assert sample_spec_of(LM_METADATA, "here") == TokenSpec(seq_len=8, vocab_size=1000)
    with pytest.raises(ClientError, match="here: language-model metadata lacks the input_ids tensor or vocab_size"):
        sample_spec_of({"inputs": [{"name": "input_ids"}], "parameters": {"task": "lm"}}, "here")
    assert token_batch_size(256, 8, LM_METADATA) == 3 and token_batch_size(2, 8, LM_METADATA) == 2


def test_teacher_push_sends_input_ids_and_lengths_and_a_repush_is_all_hits(tmp_path, tokenizer_dir, monkeypatch, capsys):
    fake = FakeLM()
    monkeypatch.setattr(push_module, "TeacherClient", functools.partial(TeacherClient, transport=httpx.MockTransport(fake)))
    (tmp_path / "corpus.txt").write_text("\n".join(LINES) + "\n")
    argv = ["--url", "http://h:1", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tokenizer_dir), "--seq-len", "5"]
    assert push_main([*argv, "--no-progress"]) == 0
    count = len(fake.cached)
    assert push_main(argv) == 0  # with a progress bar of unknown total
    captured = capsys.readouterr()
    first, second = captured.out.splitlines()
    assert first.startswith(f"teacher-push: {count} samples, 0 hits, {count} misses, ")
    assert second.startswith(f"teacher-push: {count} samples, {count} hits, 0 misses, ")
    sent = fake.requests[: len(fake.requests) // 2]
    assert all(r["parameters"].get("no_outputs") is True for r in sent)
    assert max(len(r["arrays"]["input_ids"]) for r in sent) == 4  # max_batch_tokens 24 // 5 tokens
    assert all(r["datatypes"]["input_ids"] == "INT64" and r["arrays"]["input_ids"].shape[1] <= 5 for r in sent)
    rest = len(encode(tokenizer_dir, "\n".join(LINES) + "\n")) % 5
    assert rest, "the text should end in a partial sequence"
    # requests go out concurrently: the one with the partial sequence (and so lengths) may come in any order
    (partial,) = (r["arrays"] for r in sent if "lengths" in r["arrays"])
    assert partial["lengths"][-1] == rest
    assert not any("label" in r["arrays"] for r in sent)
    assert np.concatenate([r["arrays"]["input_ids"][:, :1] for r in sent]).size == count


def test_teacher_push_sends_an_npz_of_input_ids(tmp_path, monkeypatch, capsys):
    fake = FakeLM()
    monkeypatch.setattr(push_module, "TeacherClient", functools.partial(TeacherClient, transport=httpx.MockTransport(fake)))
    np.savez(tmp_path / "t.npz", input_ids=np.arange(1, 13).reshape(3, 4), lengths=np.array([4, 2, 4]), ids=np.array(["a", "b", "c"]))
    assert (
        push_main(["--url", "http://h:1", "--no-progress", "--data", str(tmp_path / "t.npz"), "--batch-size", "2", "--concurrency", "1"])
        == 0
    )
    assert capsys.readouterr().out.startswith("teacher-push: 3 samples, 0 hits, 3 misses, ")
    first, second = (r["arrays"] for r in fake.requests)
    np.testing.assert_array_equal(first["input_ids"], [[1, 2, 3, 4], [5, 6, 0, 0]])
    np.testing.assert_array_equal(first["lengths"], [4, 2])
    assert list(second) == ["input_ids", "id"] and second["input_ids"].shape == (1, 4)


@pytest.mark.parametrize(
    ("metadata", "data", "extra", "message"),
    [
        (LM_METADATA, "c.txt", ["--resize", "stretch"], "--resize: for images and arrays; http://h:1 serves a language model"),
        (LM_METADATA, "c.txt", ["--seq-len", "9"], "seq_len 9 is outside 1..8"),
        (LM_METADATA, "inputs.npz", [], "inputs.npz: an .npz of inputs; http://h:1 serves a language model: give an .npz of input_ids"),
        (LM_METADATA, "t.npz", [], r"input_ids are 10 tokens wide, the teacher takes at most 8"),
        (CLASSIFIER_METADATA, "c.txt", [], "--tokenizer: for text and a language-model teacher; http://h:1 takes fixed-shape inputs"),
        (CLASSIFIER_METADATA, "inputs.npz", [], "--tokenizer: for text and a language-model teacher"),
    ],
)
def test_teacher_push_refuses_what_the_model_cannot_take(tmp_path, tokenizer_dir, monkeypatch, capsys, metadata, data, extra, message):
    fake = FakeLM(metadata)
    monkeypatch.setattr(push_module, "TeacherClient", functools.partial(TeacherClient, transport=httpx.MockTransport(fake)))
    (tmp_path / "c.txt").write_text("hello")
    np.savez(tmp_path / "inputs.npz", inputs=np.ones((2, 4), dtype=np.int64))
    np.savez(tmp_path / "t.npz", input_ids=np.ones((2, 10), dtype=np.int64))
    argv = ["--url", "http://h:1", "--no-progress", "--data", str(tmp_path / data), "--tokenizer", str(tokenizer_dir), *extra]
    if data.endswith(".npz") and metadata is LM_METADATA:
        argv.remove("--tokenizer")
        argv.remove(str(tokenizer_dir))
    assert push_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not fake.requests  # nothing sent
