"""Label names are validated and bounded, in one place (offline/cache/label_names.py) that the
service, the cache writer, the manifest reader and every source use (docs/reliability.md § 7).

* The rules, one by one, and the duplicate check in linear time.
* The service: a request whose names break a rule is refused (422) before anything is queued;
  names are recorded only for a request that is admitted, so a 503 (queue full) writes nothing.
* A damaged manifest (names written by an older version, or edited by hand): one line naming
  the field from every command that reads it, never a traceback; ``cache-inspect`` still shows
  the rest.
* Printing: what the commands print from a cache is escaped.
* Sources: class names that repeat (a Hugging Face ClassLabel) are refused in one line.
* A real ``teacher-serve`` (Done-when 2 and 3): a lone surrogate is refused and the cache stays
  usable; 60,000 names with one duplicate are refused at once while ``/v2/health/live`` answers.

The fuzzer of the ``label_names`` parameter against a live server is in tests/test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BIN, small_float_teacher
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.offline.cache import CacheError, CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cache.label_names import MAX_NAME_CHARS, MAX_TOTAL_CHARS, check_label_names, describe_label_names, printable
from kdcache.offline.cli import distill_main, inspect_main
from kdcache.offline.sources import SampleSpec, SourceError, open_source
from kdcache.service.app import create_app
from kdcache.service.launch import ServeProcess
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.teacher import load_teacher

SHAPE, CLASSES = (4,), 3
NAMES = ["cat", "dog", "eel"]


# ---------------------------------------------------------------------------------------------
# The rules


BROKEN = [
    pytest.param(["\ud800x"], "name 0 ('\\ud800x') holds a lone surrogate U+D800 (not valid Unicode)", id="lone-surrogate"),
    pytest.param(["cat", "red\x1b[31m"], "name 1 ('red\\x1b[31m') holds the control character U+001B", id="escape"),
    pytest.param(["cat", "a\nforged"], "name 1 ('a\\nforged') holds the control character U+000A", id="newline"),
    pytest.param(["\x85x"], "name 0 ('\\x85x') holds the control character U+0085", id="c1-control"),
    pytest.param(["cat", "\u202eevil"], "name 1 ('\\u202eevil') holds the bidirectional control U+202E", id="bidi-override"),
    pytest.param(["a\u2066b"], "name 0 ('a\\u2066b') holds the bidirectional control U+2066", id="bidi-isolate"),
    pytest.param(["a\u2028b"], "name 0 ('a\\u2028b') holds the line separator U+2028", id="line-separator"),
    pytest.param(["a", "b\u2029"], "name 1 ('b\\u2029') holds the paragraph separator U+2029", id="paragraph-separator"),
    pytest.param(["ok", "x" * 300, "y" * 400], f"name 1 has 300 characters; the limit is {MAX_NAME_CHARS}", id="too-long"),
    pytest.param(["dog", "dog"], "names 'dog' more than once (names 0 and 1)", id="duplicate"),
    pytest.param(["a", "b", "c", "d"], "4 names, but the cache has 3 classes", id="more-than-classes"),
    pytest.param(["cat", ""], "must be a list of non-empty strings: name 1 is empty", id="empty"),
    pytest.param(["cat", 7], "must be a list of non-empty strings: name 1 is not a string (int)", id="not-a-string"),
    pytest.param("cat", "must be a list of non-empty strings, got str", id="not-a-list"),
]


@pytest.mark.parametrize("names, reason", BROKEN)
def test_each_rule_is_one_line_naming_the_field_and_the_first_bad_index(names, reason):
    with pytest.raises(CacheError) as refused:
        check_label_names(names, CLASSES, "c/manifest.json")
    assert str(refused.value) == f"c/manifest.json: label_names: {reason}"
    with pytest.raises(CacheError) as refused:
        check_label_names(names, CLASSES)  # a request: no file to name
    assert str(refused.value) == f"label_names: {reason}"


def test_valid_names_pass_and_the_total_is_bounded():
    assert check_label_names(["cat", "dög", "猫", "🐈", "a b-c_d.e"], 5) == ["cat", "dög", "猫", "🐈", "a b-c_d.e"]
    assert check_label_names(("cat",), None) == ["cat"]
    assert check_label_names([], 3) == []
    at_limit = [f"{i:0{MAX_NAME_CHARS}d}" for i in range(MAX_TOTAL_CHARS // MAX_NAME_CHARS)]
    assert check_label_names(at_limit, None) is at_limit
    with pytest.raises(CacheError, match=f"label_names: {MAX_TOTAL_CHARS + MAX_NAME_CHARS:,} characters in all; the limit is 1,048,576"):
        check_label_names([*at_limit, "x" * MAX_NAME_CHARS], None)


def test_duplicates_are_found_in_linear_time():
    """Defect 3: the duplicate was searched for with ``names[:i]`` for each i, quadratic: 60,000
    names with one duplicate held the event loop for 19.9 s."""
    names = [f"class-{i:05d}" for i in range(60_000)]
    names[-1] = names[0]  # the last one repeats the first: the worst case of the old search
    started = time.perf_counter()
    with pytest.raises(CacheError, match=r"names 'class-00000' more than once \(names 0 and 59999\)"):
        check_label_names(names, 60_000)
    assert time.perf_counter() - started < 0.25


def test_printable_escapes_what_would_forge_or_recolour_a_terminal_line():
    assert printable("cat, dög, 猫 🐈") == "cat, dög, 猫 🐈"
    assert printable("a\x1b[31mred\nforged\r\t\x7f") == "a\\x1b[31mred\\x0aforged\\x0d\\x09\\x7f"
    assert printable("\u202eevil\u2066\u2028\ud800") == "\\u202eevil\\u2066\\u2028\\ud800"
    assert printable("tag\U000e0001") == "tag\\U000e0001"
    assert printable(42) == "42"
    assert describe_label_names(["a\x1bb", "ok"]) == "0=a\\x1bb, 1=ok"


# ---------------------------------------------------------------------------------------------
# The service (in process)


class GatedTeacher:
    """A teacher behind a gate, to hold a batch inside the model (and the queue behind it)."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def encode(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return self.teacher.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.teacher, name)


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    return small_float_teacher(tmp_path_factory.mktemp("teacher"), SHAPE, CLASSES)[1]


