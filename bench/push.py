"""Push benchmark: does ``teacher-push --data images/`` decode fast enough that the teacher
service, not the decoding, sets the pace?

Side by side in one run, on one machine (method: docs/benchmarks.md, "Bring your own data"):

1. **Decode only**: samples/s of iterating ``open_source(folder).batches()``, what teacher-push
   iterates (list the class folders, decode with Pillow, convert to RGB, resize short-side and
   center-crop to the teacher's 32×32, stack), with 1 decoding thread and with the default (the
   CPU count), for a folder of 64×64 PNGs and one of the same images as JPEGs. No server runs.
2. **Ingest**: samples/s of teacher-push's loop (``TeacherClient.push_source``) from a
   pre-decoded ``.npy`` of the same inputs into a fresh ``teacher-serve`` with a small CPU
   teacher (random weights, uint8 [3, 32, 32]): the service's pace with nothing to decode.
3. **End to end**: the same push from each image folder, default decoding threads.

Every push goes to a fresh cache (all misses: the teacher runs on every sample). Rounds
alternate the order of the pushes. The goal: end to end ÷ ingest >= 0.9, i.e. decoding is not
the bottleneck against a CPU teacher.

    .venv/bin/python -m bench.push            # about a minute on 2 cores
    .venv/bin/python -m bench.push --quick    # about 25 s
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import harness
from kdcache.offline.sources import SampleSpec, open_source
from kdcache.service.client import TeacherClient
from kdcache.service.launch import ServeProcess

SHAPE, CLASSES = (3, 32, 32), 10
FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 90})}
GOAL = 0.9  # end-to-end push from images ÷ push of the pre-decoded inputs
CLK_TCK = os.sysconf("SC_CLK_TCK")


def write_images(root: Path, count: int, size: int, seed: int) -> dict[str, Path]:
    """``count`` images of ``size``×``size`` in ``CLASSES`` class folders, once per format, with
    the same pixels: smooth random colour fields (8×8 noise upsampled bicubically) with a little
    pixel noise, which compress more like photographs than pure noise does."""
    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in FORMATS}
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        for name, (fmt, options) in FORMATS.items():
            folder = folders[name] / f"class-{i % CLASSES:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:06d}.{name}", fmt, **options)
    return folders


def decode_only(folder: Path, spec: SampleSpec, batch_size: int, workers: int | None) -> dict[str, Any]:
    """One pass of the source, timed from opening (the listing is part of the cost)."""
    meter = harness.CpuMeter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    source = open_source(folder, spec, workers=workers)
    samples = sum(len(batch) for batch in source.batches(batch_size))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds, "client_cores": cpu / seconds, **meter.stop()}


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def push(data: Path, teacher: Path, cache: Path, log: Path, args: Any) -> dict[str, Any]:
    """One push of ``data`` (default decoding threads) into a fresh teacher-serve: the loop's own
    seconds (teacher-push's summary), this process's CPU (the decoding and the HTTP client) and
    the server's, both as cores busy on average."""
    with ServeProcess(["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu"], log) as server:
        server.wait_ready()
        with TeacherClient(server.url) as client:
            source = open_source(data, client.sample_spec())
            meter = harness.CpuMeter()
            before, server_before = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(server.pid)
            summary = client.push_source(source, batch_size=args.batch_size, concurrency=args.concurrency, progress=False)
            after, server_after = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(server.pid)
            foreign = meter.stop()
        if server.stop() != 0:
            raise SystemExit(f"teacher-serve did not stop cleanly: {server.last_line()} (log: {log})")
    if summary.cache_misses != summary.samples or summary.skipped:
        raise SystemExit(f"push of {data}: expected {summary.samples} misses and nothing skipped, got {summary.line()}")
    client_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {
        "samples": summary.samples, "seconds": summary.seconds, "samples_per_s": summary.samples_per_s, "requests": summary.requests,
        "client_cores": client_cpu / summary.seconds, "server_cores": (server_after - server_before) / summary.seconds, **foreign,
    }  # fmt: skip


def median(runs: list[dict[str, Any]], key: str = "samples_per_s") -> float:
    return statistics.median(run[key] for run in runs)


def measure(args: Any, root: Path) -> dict[str, Any]:
    harness.say(f"writing {args.images} {args.size}x{args.size} images as PNG and JPEG ...")
    folders = write_images(root / "images", args.images, args.size, args.seed)
    spec = SampleSpec(SHAPE, "uint8", CLASSES)
    ids_inputs = [(batch.ids, batch.inputs) for batch in open_source(folders["png"], spec).batches(args.batch_size)]
    npy = root / "inputs.npy"
    np.save(npy, np.concatenate([inputs for _, inputs in ids_inputs]))
    teacher = harness.write_teacher(root / "teacher.pt", args.teacher_arch, SHAPE, CLASSES, seed=args.seed).path
    decode: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"1": [], "default": []} for name in FORMATS}
    pushes: dict[str, list[dict[str, Any]]] = {"npy": [], **{name: [] for name in FORMATS}}
    sources = {"npy": npy, **folders}
    for round_ in range(args.rounds):
        order = list(sources) if round_ % 2 == 0 else list(reversed(sources))
        for name in order:
            harness.say(f"round {round_ + 1}/{args.rounds}: push {name} ...")
            run = push(sources[name], teacher, root / f"cache-{name}-{round_}", root / f"serve-{name}-{round_}.log", args)
            pushes[name].append(run)
        for name in FORMATS if round_ % 2 == 0 else reversed(FORMATS):
            for workers in ("1", "default"):
                harness.say(f"round {round_ + 1}/{args.rounds}: decode {name}, {workers} thread(s) ...")
                decode[name][workers].append(decode_only(folders[name], spec, args.batch_size, 1 if workers == "1" else None))
    ingest = median(pushes["npy"])
    summary = {
        "ingest_samples_per_s": ingest,
        **{f"push_{name}_vs_ingest": median(pushes[name]) / ingest for name in FORMATS},
        **{f"decode_{name}_default_vs_ingest": median(decode[name]["default"]) / ingest for name in FORMATS},
        **{f"decode_{name}_default_vs_1": median(decode[name]["default"]) / median(decode[name]["1"]) for name in FORMATS},
    }
    summary["goal_met"] = all(summary[f"push_{name}_vs_ingest"] >= GOAL for name in FORMATS)
    bytes_per_image = {name: sum(p.stat().st_size for p in folder.rglob(f"*.{name}")) / args.images for name, folder in folders.items()}
    return {"decode": decode, "push": pushes, "summary": summary, "bytes_per_image": bytes_per_image}


