"""teacher-push --data SOURCE and the label names of a cache.

In process (fast): the service records a request's ``label_names`` in the cache's manifest
before it answers, on the binary and the JSON paths, lets one mapping extend another, and
refuses a conflicting or malformed one (422) without storing anything from that request.

End to end (slow): a real ``teacher-serve`` and real ``teacher-push`` processes push an image
folder and a Parquet file; the labels come from the class folders, the ids from the paths,
a re-push is all hits, the names reach the manifest, ``cache-inspect`` and ``offline-distill``;
a conflicting mapping is refused; ``--on-error skip|stop`` with a corrupt image.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BIN
from PIL import Image

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, Preprocessing
from kdcache.offline.cache.manifest import load_manifest
from kdcache.offline.cache.storage import LocalStorage
from kdcache.offline.sources import SampleSpec
from kdcache.service.app import create_app
from kdcache.service.client import ClientError, sample_spec_of
from kdcache.service.launch import ServeProcess
from kdcache.service.protocol import encode_request
from kdcache.service.push import push_main
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.signature import ModelSpec, model_metadata
from kdcache.service.teacher import load_teacher

SHAPE, CLASSES = (3, 16, 16), 4


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    """A random-weight ``mlp-small`` on uint8 [3, 16, 16] images, as teacher-serve loads it."""
    torch.manual_seed(0)
    model = models.build("mlp-small", SHAPE, CLASSES).eval()
    meta = CacheMeta("0" * 64, "mlp-small", CLASSES, SHAPE, "uint8", Preprocessing(scale=1 / 255))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(models.student_record("mlp-small", model, meta, temperature=1.0, alpha=1.0), path)
    return path


# ---------------------------------------------------------------------------------------------
# The service records label_names (in process)


@contextlib.asynccontextmanager
async def serving(cache: Path, teacher: Path):
    settings = ServeSettings(teacher=[str(teacher)], cache=cache, device="cpu")
    service = TeacherService.open(settings, load_teacher(settings.teacher, temperature=1.0, device="cpu"))
    app = create_app(service)
    await service.start()
    for _ in range(500):
        if service.ready:
            break
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield service, client
    finally:
        await service.stop()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


async def post(client, ids, labels=None, *, binary=True, **parameters):
    tensors = [("input", images(len(ids), seed=len(ids))), ("id", np.array(ids, dtype=object))]
    if labels is not None:
        tensors.append(("label", np.asarray(labels, dtype=np.int64)))
    body, headers = encode_request(tensors, parameters=parameters, binary=binary)
    return await client.post("/v2/models/teacher/infer", content=body, headers=headers)


def recorded(cache: Path) -> list[str] | None:
    return load_manifest(LocalStorage(cache)).label_names


def test_the_service_records_label_names_before_answering_and_refuses_a_conflict(tmp_path, teacher_pt):
    cache = tmp_path / "cache"

    async def body():
        async with serving(cache, teacher_pt) as (service, client):
            assert (await post(client, ["a", "b"], [0, 1])).status_code == 200
            assert recorded(cache) is None  # no names sent, none recorded

            answer = await post(client, ["c", "d"], [0, 1], label_names=["cat", "dog"])
            assert answer.status_code == 200, answer.text
            assert recorded(cache) == ["cat", "dog"]  # durable in the manifest when the answer comes
            # The JSON path carries parameters as the binary one does; the same names again are no change.
            assert (await post(client, ["e"], [1], binary=False, label_names=["cat", "dog"])).status_code == 200
            # A source with one class more numbers the first two the same way: the mapping grows.
            assert (await post(client, ["f"], [2], label_names=["cat", "dog", "eel"])).status_code == 200
            assert recorded(cache) == ["cat", "dog", "eel"]
            assert (await client.get("/v2/models/teacher")).json()["parameters"]["label_names"] == ["cat", "dog", "eel"]

            samples = service.store.num_samples
            for names, labels, message in (
                (["dog", "cat"], [0], "label 0 is named 'dog', but the cache's label_names name it 'cat' (0=cat, 1=dog, 2=eel)"),
                (["cat", "dog", "fox"], [0], "label 2 is named 'fox', but the cache's label_names name it 'eel'"),
                (["a", "b", "c", "d", "e"], [0], "label_names: 5 names, but the model has 4 classes"),
                (["cat", "cat"], [0], "label_names: names 'cat' more than once (names 0 and 1)"),
                (["cat", ""], [0], "label_names: must be a list of non-empty strings: name 1 is empty"),
                ("cat", [0], "label_names: must be a list of non-empty strings, got str"),
                (["cat", "dog"], [2], "label: value 2 has no name: label_names names 2 labels"),
            ):
                for binary in (True, False):
                    answer = await post(client, ["g"], labels, binary=binary, label_names=names)
                    assert answer.status_code == 422, (names, answer.text)
                    error = answer.json()["error"]
                    assert message in error and "\n" not in error, error
            assert service.store.num_samples == samples and recorded(cache) == ["cat", "dog", "eel"]  # nothing stored

    asyncio.run(body())
    # A restart keeps them, and refuses a conflict it did not see before.
    asyncio.run(restarted(cache, teacher_pt))


async def restarted(cache: Path, teacher_pt: Path) -> None:
    async with serving(cache, teacher_pt) as (_, client):
        assert (await post(client, ["h"], [0], label_names=["cat"])).status_code == 200
        answer = await post(client, ["i"], [0], label_names=["dog"])
        assert answer.status_code == 422 and "label 0 is named 'dog'" in answer.json()["error"]
    assert recorded(cache) == ["cat", "dog", "eel"]
    assert json.loads((cache / "manifest.json").read_text())["num_samples"] == 7  # a..f and h


# ---------------------------------------------------------------------------------------------
# teacher-push --data SOURCE against a real teacher-serve (end to end)


def noise(size: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random square image of ``size`` pixels a side."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def class_folders(root: Path, classes: dict[str, int], *, seed: int = 0, stem: str = "") -> dict[str, np.ndarray]:
    """``root/CLASS/{stem}{i}.png`` for each class and count; returns each file's expected sample
    by id (the image is already the model's size, so the sample is its pixels channels-first)."""
    expected = {}
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            image = noise(SHAPE[1], seed * 1000 + c * 100 + i)
            image.save(root / name / f"{stem}{i}.png")
            expected[f"{name}/{stem}{i}.png"] = np.asarray(image).transpose(2, 0, 1)
    return expected


def push(url: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "teacher-push"), "--url", url, "--data", str(data), "--batch-size", "4", "--no-progress", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def summary(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("teacher-push: ")]
    return line


def rows(cache: Path) -> dict[str, tuple[int, np.ndarray]]:
    stored = CacheReader(cache).read(("ids", "labels", "inputs"))
    return {sample_id: (int(label), x) for sample_id, label, x in zip(stored["ids"], stored["labels"], stored["inputs"], strict=True)}


def serve(tmp_path: Path, teacher: Path) -> ServeProcess:
    return ServeProcess(["--teacher", str(teacher), "--cache", str(tmp_path / "cache"), "--device", "cpu"], tmp_path / "serve.log")


@pytest.mark.slow
def test_an_image_folder_is_pushed_labelled_by_its_folders_and_the_names_reach_the_trainer(tmp_path, teacher_pt):
    cache = tmp_path / "cache"
    expected = class_folders(tmp_path / "images", {"cat": 3, "dog": 4})
    with serve(tmp_path, teacher_pt) as server:
        server.wait_ready()
        assert " 7 samples, 0 hits, 7 misses, " in summary(push(server.url, tmp_path / "images"))
        assert " 7 samples, 7 hits, 0 misses, " in summary(push(server.url, tmp_path / "images", "--concurrency", "1"))

        # A folder of some of the classes is numbered as the cache numbers them (dog is 1 here too).
        expected |= class_folders(tmp_path / "dogs", {"dog": 2}, seed=1, stem="more-")
        (tmp_path / "dogs" / "dog" / "notes.txt").write_text("not an image")
        dogs = push(server.url, tmp_path / "dogs")
        assert " 2 samples, 0 hits, 2 misses, " in summary(dogs)
        assert dogs.stderr.count("teacher-push: warning: ") == 1 and "left out 1 file(s)" in dogs.stderr, (
            dogs.stderr
        )  # once, not per opening
        # A folder that numbers its classes otherwise, with a class the cache does not name, is refused.
        class_folders(tmp_path / "ants", {"ant": 1, "cat": 1}, seed=2, stem="ant-")
        refused = push(server.url, tmp_path / "ants")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "HTTP 422: label_names: label 0 is named 'ant', but the cache's label_names name it 'cat' (0=cat, 1=dog)" in refused.stderr
        assert server.stop() == 0

    stored = rows(cache)
    assert sorted(stored) == sorted(expected)  # ids are the paths; the refused push stored nothing
    for sample_id, sample in expected.items():
        label, x = stored[sample_id]
        assert label == (0 if sample_id.startswith("cat/") else 1), sample_id
        np.testing.assert_array_equal(x, sample)
    assert CacheReader(cache).label_names == ["cat", "dog"]

    inspect = subprocess.run([str(BIN / "cache-inspect"), str(cache)], capture_output=True, text=True, check=True).stdout
    assert "label names      0=cat, 1=dog\n" in inspect
    inspect_json = subprocess.run([str(BIN / "cache-inspect"), "--json", str(cache)], capture_output=True, text=True, check=True).stdout
    assert json.loads(inspect_json)["label_names"] == ["cat", "dog"]

    distill = [
        str(BIN / "offline-distill"),
        "--cache",
        str(cache),
        "--student",
        "mlp-small",
        "--epochs",
        "1",
        "--no-progress",
        "--no-export",
    ]
    run = subprocess.run(
        [*distill, "--out", str(tmp_path / "run"), "--eval", str(tmp_path / "dogs")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "labels: 0=cat, 1=dog\n" in run.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["label_names"] == ["cat", "dog"]
    # The eval folder is numbered by the cache's names: a class the cache does not name is an error.
    run = subprocess.run(
        [*distill, "--out", str(tmp_path / "run2"), "--eval", str(tmp_path / "ants")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0 and "class folder 'ant' is not among the label names" in run.stderr, run.stderr


@pytest.mark.slow
def test_a_parquet_file_and_a_corrupt_image_skipped_or_stopped_at(tmp_path, teacher_pt):
    images = [noise(SHAPE[1], seed) for seed in range(5)]
    table = {"image": [encoded(image) for image in images], "label": [0, 1, 2, 3, None]}
    pq.write_table(pa.table(table), tmp_path / "train.parquet")
    folder = tmp_path / "images"
    class_folders(folder, {"a": 2, "b": 2})
    (folder / "b" / "1.png").write_bytes(b"not a png")  # sorted last
    with serve(tmp_path, teacher_pt) as server:
        server.wait_ready()
        assert " 5 samples, 0 hits, 5 misses, " in summary(push(server.url, tmp_path / "train.parquet"))
        assert " 5 samples, 5 hits, 0 misses, " in summary(push(server.url, tmp_path / "train.parquet"))

        stopped = push(server.url, folder)
        assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1, stopped.stderr
        assert stopped.stderr.startswith(f"teacher-push: error: {folder / 'b' / '1.png'}: "), stopped.stderr
        skipped = summary(push(server.url, folder, "--on-error", "skip", "--workers", "1"))
        assert ", 1 skipped: b/1.png (" in skipped and " 3 samples, " in skipped, skipped
        assert server.stop() == 0

    stored = rows(tmp_path / "cache")
    for row, image in enumerate(images):
        label, x = stored[f"train.parquet:{row}"]
        assert label == [0, 1, 2, 3, -1][row]
        np.testing.assert_array_equal(x, np.asarray(image).transpose(2, 0, 1))
    assert "b/1.png" not in stored and {"a/0.png", "a/1.png", "b/0.png"} <= set(stored)
    assert CacheReader(tmp_path / "cache").label_names == ["a", "b"]  # the Parquet labels are bare integers: no names


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# teacher-push's own checks (no server)


def test_the_sample_spec_comes_from_the_model_metadata():
    spec = ModelSpec(input_shape=SHAPE, input_dtype="uint8", num_classes=CLASSES, temperature=1.0, max_samples=8, views=3)
    assert sample_spec_of(model_metadata("teacher", spec, {}), "here") == SampleSpec(SHAPE, "uint8", CLASSES)  # [-1, V, C]: C
    with pytest.raises(ClientError, match="here: model metadata lacks the input tensor"):
        sample_spec_of({"inputs": [], "outputs": []}, "here")


def test_source_options_are_refused_for_an_npz_and_a_missing_source_is_named(tmp_path, capsys):
    np.savez(tmp_path / "set.npz", inputs=images(2))
    unreachable = ["--url", "http://127.0.0.1:9", "--max-retries", "0", "--no-progress"]
    assert push_main([*unreachable, "--data", str(tmp_path / "set.npz"), "--on-error", "skip", "--workers", "2"]) == 2
    assert capsys.readouterr().err == (
        "teacher-push: error: --on-error --workers: an .npz is read whole (inputs, labels, ids); these options are for other sources\n"
    )
    assert push_main([*unreachable, "--data", str(tmp_path / "nowhere")]) == 2  # named before the server is asked anything
    assert capsys.readouterr().err == f"teacher-push: error: {tmp_path / 'nowhere'}: no such file or directory\n"


# ---------------------------------------------------------------------------------------------
# A one-channel teacher: an .npz without its channel axis, and push_source from Python


@pytest.fixture
def gray_server(tmp_path):
    """A real teacher-serve of a random-weight ``mlp-small`` on uint8 [1, 16, 16] images."""
    root = tmp_path / "gray"
    root.mkdir()
    torch.manual_seed(0)
    shape = (1, *SHAPE[1:])
    model = models.build("mlp-small", shape, CLASSES).eval()
    meta = CacheMeta("0" * 64, "mlp-small", CLASSES, shape, "uint8", Preprocessing(scale=1 / 255))
    torch.save(models.student_record("mlp-small", model, meta, temperature=1.0, alpha=1.0), root / "teacher.pt")
    with serve(root, root / "teacher.pt") as server:
        server.wait_ready()
        yield server, root / "cache"


@pytest.mark.slow
def test_an_npz_without_the_channel_axis_is_fitted_as_the_same_npy_is(tmp_path, gray_server):
    server, cache = gray_server
    arrays = np.random.default_rng(7).integers(0, 256, (3, *SHAPE[1:]), dtype=np.uint8)  # [N, 16, 16] for [1, 16, 16]
    np.savez(tmp_path / "set.npz", inputs=arrays)
    np.save(tmp_path / "set.npy", arrays)
    assert " 3 samples, 0 hits, 3 misses, " in summary(push(server.url, tmp_path / "set.npz"))
    assert " 3 samples, 3 hits, 0 misses, " in summary(push(server.url, tmp_path / "set.npy"))  # the same ids: content hashes


@pytest.mark.slow
def test_push_source_numbers_a_folder_of_some_classes_as_teacher_push_does(tmp_path, gray_server):
    """The README's example, ``client.push_source(open_source(path, client.sample_spec()))``, on a
    folder holding only the second of the cache's classes."""
    from kdcache.offline.sources import open_source
    from kdcache.service.client import TeacherClient

    for folder, classes in (("both", ("cat", "dog")), ("dogs", ("dog",))):
        for name in classes:
            (tmp_path / folder / name).mkdir(parents=True)
            noise(SHAPE[1], len(folder) * 10 + len(name), "L").save(tmp_path / folder / name / f"{folder}.png")
    server, cache = gray_server
    with TeacherClient(server.url) as client:
        assert client.push_source(open_source(tmp_path / "both", client.sample_spec()), progress=False).cache_misses == 2
        dogs = client.push_source(open_source(tmp_path / "dogs", client.sample_spec()), progress=False)
        assert (dogs.samples, dogs.cache_misses) == (1, 1)
        assert client.metadata()["parameters"]["label_names"] == ["cat", "dog"]
    assert server.stop() == 0
    stored = rows(cache)
    assert (stored["dog/dogs.png"][0], stored["dog/both.png"][0], stored["cat/both.png"][0]) == (1, 1, 0)


@pytest.mark.slow
def test_push_asks_for_no_output_and_gets_none_back(gray_server):
    """teacher-push uses only the hit and miss counts of each answer (its parameters): it asks
    for no output tensor, so none is computed or sent back (issue 22)."""
    from kdcache.service.client import TeacherClient

    server, _ = gray_server
    results = []
    with TeacherClient(server.url) as client:
        infer = client._infer

        def recording(*args, **kwargs):
            result, retries = infer(*args, **kwargs)
            results.append((kwargs["outputs"], result))
            return result, retries

        client._infer = recording
        x = np.random.default_rng(3).integers(0, 256, (5, *SHAPE[1:]), dtype=np.uint8)[:, None]
        summary = client.push(x, batch_size=2, progress=False)
    assert (summary.samples, summary.cache_misses) == (5, 5) and len(results) == 3
    assert all(outputs == () and result.soft_targets is None and result.logits is None for outputs, result in results)