@contextlib.asynccontextmanager
async def serving(cache: Path, teacher_pt: Path, gated: bool = False, **options):
    settings = ServeSettings(teacher=[str(teacher_pt)], cache=cache, device="cpu", **options)
    teacher = load_teacher(settings.teacher, temperature=1.0, device="cpu")
    teacher = GatedTeacher(teacher) if gated else teacher
    service = TeacherService.open(settings, teacher)
    app = create_app(service)
    await service.start()
    for _ in range(500):
        if service.ready:
            break
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
            yield service, client, teacher
    finally:
        if gated:
            teacher.gate.set()
        await service.stop()


def infer_body(ids: list[str], names_json: str | None = None, *, labels: list[int] | None = None, store: bool = True) -> bytes:
    """A JSON infer request, its ``label_names`` spliced in as raw JSON text (so that it may hold
    what ``json.dumps`` of a Python value cannot, such as a lone surrogate escape)."""
    inputs = np.random.default_rng(len(ids)).standard_normal((len(ids), *SHAPE)).astype(np.float32)
    tensors = [
        {"name": "input", "shape": [len(ids), *SHAPE], "datatype": "FP32", "data": inputs.ravel().tolist()},
        {"name": "id", "shape": [len(ids)], "datatype": "BYTES", "data": ids},
    ]
    if labels is not None:
        tensors.append({"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels})
    parameters = {"store": store, **({"label_names": "@NAMES@"} if names_json is not None else {})}
    text = json.dumps({"inputs": tensors, "parameters": parameters})
    return (text.replace('"@NAMES@"', names_json) if names_json is not None else text).encode()


INFER = "/v2/models/teacher/infer"
JSON_HEADERS = {"Content-Type": "application/json"}


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_a_refused_request_writes_nothing_and_the_metadata_stays_small(tmp_path, teacher_pt):
    """Defects 2 and 4 in process: a lone surrogate (raw JSON), control characters, and names of
    5 MB each (ten of them on a live server below) are refused with 422; the manifest is not
    touched and the metadata answers."""
    cache = tmp_path / "cache"

    async def body():
        async with serving(cache, teacher_pt) as (service, client, _):
            assert (await client.post(INFER, content=infer_body(["a"]), headers=JSON_HEADERS)).status_code == 200
            before = (cache / "manifest.json").read_bytes()
            for names_json, reason in (  # each the first names this cache would record
                ('["\\ud800x"]', "name 0 ('\\ud800x') holds a lone surrogate U+D800"),
                (json.dumps(["cat", "\ud800x"]), "name 1 ('\\ud800x') holds a lone surrogate U+D800"),
                (json.dumps(["cat", "dog\x1b[2J"]), "holds the control character U+001B"),
                (json.dumps([c * 5_000_000 for c in "xyz"]), "name 0 has 5,000,000 characters; the limit is 256"),
            ):
                answer = await client.post(INFER, content=infer_body(["b"], names_json), headers=JSON_HEADERS)
                assert answer.status_code == 422, answer.text[:300]
                error = answer.json()["error"]
                assert error.startswith("label_names: ") and reason in error and "\n" not in error, error[:300]
            assert (cache / "manifest.json").read_bytes() == before  # nothing recorded
            assert service.store.num_samples == 1  # nothing stored
            metadata = await client.get("/v2/models/teacher")
            assert metadata.status_code == 200 and metadata.json()["parameters"]["label_names"] is None
            assert len(metadata.content) < 10_000
            assert (await client.post(INFER, content=infer_body(["c"], json.dumps(NAMES)), headers=JSON_HEADERS)).status_code == 200

    asyncio.run(body())
    assert CacheReader(cache).label_names == NAMES


def test_a_request_refused_with_503_records_no_label_names(tmp_path, teacher_pt):
    """Defect 5: the names were recorded before the queue was asked, so a request refused with
    503 (queue full) still wrote them into the manifest. Now they are recorded only once the
    request is admitted, and a refused request does not even claim them."""
    cache = tmp_path / "cache"
    sample_bytes = int(np.prod(SHAPE)) * 4 + CLASSES * 4  # the queue counts inputs and the targets they become

    async def body():
        # 8 samples fill the queue; max_batch 2: a request of 8 leaves jobs queued behind the gate.
        async with serving(cache, teacher_pt, gated=True, max_batch=2, max_queue_mb=8 * sample_bytes / (1 << 20)) as (
            service,
            client,
            gated,
        ):
            assert (await client.post(INFER, content=infer_body(["warm"]), headers=JSON_HEADERS)).status_code == 200
            gated.gate.clear()
            gated.entered.clear()
            held = asyncio.create_task(client.post(INFER, content=infer_body([f"h{i}" for i in range(8)]), headers=JSON_HEADERS))
            while not gated.entered.is_set():
                await asyncio.sleep(0.005)
            before = (cache / "manifest.json").read_bytes()
            for store in (True, False):
                refused_ids = [f"r{i}" for i in range(8)]
                refused = await client.post(
                    INFER, content=infer_body(refused_ids, json.dumps(["cat", "dog"]), store=store), headers=JSON_HEADERS
                )
                assert refused.status_code == 503 and "queue is full" in refused.json()["error"], refused.text
            assert (cache / "manifest.json").read_bytes() == before and service.store.label_names is None
            gated.gate.set()
            assert (await held).status_code == 200
            # The refused request claimed nothing: another numbering is taken, and recorded.
            accepted = await client.post(INFER, content=infer_body(["c"], json.dumps(["dog", "cat"])), headers=JSON_HEADERS)
            assert accepted.status_code == 200, accepted.text
            assert manifest_of(cache)["label_names"] == ["dog", "cat"]
            assert "r0" not in service.store.writer and service.store.num_samples == 10

    asyncio.run(body())


def test_names_claimed_by_an_admitted_request_refuse_a_conflict_before_they_are_recorded(tmp_path, teacher_pt):
    """Names are recorded after the request is queued (so that a 503 records nothing); a request
    that conflicts with names admitted but not yet in the manifest is still refused with 422
    before anything of it is queued. A guard of that order, not a defect of the code before."""
    cache = tmp_path / "cache"

    async def body():
        async with serving(cache, teacher_pt) as (service, client, _):
            record, called, release = service.store.record_label_names, threading.Event(), threading.Event()

            def slow_record(names):  # the manifest's write, held until released
                called.set()
                future = concurrent.futures.Future()

                def later():
                    release.wait(30)
                    try:
                        future.set_result(record(names).result())
                    except BaseException as exc:  # noqa: BLE001 - handed to the request
                        future.set_exception(exc)

                threading.Thread(target=later, daemon=True).start()
                return future

            service.store.record_label_names = slow_record
            first = asyncio.create_task(client.post(INFER, content=infer_body(["a"], json.dumps(["cat", "dog"])), headers=JSON_HEADERS))
            while not called.is_set():
                await asyncio.sleep(0.005)
            second = await client.post(INFER, content=infer_body(["b"], json.dumps(["dog"])), headers=JSON_HEADERS)
            assert second.status_code == 422 and "label 0 is named 'dog', but the cache's label_names name it 'cat'" in second.text
            release.set()
            assert (await first).status_code == 200
            assert manifest_of(cache)["label_names"] == ["cat", "dog"] and "b" not in service.store.writer

    asyncio.run(body())


# ---------------------------------------------------------------------------------------------
# A damaged manifest


def write_cache(directory: Path, *, teacher_name: str = "mlp-small", label_names: list[str] | None = NAMES, samples: int = 40) -> Path:
    rng = np.random.default_rng(0)
    meta = CacheMeta("0" * 64, teacher_name, CLASSES, SHAPE, "float32")
    with CacheWriter(directory, meta, label_names=label_names) as writer:
        writer.append(
            [f"s{i}" for i in range(samples)],
            rng.standard_normal((samples, *SHAPE)).astype(np.float32),
            rng.standard_normal((samples, CLASSES)).astype(np.float32),
            rng.integers(0, CLASSES, samples),
        )
    return directory


def damage_label_names(cache: Path, raw_json: str) -> None:
    """Replace the manifest's ``label_names`` with ``raw_json``, as text: JSON can carry what the
    writer never writes (a lone surrogate as ``"\\ud800"``, a control character as ``"\\u001b"``)."""
    manifest = manifest_of(cache)
    manifest["label_names"] = "@NAMES@"
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1).replace('"@NAMES@"', raw_json))