def report(result: dict[str, Any]) -> None:
    config, measured = result["config"], result["measured"]
    harness.print_header(
        "bench.push: teacher-push from an image folder, decoding alone and against the service's ingest", result["env"],
        f"images     {config['images']} of {config['size']}x{config['size']} in {CLASSES} class folders (PNG "
        f"{measured['bytes_per_image']['png']:,.0f} B, JPEG q90 {measured['bytes_per_image']['jpeg']:,.0f} B each) -> uint8 {list(SHAPE)}",
        f"teacher    teacher-serve --device cpu, {config['teacher_arch']} (random weights); pushes of --batch-size "
        f"{config['batch_size']} --concurrency {config['concurrency']} into a fresh cache; {config['rounds']} round(s), medians",
    )  # fmt: skip
    ingest = measured["summary"]["ingest_samples_per_s"]
    rows = []
    for name in FORMATS:
        for workers, label in (("1", "1 thread"), ("default", f"{os.cpu_count()} threads (default)")):
            runs = measured["decode"][name][workers]
            rows.append((f"decode only, {name}, {label}", median(runs), median(runs, "client_cores"), None, median(runs) / ingest,
                         max(r["foreign_cpu"] for r in runs)))  # fmt: skip
    for name, label in (("npy", "push .npy (pre-decoded): ingest"), *((n, f"push {n} folder, end to end") for n in FORMATS)):
        runs = measured["push"][name]
        rows.append((label, median(runs), median(runs, "client_cores"), median(runs, "server_cores"), median(runs) / ingest,
                     max(r["foreign_cpu"] for r in runs)))  # fmt: skip
    print()
    harness.table(
        [("what", ""), ("samples/s", ",.0f"), ("client cores", ".2f"), ("server cores", ".2f"), ("÷ ingest", ".2f"), ("other CPU", ".0%")],
        rows,
    )
    s = measured["summary"]
    verdict = "met" if s["goal_met"] else "NOT met"
    print(
        f"\ngoal: end to end ÷ ingest >= {GOAL} ({verdict}): png {s['push_png_vs_ingest']:.2f}, jpeg {s['push_jpeg_vs_ingest']:.2f}; "
        f"default threads ÷ 1 thread: png {s['decode_png_default_vs_1']:.2f}, jpeg {s['decode_jpeg_default_vs_1']:.2f}"
    )
    harness.noise_warning(max(row[-1] for row in rows))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="images, caches and logs")
    p.add_argument("--quick", action="store_true", help="256 images, 1 round")
    p.add_argument("--images", type=int, default=None, help="images per format (default 2000; --quick 256)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every measurement (default 3; --quick 1)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per request and per decoded batch (teacher-push's default)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (teacher-push's default)")
    p.add_argument("--teacher-arch", default="cnn-small", help="the teacher: a model registry name")
    p.add_argument("--seed", type=int, default=0)
    args = harness.parse(p, argv, quick={"images": 256, "rounds": 1}, full={"images": 2000, "rounds": 3})
    with harness.workdir("bench-push-", args.tmpdir, args.keep) as root:
        config = {k: getattr(args, k) for k in ("images", "size", "rounds", "batch_size", "concurrency", "teacher_arch", "seed")}
        result = {"env": harness.environment(), "config": config, "measured": measure(args, root)}
    harness.emit(result, args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
