"""Transfer-set sources (offline/sources/) on real files: image folders written with
Pillow, Parquet written with pyarrow, a directory written by Hugging Face ``datasets``, .npy and
.npz; and ``offline-distill --eval`` on an image folder."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN
from PIL import Image

from kdcache.offline import sources
from kdcache.offline.cache.ids import content_ids
from kdcache.offline.sources import SampleSpec, SourceError, detect_kind, open_source

RGB10 = SampleSpec((3, 10, 10), "uint8", num_classes=2)
BILINEAR = Image.Resampling.BILINEAR


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of (width, height): every pixel differs, so a wrong crop or resize shows."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def chw(image: Image.Image) -> np.ndarray:
    """A reference sample, laid out independently of the module: channels-first uint8."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return pixels.transpose(2, 0, 1)


def read_all(source, batch_size: int = 64):
    batches = list(source.batches(batch_size))
    ids = [i for b in batches for i in b.ids]
    return ids, np.concatenate([b.inputs for b in batches]), np.concatenate([b.labels for b in batches]), batches


@pytest.fixture
def class_folder(tmp_path):
    """cat/ and dog/ with a wide PNG, a grayscale JPEG, a lossless WebP, a nested PNG and a note."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "sub").mkdir(parents=True)
    noise((40, 20), seed=1).save(root / "cat" / "a_wide.png")
    noise((20, 30), "L", seed=2).save(root / "cat" / "b_gray.jpg")
    noise((16, 16), seed=3).save(root / "dog" / "c.webp", lossless=True)
    noise((10, 10), seed=4).save(root / "dog" / "sub" / "d.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


# --- image folders ------------------------------------------------------------------------


def test_an_image_folder_is_labelled_by_its_sorted_class_folders(class_folder):
    warnings = []
    source = open_source(class_folder, RGB10, warn=warnings.append, workers=2)
    assert source.kind == "image-folder" and len(source) == 4
    assert source.label_names == ["cat", "dog"]
    ids, inputs, labels, batches = read_all(source, batch_size=3)
    assert ids == ["cat/a_wide.png", "cat/b_gray.jpg", "dog/c.webp", "dog/sub/d.png"]
    assert [len(b) for b in batches] == [3, 1]
    assert labels.tolist() == [0, 0, 1, 1] and labels.dtype == np.int64
    assert inputs.shape == (4, 3, 10, 10) and inputs.dtype == np.uint8
    # a square WebP (lossless) is resized to 10x10 by Pillow's bilinear filter, nothing else
    webp = Image.open(class_folder / "dog" / "c.webp").convert("RGB").resize((10, 10), BILINEAR)
    np.testing.assert_array_equal(inputs[2], chw(webp))
    np.testing.assert_array_equal(inputs[3], chw(Image.open(class_folder / "dog" / "sub" / "d.png")))
    # the grayscale JPEG: the same gray in all three channels, and one warning for the pass
    assert (inputs[1][0] == inputs[1][1]).all() and (inputs[1][0] == inputs[1][2]).all()
    gray = [w for w in warnings if "grayscale" in w]
    assert gray == [f"{class_folder}: converted 1 grayscale image(s) to RGB for the teacher's 3 channels (first: cat/b_gray.jpg)"]
    assert any("left out 1 file(s)" in w and "dog/notes.txt" in w for w in warnings)


def test_the_grayscale_warning_comes_once_per_pass_with_a_count(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5):
        noise((12, 12), "L" if i % 2 == 0 else "RGB", seed=i).save(root / f"{i}.png")
    warnings = []
    source = open_source(root, RGB10, warn=warnings.append)
    read_all(source, batch_size=2)
    assert len(warnings) == 1 and "converted 3 grayscale image(s)" in warnings[0] and "(first: 0.png)" in warnings[0]


@pytest.mark.parametrize("resize", ["short-side", "stretch"])
def test_resize_modes_match_pillow_references(tmp_path, resize):
    root = tmp_path / "flat"
    root.mkdir()
    wide = noise((40, 20), seed=5)  # width 40, height 20
    wide.save(root / "wide.png")
    source = open_source(root, RGB10, resize=resize)
    _, inputs, labels, _ = read_all(source)
    assert labels.tolist() == [-1] and source.label_names is None
    # short side 20 -> 10 keeps the aspect ratio (40x20 -> 20x10), then the center 10 columns
    short_side = wide.resize((20, 10), BILINEAR).crop((5, 0, 15, 10))
    stretch = wide.resize((10, 10), BILINEAR)
    expected = short_side if resize == "short-side" else stretch
    np.testing.assert_array_equal(inputs[0], chw(expected))
    assert not np.array_equal(chw(short_side), chw(stretch))


def test_a_two_dim_input_shape_is_one_channel_and_a_float_dtype_keeps_pixel_values(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    square = noise((30, 30), seed=6)
    square.save(root / "colour.png")
    warnings = []
    _, inputs, _, _ = read_all(open_source(root, SampleSpec((6, 12), "float32"), warn=warnings.append))
    assert inputs.shape == (1, 6, 12) and inputs.dtype == np.float32
    # H=6, W=12 from 30x30: scaled to 12x12 (covers both), rows 3..8 kept
    reference = np.asarray(square.convert("L").resize((12, 12), BILINEAR).crop((0, 3, 12, 9)), dtype=np.float32)
    np.testing.assert_array_equal(inputs[0], reference)
    assert inputs.max() > 1.0  # 0..255, not rescaled to 0..1
    assert len(warnings) == 1 and "converted 1 colour image(s) to grayscale" in warnings[0]
    _, with_axis, _, _ = read_all(open_source(root, SampleSpec((1, 6, 12), "uint8"), warn=lambda m: None))
    np.testing.assert_array_equal(with_axis[:, 0], inputs.astype(np.uint8))


def test_label_names_given_map_class_folders_by_name(class_folder):
    source = open_source(class_folder, SampleSpec((3, 10, 10), "uint8", 3), label_names=["dog", "eel", "cat"], warn=lambda m: None)
    assert source.label_names == ["dog", "eel", "cat"]
    _, _, labels, _ = read_all(source)
    assert labels.tolist() == [2, 2, 0, 0]
    with pytest.raises(SourceError, match=r"images: class folder 'dog' is not among the label names \['cat', 'eel'\]"):
        open_source(class_folder, RGB10, label_names=["cat", "eel"])


def test_bad_images_stop_naming_the_file_or_are_skipped(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    noise((12, 12), seed=7).save(root / "b_good.png")
    whole = encoded(noise((64, 48), seed=8), "JPEG")
    (root / "c_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "a_fake.png").write_text("this is text, not a PNG")
    with pytest.raises(SourceError) as stopped:
        read_all(open_source(root, RGB10))
    assert str(stopped.value) == f"{root / 'a_fake.png'}: not an image Pillow can read"

    (root / "a_fake.png").unlink()
    with pytest.raises(SourceError, match=r"c_truncated\.jpg: cannot decode the image \(OSError: image file is truncated"):
        read_all(open_source(root, RGB10))

    (root / "a_fake.png").write_text("this is text, not a PNG")
    source = open_source(root, RGB10, on_error="skip")
    ids, inputs, _, _ = read_all(source)
    assert ids == ["b_good.png"] and len(inputs) == 1 and len(source) == 3
    assert [item for item, _ in source.skipped] == ["a_fake.png", "c_truncated.jpg"]
    assert "truncated" in source.skipped[1][1]


def test_a_label_outside_the_classes_stops_or_is_skipped(class_folder):
    (class_folder / "eel").mkdir()
    noise((10, 10), seed=9).save(class_folder / "eel" / "e.png")
    with pytest.raises(SourceError, match=r"eel/e\.png \(class folder 'eel'\): label 2 is outside \[0, 2\)"):
        open_source(class_folder, RGB10, warn=lambda m: None)
    source = open_source(class_folder, RGB10, on_error="skip", warn=lambda m: None)
    assert source.skipped == [("eel/e.png", "label 2 is outside [0, 2)")]
    ids, _, labels, _ = read_all(source)
    assert "eel/e.png" not in ids and set(labels.tolist()) == {0, 1}


def test_images_beside_class_folders_and_an_empty_folder_are_refused(tmp_path, class_folder):
    noise((10, 10)).save(class_folder / "loose.png")
    with pytest.raises(SourceError, match="both images at the top"):
        open_source(class_folder, RGB10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="not a transfer set"):
        open_source(tmp_path / "empty", RGB10)


def test_the_image_pipeline_reads_a_bounded_window_ahead(tmp_path, monkeypatch):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(120):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"{i:03d}.png")
    started = []
    lock = threading.Lock()
    decode = sources.images._decode

    def counting(layout, payload):
        with lock:
            started.append(payload)
        return decode(layout, payload)

    monkeypatch.setattr(sources.images, "_decode", counting)
    batches = open_source(root, RGB10, workers=2).batches(4)
    first = next(batches)
    time.sleep(0.2)  # the pool works on what it was given while the caller holds the batch
    assert first.ids == ["000.png", "001.png", "002.png", "003.png"]
    # 4 taken + a window of max(batch, 2 * workers) = 8 submitted ahead, minus the 1 in hand
    assert len(started) <= 12, len(started)
    batches.close()  # an abandoned pass stops its threads
    seen = len(started)
    time.sleep(0.1)
    assert len(started) == seen < 120
    # a full pass, in file order
    ids, inputs, _, _ = read_all(open_source(root, RGB10, workers=3), batch_size=7)
    assert ids == [f"{i:03d}.png" for i in range(120)] and inputs[:, 0, 0, 0].tolist() == list(range(120))


def test_an_input_shape_or_dtype_images_cannot_fit_stops(class_folder):
    with pytest.raises(SourceError, match=r"input shape \[4, 8, 8\] is not \(1\|3, H, W\) or \(H, W\)"):
        open_source(class_folder, SampleSpec((4, 8, 8), "uint8"))
    with pytest.raises(SourceError, match=r"input shape \[8, 8, 3\] .*channels-last"):
        open_source(class_folder, SampleSpec((8, 8, 3), "uint8"))
    with pytest.raises(SourceError, match="input dtype int8 cannot hold pixel values 0..255"):
        open_source(class_folder, SampleSpec((3, 8, 8), "int8"))
    with pytest.raises(SourceError, match=r"input_column='image' applies to Parquet and Hugging Face sources, not to image-folder sources"):
        open_source(class_folder, RGB10, input_column="image")


# --- Parquet --------------------------------------------------------------------------------


def test_a_directory_of_parquet_files_with_an_image_column(tmp_path):
    root = tmp_path / "parquet"
    root.mkdir()
    images = [noise((12 + i, 10), seed=10 + i) for i in range(5)]
    gray = noise((10, 10), "L", seed=20)
    pq.write_table(pa.table({"img": [encoded(im) for im in images[:2]], "labels": [1, None]}), root / "part-0.parquet")
    pq.write_table(
        pa.table({"img": [encoded(im, "JPEG") for im in images[2:4]] + [encoded(gray)], "labels": [0, 1, 0]}),
        root / "part-1.parquet",
        row_group_size=2,
    )
    warnings = []
    source = open_source(root, RGB10, warn=warnings.append)
    assert source.kind == "parquet" and len(source) == 5 and source.label_names is None
    ids, inputs, labels, batches = read_all(source, batch_size=3)
    assert ids == ["part-0.parquet:0", "part-0.parquet:1", "part-1.parquet:0", "part-1.parquet:1", "part-1.parquet:2"]
    assert [len(b) for b in batches] == [3, 2]
    assert labels.tolist() == [1, -1, 0, 1, 0]
    reference = images[0].resize((12, 10), BILINEAR).crop((1, 0, 11, 10))  # 12x10: crop the middle 10 columns
    np.testing.assert_array_equal(inputs[0], chw(reference))
    assert len(warnings) == 1 and "(first: part-1.parquet:2)" in warnings[0]


def test_parquet_array_columns_ids_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 3, 4, 4))
    path = tmp_path / "arrays.parquet"
    pq.write_table(
        pa.table(
            {
                "pixel_values": [row.ravel().tolist() for row in values],
                "nested": values.tolist(),
                "id": [7, 8, 9, 10],
                "label": [0, 1, 1, 0],
            }
        ),
        path,
    )
    spec = SampleSpec((3, 4, 4), "float32", 2)
    ids, flat, labels, _ = read_all(open_source(path, spec), batch_size=3)
    assert ids == ["7", "8", "9", "10"] and labels.tolist() == [0, 1, 1, 0]
    assert flat.dtype == np.float32 and flat.shape == (4, 3, 4, 4)
    np.testing.assert_array_equal(flat, values.astype(np.float32))
    _, nested, _, _ = read_all(open_source(path, spec, input_column="nested"))
    np.testing.assert_array_equal(nested, flat)
    # nested lists carry a layout: [4, 4, 3] for (3, 4, 4) would scramble it
    pq.write_table(pa.table({"image_hwc": values.transpose(0, 2, 3, 1).tolist()}), tmp_path / "hwc.parquet")
    with pytest.raises(SourceError, match=r"inputs have sample shape \[4, 4, 3\], the teacher takes \[3, 4, 4\] \(channels-last"):
        read_all(open_source(tmp_path / "hwc.parquet", spec, input_column="image_hwc"))
    # floats cannot become uint8 pixels; integers outside 0..255 cannot either
    with pytest.raises(SourceError, match="inputs are float64, the teacher takes uint8"):
        read_all(open_source(path, SampleSpec((3, 4, 4), "uint8")))
    pq.write_table(pa.table({"pixel_values": [[300] * 48, [0] * 48]}), tmp_path / "big.parquet")
    with pytest.raises(
        SourceError, match=r"big\.parquet: column 'pixel_values': inputs hold int64 values 0\.\.300, outside the teacher's uint8"
    ):
        read_all(open_source(tmp_path / "big.parquet", SampleSpec((3, 4, 4), "uint8")))
    pq.write_table(pa.table({"pixel_values": [[1] * 48, [1] * 47]}), tmp_path / "ragged.parquet")
    with pytest.raises(SourceError, match=r"row 1 holds 47 numbers, the teacher's input shape \[3, 4, 4\] needs 48"):
        read_all(open_source(tmp_path / "ragged.parquet", spec))


def test_parquet_errors_name_the_file_the_row_and_the_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"pixels": [[1] * 48] * 3, "target": [0, 5, 1]}), path)
    spec = SampleSpec((3, 4, 4), "uint8", 2)
    with pytest.raises(SourceError, match=r"t\.parquet: no input column named image or img or pixel_values \(columns: pixels, target\)"):
        open_source(path, spec)
    with pytest.raises(SourceError, match=r"t\.parquet: has no label column 'label' \(columns: pixels, target\)"):
        open_source(path, spec, input_column="pixels", label_column="label")
    with pytest.raises(SourceError, match=r"t\.parquet: row 1: label 5 is outside \[0, 2\)"):
        read_all(open_source(path, spec, input_column="pixels", label_column="target"))
    source = open_source(path, spec, input_column="pixels", label_column="target", on_error="skip")
    ids, _, labels, _ = read_all(source)
    assert ids == ["t.parquet:0", "t.parquet:2"] and labels.tolist() == [0, 1]
    assert source.skipped == [("t.parquet:1", "label 5 is outside [0, 2)")]
    # a bad image in a bytes column: stop names the row, skip goes on
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [encoded(noise((10, 10))), b"garbage", None]}), bad)
    with pytest.raises(SourceError, match=r"bad\.parquet: row 1: not an image Pillow can read"):
        read_all(open_source(bad, RGB10))
    skipping = open_source(bad, RGB10, on_error="skip")
    assert read_all(skipping)[0] == ["bad.parquet:0"]
    assert skipping.skipped == [("bad.parquet:1", "not an image Pillow can read"), ("bad.parquet:2", "input column 'image' is null")]


# --- Hugging Face datasets ------------------------------------------------------------------


def test_a_saved_hugging_face_dataset_with_images_and_class_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [noise((10, 10), seed=30), noise((14, 10), seed=31), noise((10, 10), "L", seed=32)]
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": encoded(im), "path": None} for im in images], "label": [1, 0, 1]})
    dataset = dataset.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["no", "yes"]))
    dataset.save_to_disk(tmp_path / "hf", num_shards=2)
    files = [entry["filename"] for entry in json.loads((tmp_path / "hf" / "state.json").read_text())["_data_files"]]
    rows_per_file = [pa.ipc.open_stream(pa.memory_map(str(tmp_path / "hf" / name))).read_all().num_rows for name in files]
    assert len(files) == 2 and sum(rows_per_file) == 3
    warnings = []
    source = open_source(tmp_path / "hf", RGB10, warn=warnings.append)
    assert source.kind == "hf-dataset" and len(source) == 3 and source.label_names == ["no", "yes"]
    ids, inputs, labels, _ = read_all(source, batch_size=2)
    assert ids == [f"{name}:{row}" for name, count in zip(files, rows_per_file, strict=True) for row in range(count)]
    assert labels.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(inputs[0], chw(images[0]))
    np.testing.assert_array_equal(inputs[1], chw(images[1].resize((14, 10), BILINEAR).crop((2, 0, 12, 10))))
    assert len(warnings) == 1 and "1 grayscale" in warnings[0]
    # the cache's names: the dataset's classes are mapped through them
    mapped = open_source(tmp_path / "hf", SampleSpec((3, 10, 10), "uint8", 3), label_names=["maybe", "yes", "no"], warn=lambda m: None)
    assert mapped.label_names == ["maybe", "yes", "no"] and read_all(mapped)[2].tolist() == [1, 2, 1]
    with pytest.raises(SourceError, match="class 'no' of label column 'label' is not among the label names"):
        open_source(tmp_path / "hf", RGB10, label_names=["yes"])
    # a DatasetDict is a folder of splits: point at one
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(tmp_path / "dd")
    with pytest.raises(SourceError, match=r"a DatasetDict with splits test, train; pass one split's folder, e.g. .*dd/test"):
        open_source(tmp_path / "dd", RGB10)


def test_a_saved_hugging_face_dataset_of_arrays(tmp_path):
    datasets = pytest.importorskip("datasets")
    values = np.arange(4 * 64, dtype=np.float32).reshape(4, 1, 8, 8)
    dataset = datasets.Dataset.from_dict({"pixel_values": values, "id": ["a", "b", "c", "d"]})
    dataset = dataset.cast_column("pixel_values", datasets.Array3D((1, 8, 8), "float32"))
    dataset.save_to_disk(tmp_path / "arrays")
    source = open_source(tmp_path / "arrays", SampleSpec((8, 8), "float32"))  # (1, 8, 8) fits (8, 8)
    ids, inputs, labels, _ = read_all(source, batch_size=3)
    assert ids == ["a", "b", "c", "d"] and labels.tolist() == [-1] * 4
    np.testing.assert_array_equal(inputs, values[:, 0])


# --- .npy and .npz --------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_an_npy_is_memory_mapped_and_read_batch_by_batch(tmp_path):
    path = tmp_path / "big.npy"
    rows = 16384  # 64 MiB of 4 KiB samples
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 4, 32, 32))
    array[:, 0, 0, 0] = np.arange(rows) % 251
    array.flush()
    del array
    before = rss_bytes()
    source = open_source(path, SampleSpec((4, 32, 32), "uint8"))
    batches = source.batches(16)
    first = next(batches)
    assert rss_bytes() - before < 16 << 20  # 64 KiB of rows read, not 64 MiB
    assert source.kind == "npy" and len(source) == rows
    assert first.ids == list(content_ids(first.inputs)) and first.labels.tolist() == [-1] * 16
    assert first.inputs[:, 0, 0, 0].tolist() == list(range(16)) and not isinstance(first.inputs, np.memmap)
    batches.close()
    np.save(tmp_path / "hwc.npy", np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(
        SourceError, match=r"hwc\.npy: inputs have sample shape \[10, 10, 3\], the teacher takes \[3, 10, 10\] \(channels-last"
    ):
        open_source(tmp_path / "hwc.npy", RGB10)
    np.save(tmp_path / "float.npy", np.zeros((2, 3, 10, 10)))
    with pytest.raises(SourceError, match=r"float\.npy: inputs are float64, the teacher takes uint8"):
        open_source(tmp_path / "float.npy", RGB10)


def test_an_npz_keeps_the_transfer_set_rules(tmp_path):
    from kdcache.offline.cache import content_ids

    inputs = np.arange(4 * 300).reshape(4, 3, 10, 10) % 256  # int64 values that fit uint8
    np.savez(tmp_path / "t.npz", inputs=inputs, labels=np.array([0, 1, -1, 1]), ids=np.array(["w", "x", "y", "z"]))
    source = open_source(tmp_path / "t.npz", RGB10)
    ids, got, labels, _ = read_all(source, batch_size=3)
    assert source.kind == "npz" and ids == ["w", "x", "y", "z"] and labels.tolist() == [0, 1, -1, 1]
    assert got.dtype == np.uint8 and (got == inputs).all()
    np.savez(tmp_path / "plain.npz", inputs=inputs.astype(np.uint8))
    ids, _, labels, _ = read_all(open_source(tmp_path / "plain.npz", RGB10))
    assert ids == list(content_ids(inputs.astype(np.uint8))) and labels.tolist() == [-1] * 4  # the service's default ids
    np.savez(tmp_path / "bad.npz", inputs=inputs, labels=np.array([0, 3, 1, 1]))
    with pytest.raises(SourceError, match=r"bad\.npz: row 1: label 3 is outside \[0, 2\)"):
        read_all(open_source(tmp_path / "bad.npz", RGB10))


def test_detection_leaves_caches_and_unknown_files_alone(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    noise((10, 10)).save(cache / "stray.png")
    assert detect_kind(cache) is None
    with pytest.raises(SourceError, match="a cache directory"):
        open_source(cache, RGB10)
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(SourceError, match=r"notes\.csv: not a transfer set"):
        open_source(tmp_path / "notes.csv", RGB10)
    with pytest.raises(SourceError, match=r"missing\.parquet: no such file or directory"):
        open_source(tmp_path / "missing.parquet", RGB10)
    assert [kind.kind for kind in sources.SOURCE_KINDS] == ["npz", "npy", "hf-dataset", "parquet", "image-folder"]


def test_the_module_loads_neither_torch_nor_hdf5_nor_its_readers_until_a_kind_needs_them():
    import sys

    code = (
        "import sys, kdcache.offline.sources as s; s.SampleSpec((3, 4, 4), 'uint8');"
        "print(sorted(m for m in ('torch', 'h5py', 'PIL', 'pyarrow', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_a_missing_reader_names_the_extra_to_install(class_folder, tmp_path, monkeypatch):
    import sys

    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    with pytest.raises(
        SourceError, match=r"reading images needs Pillow: pip install -e '\.\[data\]' in a checkout \(pip install 'kdcache\[data\]' where"
    ):
        open_source(class_folder, RGB10)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SourceError, match=r"needs pyarrow: pip install -e '\.\[data\]' in a checkout"):
        open_source(tmp_path / "t.parquet", RGB10)


# --- offline-distill --eval -----------------------------------------------------------------


def test_load_eval_set_reads_an_image_folder_through_the_caches_label_names(class_folder):
    from kdcache.offline.cache import CacheMeta
    from kdcache.offline.evaluate import EvalSetError, load_eval_set

    meta = CacheMeta(teacher_fingerprint="0" * 64, teacher_name="t", num_classes=3, input_shape=(3, 10, 10), input_dtype="uint8")
    inputs, labels = load_eval_set(str(class_folder), meta, label_names=["dog", "cat", "eel"])
    assert inputs.shape == (4, 3, 10, 10) and labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(EvalSetError, match="has no 'labels' array to evaluate against"):
        load_eval_set(str(class_folder / "dog" / "sub"), meta)  # a flat folder: no labels


@pytest.mark.slow
def test_offline_distill_evaluates_on_an_image_folder(tmp_path):
    from digits import write_cache

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    # class 0 dark (0..4), class 1 bright (11..16, the digits' range): a student separates them in a few steps
    x = np.where(labels[:, None, None, None] == 0, rng.integers(0, 5, (200, 3, 8, 8)), rng.integers(11, 17, (200, 3, 8, 8))).astype(
        np.uint8
    )
    logits = np.where(labels[:, None] == np.arange(2), 5.0, -5.0).astype(np.float32)
    cache = write_cache(tmp_path / "cache", x, logits, labels)
    folder = tmp_path / "eval"
    for name, low, high in (("a_dark", 0, 5), ("b_bright", 11, 17)):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(low, high, (10, 12, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    Image.fromarray(np.full((9, 9), 14, np.uint8), "L").save(folder / "b_bright" / "gray.png")
    proc = subprocess.run(
        [str(BIN / "offline-distill"), "--no-progress", "--cache", str(cache), "--student", "mlp-small", "--epochs", "2",
         "--batch-size", "8", "--lr", "3e-2", "--eval", str(folder), "--out", str(tmp_path / "run"), "--no-export"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted 1 grayscale image(s) to RGB" in proc.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["eval_accuracy"] == 1.0, summary  # swapped labels would give 0.0