DAMAGES = [
    pytest.param('["\\ud800x", "dog"]', "name 0 ('\\ud800x') holds a lone surrogate U+D800 (not valid Unicode)", id="lone-surrogate"),
    pytest.param('["cat", "dog\\u001b[2J\\nforged"]', "name 1 ('dog\\x1b[2J\\nforged') holds the control character U+001B", id="control"),
    pytest.param(json.dumps(["x" * 300]), "name 0 has 300 characters; the limit is 256", id="too-long"),
    pytest.param('["dog", "dog"]', "names 'dog' more than once (names 0 and 1)", id="duplicate"),
    pytest.param('["a", "b", "c", "d"]', "4 names, but the cache has 3 classes", id="more-than-classes"),
    pytest.param('"cat"', "must be a list of non-empty strings, got str", id="wrong-type"),
    pytest.param("[1, 2]", "must be a list of non-empty strings: name 0 is not a string (int)", id="not-strings"),
]


@pytest.mark.parametrize("raw_json, reason", DAMAGES)
def test_a_damaged_manifest_is_one_line_naming_the_field_and_cache_inspect_shows_the_rest(tmp_path, raw_json, reason, capsys):
    cache = write_cache(tmp_path / "cache")
    damage_label_names(cache, raw_json)
    expected = f"{cache / 'manifest.json'}: label_names: {reason}"

    # Every reader that needs the names: the trainer's CacheReader, the writer teacher-serve opens.
    for open_cache in (CacheReader, lambda c: CacheWriter(c, CacheMeta("0" * 64, "mlp-small", CLASSES, SHAPE, "float32"))):
        with pytest.raises(CacheError) as refused:
            open_cache(cache)
        assert str(refused.value) == expected
    capsys.readouterr()

    assert inspect_main([str(cache)]) == 1
    out, err = capsys.readouterr()
    assert "classes          3\n" in out and "samples          40\n" in out and "label names      damaged, not shown (below)\n" in out
    assert err == f"cache-inspect: error: {printable(expected)}\n"
    assert inspect_main(["--json", str(cache)]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is False and summary["label_names"] is None and summary["problems"] == [expected]
    assert summary["num_classes"] == 3 and summary["samples"] == 40

    code = distill_main(["--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress", "--no-export"])
    _, err = capsys.readouterr()
    assert code == 2 and err == f"offline-distill: error: {printable(expected)}\n", err


@pytest.mark.slow
def test_a_damaged_manifest_is_one_line_from_each_command_and_nothing_raw_reaches_the_terminal(tmp_path, teacher_pt):
    """Defects 2 and 10 through the real commands: a lone surrogate ended cache-inspect and
    offline-distill in a UnicodeEncodeError traceback, and an escape sequence or a newline in a
    name (or in the teacher's name) reached the terminal raw."""
    forged = "mlp\x1b[31m\nforged: line\u202e"
    cache = write_cache(tmp_path / "cache", teacher_name=forged)
    distill = [str(BIN / "offline-distill"), "--cache", str(cache), "--epochs", "1", "--no-progress", "--no-export"]

    trained = subprocess.run([*distill, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert (
        "teacher mlp\\x1b[31m\\x0aforged: line\\u202e 000000000000" in trained.stdout and "labels: 0=cat, 1=dog, 2=eel\n" in trained.stdout
    )
    inspected = subprocess.run([str(BIN / "cache-inspect"), str(cache)], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0 and "teacher          mlp\\x1b[31m\\x0aforged: line\\u202e  " in inspected.stdout
    for output in (trained.stdout + trained.stderr, inspected.stdout + inspected.stderr):
        assert "\x1b" not in output and "\u202e" not in output and "\nforged" not in output

    damage_label_names(cache, '["\\ud800x", "dog\\u001b[2J\\nforged"]')
    inspected = subprocess.run([str(BIN / "cache-inspect"), str(cache)], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 1 and "classes          3\n" in inspected.stdout
    assert (
        inspected.stderr.count("\n") == 1 and "manifest.json: label_names: name 0 ('\\ud800x') holds a lone surrogate" in inspected.stderr
    )
    refused = subprocess.run([*distill, "--out", str(tmp_path / "run2")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "manifest.json: label_names: name 0 ('\\ud800x') holds a lone surrogate U+D800" in refused.stderr
    with ServeProcess(["--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu"], tmp_path / "serve.log") as server:
        assert server.proc.wait(120) == 2
    log = server.output()
    assert "manifest.json: label_names: name 0 ('\\ud800x') holds a lone surrogate U+D800" in log and "Traceback" not in log
    for output in (inspected.stdout + inspected.stderr, refused.stdout + refused.stderr, log):
        assert "\x1b" not in output and "Traceback" not in output and "\nforged" not in output


# ---------------------------------------------------------------------------------------------
# Sources


def test_a_hugging_face_class_label_whose_names_repeat_is_refused(tmp_path):
    """Defect 6: a ClassLabel ``["dog", "dog"]`` was mapped by name, and its labels 0, 1, 0, 1
    were stored as all 1. ``datasets`` itself refuses such names now, but a dataset written by
    another version or tool (or edited) can still carry them."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(buffer, "PNG")
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}] * 4, "label": [0, 1, 0, 1]})
    dataset = dataset.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["dog", "cat"]))
    dataset.save_to_disk(tmp_path / "hf")
    info_path = tmp_path / "hf" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["features"]["label"]["names"] = ["dog", "dog"]
    info_path.write_text(json.dumps(info))

    spec = SampleSpec((3, 10, 10), "uint8", 2)
    expected = f"{tmp_path / 'hf'}: ClassLabel names of label column 'label': label_names: names 'dog' more than once (names 0 and 1)"
    for label_names in (None, ["cat", "dog"]):  # its own names, or mapped through a cache's
        with pytest.raises(SourceError) as refused:
            open_source(tmp_path / "hf", spec, label_names=label_names)
        assert str(refused.value) == expected


def test_a_class_folder_whose_name_holds_a_control_character_is_refused(tmp_path):
    from PIL import Image

    for name in ("cat", "dog\x1b[31m"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / name / "0.png")
    with pytest.raises(SourceError, match=r"class folders: label_names: name 1 \('dog\\x1b\[31m'\) holds the control character U\+001B"):
        open_source(tmp_path / "images", SampleSpec((3, 10, 10), "uint8", 2))


# ---------------------------------------------------------------------------------------------
# A real teacher-serve


class HealthProbe:
    """``GET /v2/health/live`` every 10 ms on its own thread, each probe's start and latency
    kept; ``during()`` gives the latencies of the probes that overlapped its block."""

    def __init__(self, url: str) -> None:
        self.url = f"{url}/v2/health/live"
        self.probes: list[tuple[float, float, int]] = []  # (start, latency, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.probes.append((started, time.perf_counter() - started, status))
                self._stop.wait(0.01)

    @contextlib.contextmanager
    def during(self):
        latencies: list[float] = []
        start = time.perf_counter()
        yield latencies
        end = time.perf_counter()
        while not self.probes or self.probes[-1][0] <= end:  # the probe in flight at the end has answered
            time.sleep(0.005)
        overlapping = [(latency, status) for started, latency, status in self.probes if started <= end and started + latency >= start]
        assert all(status == 200 for _, status in overlapping), overlapping
        latencies.extend(latency for latency, _ in overlapping)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.slow
def test_done_when_2_a_lone_surrogate_gets_422_and_the_cache_stays_usable(tmp_path, teacher_pt):
    cache = tmp_path / "cache"
    with ServeProcess(["--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu"], tmp_path / "serve.log") as server:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ids = [f"s{i}" for i in range(40)]
            stored = client.post(INFER, content=infer_body(ids, '["cat", "dog"]', labels=[i % 2 for i in range(40)]), headers=JSON_HEADERS)
            assert stored.status_code == 200, stored.text
            # Names that extend the recorded ones, as a source with one more class sends them.
            refused = client.post(INFER, content=infer_body(["x"], '["cat", "dog", "\\ud800x"]'), headers=JSON_HEADERS)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"] == "label_names: name 2 ('\\ud800x') holds a lone surrogate U+D800 (not valid Unicode)"
            metadata = client.get("/v2/models/teacher")
            assert metadata.status_code == 200 and metadata.json()["parameters"]["label_names"] == ["cat", "dog"]
        assert server.stop() == 0
    assert "Traceback" not in server.output()

    inspected = subprocess.run([str(BIN / "cache-inspect"), str(cache)], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0 and "label names      0=cat, 1=dog\n" in inspected.stdout, inspected.stderr
    trained = subprocess.run(
        [str(BIN / "offline-distill"), "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0 and "labels: 0=cat, 1=dog\n" in trained.stdout, trained.stderr


@pytest.mark.slow
def test_done_when_3_60000_names_with_one_duplicate_are_refused_at_once_while_health_answers(tmp_path):
    """Defect 3: the same request held every route, health checks included, for 19.9 s."""
    classes = 60_000
    teacher = small_float_teacher(tmp_path, SHAPE, classes)[1]
    names = [f"class-{i:05d}" for i in range(classes)]
    names[-1] = names[0]
    body = infer_body(["x"], json.dumps(names))
    serve = ["--teacher", str(teacher), "--cache", str(tmp_path / "cache"), "--device", "cpu", "--max-batch", "4"]
    with ServeProcess(serve, tmp_path / "serve.log") as server, HealthProbe(server.wait_ready().url) as health:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            client.get("/v2/health/live")  # a connection is open: the timing below is the request's
            time.sleep(0.1)
            with health.during() as latencies:
                started = time.perf_counter()
                refused = client.post(INFER, content=body, headers=JSON_HEADERS)
                seconds = time.perf_counter() - started
            assert refused.status_code == 422, refused.text[:300]
            assert refused.json()["error"] == "label_names: names 'class-00000' more than once (names 0 and 59999)"
            assert seconds < 0.5, f"{len(body):,} bytes refused in {seconds:.3f} s"
            assert latencies and max(latencies) < 0.1, f"health answered in up to {max(latencies) * 1000:.0f} ms"
            print(f"60,000 names ({len(body):,} bytes) refused in {seconds * 1000:.0f} ms; health up to {max(latencies) * 1000:.0f} ms")
            # Defect 4: ten names of 5 MB each (a 50 MB body) were accepted, and manifest.json grew to 50 MB.
            huge = infer_body(["y"], json.dumps([c * 5_000_000 for c in "abcdefghij"]))
            with health.during() as latencies:
                refused = client.post(INFER, content=huge, headers=JSON_HEADERS)
            assert (
                refused.status_code == 422 and refused.json()["error"] == "label_names: name 0 has 5,000,000 characters; the limit is 256"
            )
            print(f"health during the 50 MB request: up to {max(latencies) * 1000:.0f} ms over {len(latencies)} probes")
            assert client.get("/v2/models/teacher").json()["parameters"]["label_names"] is None
        assert server.stop() == 0
    assert "label_names" not in manifest_of(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Fuzzing the label_names parameter against a live server


FUZZ_CLASSES = 8
VOCABULARY = ["cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lynx"]
# What a name must not hold, and some neighbours that it may: lone surrogates (hypothesis's
# characters() leaves them out), controls, bidirectional controls, separators, a BOM, an emoji.
SPECIALS = "\ud800\udbff\udc00\udfff\x00\x1b\n\r\t\x7f\x85\x9f\u061c\u200e\u200f\u202a\u202e\u2066\u2069\u2028\u2029\ufeff\U0001f408 "
FUZZ_CI_EXAMPLES = 30
# Sent before the drawn cases: each rule broken once, on a cache that records no names yet.
SEEDS = [
    ["\ud800x"],
    ["cat", "dog", "\udfff"],
    ["cat\x1b[31m"],
    ["a\nforged"],
    ["\u202eevil"],
    ["x" * (MAX_NAME_CHARS + 1)],
    ["dog", "dog"],
    VOCABULARY[: FUZZ_CLASSES + 1],
    [f"n{i}" for i in range(59_999)] + ["n0"],
    ["cat", ""],
    "cat",
    [1],
]
FUZZ_SOAK_EXAMPLES = int(os.environ.get("KD_FUZZ_EXAMPLES", "2000"))


@st.composite
def label_names_values(draw: st.DrawFn):
    """A ``label_names`` value: a prefix of one numbering (valid, or too long for the classes),
    that prefix with one name replaced by random text, random text, a large list or name, or no
    list at all."""
    characters = st.one_of(st.characters(), st.sampled_from(SPECIALS))
    text = st.text(characters, max_size=12)
    kind = draw(st.sampled_from(["prefix", "prefix", "mutated", "random", "large", "not-a-list"]))
    if kind == "prefix":
        return VOCABULARY[: draw(st.integers(0, len(VOCABULARY)))]
    if kind == "mutated":
        names = VOCABULARY[: draw(st.integers(1, FUZZ_CLASSES))]
        names[draw(st.integers(0, len(names) - 1))] = draw(text)
        return names
    if kind == "random":
        return draw(st.lists(text, max_size=FUZZ_CLASSES + 2))
    if kind == "large":
        size = draw(st.integers(MAX_NAME_CHARS - 1, 1_000_000))
        filler = draw(st.sampled_from(["x", "é", "\U0001f408", "\ud800"]))
        if draw(st.booleans()):
            return [*VOCABULARY[:2], filler * size]  # one long name
        names = [f"n{i}" for i in range(min(size, 60_000))]  # many names
        if draw(st.booleans()):
            names[-1] = names[0]
        return names
    return draw(st.one_of(st.text(characters, max_size=5), st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=3)))


def expected_answer(value, recorded: list[str] | None, store: bool) -> tuple[int, list[str] | None]:
    """The status a request with ``label_names`` = ``value`` must get, and the names recorded after it."""
    from kdcache.offline.cache.label_names import merge_label_names

    if value is None:
        return 200, recorded
    try:
        merged = merge_label_names(recorded, check_label_names(value, FUZZ_CLASSES), "")
    except CacheError:
        return 422, recorded
    return 200, merged if store else recorded


def inspect_in_a_strict_terminal(cache: Path) -> tuple[int, str]:
    """``cache-inspect`` with stdout and stderr encoded as a UTF-8 terminal would (strict)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = inspect_main([str(cache)])
    out.seek(0)
    return code, out.read()


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param(FUZZ_CI_EXAMPLES, id="ci", marks=pytest.mark.slow),
        pytest.param(FUZZ_SOAK_EXAMPLES, id="soak", marks=pytest.mark.soak),
    ],
)
def test_fuzzing_label_names_on_a_live_server(tmp_path, examples):
    """Random Unicode (lone surrogates included, as JSON escapes) and sizes in ``label_names``:
    no server error, each answer the one the rules give, the model metadata and ``cache-inspect``
    working after every case, and ``/v2/health/live`` answering within 100 ms during each."""
    teacher = small_float_teacher(tmp_path, SHAPE, FUZZ_CLASSES)[1]
    cache = tmp_path / "cache"
    statuses: dict[int, int] = {}
    state = {"recorded": None, "case": 0, "probes": 0, "slow": 0}
    with ServeProcess(["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu"], tmp_path / "serve.log") as server:
        server.wait_ready()
        with HealthProbe(server.url) as health, httpx.Client(base_url=server.url, timeout=60) as client:

            def send(value, store: bool) -> None:
                state["case"] += 1
                body = infer_body([f"case-{state['case']}"], json.dumps(value), store=store)  # ensure_ascii: lone surrogates as escapes
                status, state["recorded"] = expected_answer(value, state["recorded"], store)
                slow = []
                # The same request again is answered the same (a hit, names already recorded), so a
                # slow probe is asked twice more: a request that holds the loop is slow every time,
                # a busy machine (2 shared cores here) rarely three times in a row.
                for _ in range(3):
                    with health.during() as latencies:
                        answer = client.post(INFER, content=body, headers=JSON_HEADERS)
                    assert answer.status_code == status, f"{answer.status_code} {answer.text[:300]}"
                    state["probes"] += len(latencies)
                    if not latencies or max(latencies) < 0.1:
                        break
                    slow.append(max(latencies))
                else:
                    raise AssertionError(f"health answered in {', '.join(f'{s * 1000:.0f}' for s in slow)} ms")
                state["slow"] += len(slow)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                metadata = client.get("/v2/models/teacher")
                assert metadata.status_code == 200 and metadata.json()["parameters"]["label_names"] == state["recorded"]
                code, output = inspect_in_a_strict_terminal(cache)
                assert code == 0, output

            for value in SEEDS:  # every rule once, whatever hypothesis draws
                send(value, True)

            @settings(
                max_examples=examples,
                derandomize=examples == FUZZ_CI_EXAMPLES,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(data=st.data(), store=st.booleans())
            def fuzz(data, store):
                # Names that agree with those recorded so far (a prefix, or an extension), so that
                # requests keep being accepted after the first numbering is recorded.
                agreeing = (state["recorded"] or []) + [name for name in VOCABULARY if name not in (state["recorded"] or [])]
                value = data.draw(st.one_of(st.none(), label_names_values(), st.integers(0, FUZZ_CLASSES).map(lambda k: agreeing[:k])))
                send(value, store)

            fuzz()
        assert server.stop() == 0
    assert "Traceback" not in server.output()
    assert state["probes"] > 0 and all(status in (200, 422) for status in statuses), statuses
    assert statuses.get(200) and statuses.get(422), statuses
    print(
        f"label_names fuzzing: {state['case']} cases, statuses {statuses}, {state['probes']} health probes during them, {state['slow']} over 100 ms (each case asked again)"
    )
