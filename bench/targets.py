"""Compressed targets benchmark: what do top-k and sampled targets save, and what do they cost?

Every target layout of the cache format (full logits in float32 and float16, ``topk:K`` with
both tail rules, ``sampled:N``), each written by ``CacheWriter`` from the same teacher logits,
on two problems built from scikit-learn's digits: the digits (C=10) and digit pairs (two
digits side by side, 8×16, label 10·a + b, C=100). For each layout: the student's test
accuracy and expected calibration error (15 bins) over the seeds, and the target bytes per
sample (``meta.layout.row_bytes(C)``); for sampled targets also the distinct classes per row
and what a variable-length encoding would take. Every arm trains at one serving temperature
T_s per problem, chosen on the validation split with full logits. Then the trainer's speed:
``train_step`` steps/s on sparse caches ÷ on the full one (``ShardStream``, each side in its
own process, ABBA rounds). ``--service`` measures instead ``teacher-serve --targets topk:5``
and ``--targets sampled:16`` ÷ ``--targets full``, samples/s. The method: docs/benchmarks.md,
"Compressed targets".

    .venv/bin/python -m bench.targets --json       # about 12 minutes on 2 cores
    .venv/bin/python -m bench.targets --quick      # under a minute (20-40 s)
    .venv/bin/python -m bench.targets --service    # a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.demo import digits as demo
from kdcache.demo.problems import PAIR_SEEDS, digit_images, digit_pairs
from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.cache.layout import LOGITS_DTYPES, TopK
from kdcache.offline.dataset import DEFAULT_SHUFFLE_BUFFER
from kdcache.offline.evaluate import expected_calibration_error, predict
from kdcache.offline.malloc import tune_malloc
from kdcache.service.launch import ServeProcess

CPU = torch.device("cpu")
PREPROCESSING = Preprocessing(scale=demo.INPUT_SCALE)
# Every arm's recipe: the student, AdamW with a cosine schedule over the epochs, batch, alpha.
RECIPE = {"student": "mlp", "lr": 3e-3, "batch_size": 64, "alpha": 0.9}
# The teachers: trained on the train split's labels (AdamW, cosine, batch 64), as the demo's is.
TEACHER = {"arch": "mlp-teacher", "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64}  # demo.train_teacher's recipe
DRAW_SEED = 1  # target_seed of the sampled caches
# The speed figures, the trainer's and (--service) teacher-serve's: full first, then each sparse layout against it.
SIDES = ("full", "topk:5", "sampled:16")
SERVICE = {"full": {"serve_rounds": 6, "requests": 30}, "quick": {"serve_rounds": 2, "requests": 6}}
SIDE_OPTIONS = ("student", "batch_size", "seed", "shuffle_buffer", "side_temperature", "speed_epochs")
QUICK = {
    "seeds": 1, "temperatures": [2.0, 4.0], "epochs": 3, "teacher_epochs": 2, "pair_samples": 2000, "pair_eval_samples": 500,
    "rounds": 2, "speed_epochs": 1, "layouts": ["full", "topk:2:bucket", "topk:2:uniform", "sampled:16"],
}  # fmt: skip
FULL = {
    "seeds": 3, "temperatures": [1.0, 2.0, 4.0, 8.0], "epochs": None, "teacher_epochs": None, "pair_samples": 20000,
    "pair_eval_samples": 4000, "rounds": 10, "speed_epochs": 3,
    "layouts": ["full", "full:float16", *(f"topk:{k}:{tail}" for k in (1, 2, 5, 10) for tail in TopK.tails),
                "topk:5:bucket:float16", "topk:10:bucket:float16", "sampled:4", "sampled:16", "sampled:64"],
}  # fmt: skip
# Per problem: student epochs and teacher epochs of a full run.
EPOCHS = {"digits": (30, 15), "digit-pairs": (15, 5)}


# ---------------------------------------------------------------------------------------------
# Arms and problems


@dataclass(frozen=True)
class Arm:
    """One layout as a cache stores it (spec and dtype) and, for top-k, the trainer's tail rule."""

    spec: str
    dtype: str = "float32"
    tail: str = "bucket"

    @classmethod
    def parse(cls, text: str) -> Arm:
        """``full[:DTYPE]``, ``topk:K[:TAIL][:DTYPE]`` or ``sampled:N[:DTYPE]``."""
        name, *rest = text.split(":")
        spec = name if name == "full" else f"{name}:{rest.pop(0)}" if rest else name
        options = {"dtype": "float32", "tail": "bucket"}
        for word in rest:
            key = "dtype" if word in LOGITS_DTYPES else "tail" if word in TopK.tails and name == "topk" else None
            if key is None:
                raise SystemExit(f"--layouts {text}: {word!r} is neither a logits dtype ({', '.join(LOGITS_DTYPES)}) nor a top-k tail rule")
            options[key] = word
        return cls(spec, **options)

    @property
    def name(self) -> str:
        words = [self.spec, *([self.tail] if self.spec.startswith("topk") else [])]
        return " ".join(words + ([self.dtype] if self.spec == "full" or self.dtype != "float32" else []))

    @property
    def cache(self) -> str:
        """The cache directory's name: arms that differ only in the tail rule share one."""
        return f"{self.spec.replace(':', '-')}-{self.dtype}"


@dataclass
class Problem:
    name: str
    classes: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # train (the transfer set), validation, test: (uint8 inputs, labels)
    epochs: int
    teacher_epochs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"][0].shape[1:])


def make_problems(args: argparse.Namespace) -> list[Problem]:
    images = digit_images()
    problems = []
    for name in args.problems:
        epochs, teacher_epochs = args.epochs or EPOCHS[name][0], args.teacher_epochs or EPOCHS[name][1]
        if name == "digits":
            problems.append(Problem(name, 10, images, epochs, teacher_epochs))
        else:
            sizes = {"train": args.pair_samples, "validation": args.pair_eval_samples, "test": args.pair_eval_samples}
            splits = {split: digit_pairs(images[split], sizes[split], PAIR_SEEDS[split]) for split in sizes}
            problems.append(Problem(name, 100, splits, epochs, teacher_epochs))
    return problems


# ---------------------------------------------------------------------------------------------
# Teacher and caches


def train_teacher(problem: Problem, seed: int = 0) -> torch.nn.Module:
    """Supervised training on the train split's labels: ``demo.digits.train_teacher``'s recipe."""
    x, y = problem.splits["train"]
    return demo.train_teacher(x, y, arch=TEACHER["arch"], epochs=problem.teacher_epochs, seed=seed, num_classes=problem.classes)


def scores(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(-1).numpy() == labels).mean()), "ece": expected_calibration_error(logits, labels)}


def write_source(directory: Path, problem: Problem, teacher: torch.nn.Module) -> CacheReader:
    """The teacher's float32 logits on the transfer set, in a full float32 cache: the source of every layout."""
    x, y = problem.splits["train"]
    meta = CacheMeta(
        models.weights_fingerprint(teacher.state_dict()), f"{problem.name}-teacher", problem.classes, problem.input_shape, "uint8",
        PREPROCESSING,
    )  # fmt: skip
    with torch.no_grad():
        logits = teacher(PREPROCESSING.apply(torch.from_numpy(x))).numpy()
    with CacheWriter(directory, meta) as writer:
        writer.append(np.array([str(i) for i in range(len(x))], dtype=object), x, logits, y)
    return CacheReader(directory)


def layout_meta(source: CacheMeta, arm: Arm, temperature: float) -> CacheMeta:
    """The source cache's metadata with the arm's layout at the serving temperature; ValueError
    for a layout the problem cannot hold (top-k needs K < C)."""
    return dataclasses.replace(
        source, logits_layout=arm.spec, logits_dtype=arm.dtype, serving_temperature=temperature, target_seed=DRAW_SEED
    )


def write_layout(directory: Path, source: CacheReader, meta: CacheMeta) -> CacheReader:
    """The source cache's rows re-encoded by the real writer with ``meta``'s layout."""
    rows = source.read(("ids", "inputs", "logits", "labels"))
    with CacheWriter(directory, meta) as writer:
        writer.append(rows["ids"], rows["inputs"], rows["logits"], rows["labels"])
    return CacheReader(directory)


def sampled_rows(reader: CacheReader) -> dict[str, float]:
    """Distinct classes per row of a sampled cache, and the bytes per row of the fixed width it
    stores against a variable-length encoding of the same pairs (CSR: the rows' (index, count)
    pairs back to back, one uint32 offset per row)."""
    counts = reader.read(("sample_counts",))["sample_counts"]
    fields = reader.meta.layout.fields(reader.meta.num_classes)
    pair_bytes = sum(dtype.itemsize for _, dtype in fields.values())
    distinct = (counts > 0).sum(axis=1)
    return {
        "width": int(counts.shape[1]), "distinct_mean": float(distinct.mean()), "distinct_max": int(distinct.max()),
        "fixed_bytes": reader.meta.layout.row_bytes(reader.meta.num_classes),
        "variable_bytes": float(distinct.mean() * pair_bytes + 4), "pair_bytes": pair_bytes,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. Accuracy and calibration


def distil(reader: CacheReader, problem: Problem, temperature: float, seed: int, tail: str, split: str) -> dict[str, Any]:
    """``offline-distill``'s step (``harness.Student``: ``train_step``, the trainer's objective
    for this cache at ``temperature``) on the cache's rows in memory, a cosine schedule over the
    epochs; accuracy and ECE on ``split``."""
    started = time.perf_counter()
    meta = reader.meta
    student = harness.Student(
        RECIPE["student"], meta, seed=seed, device=CPU, topk_tail=tail, temperature=temperature, alpha=RECIPE["alpha"], lr=RECIPE["lr"]
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(student.optimizer, T_max=problem.epochs)
    fields = ("inputs", *meta.layout.fields(meta.num_classes), "labels")
    batches = harness.memory_batches(reader, RECIPE["batch_size"], seed, fields)
    for epoch in range(problem.epochs):
        for batch in batches(epoch):
            student.step(batch)
        scheduler.step()
    x, y = problem.splits[split]
    return {**scores(predict(student.model, torch.from_numpy(x), meta, CPU), y), "seconds": time.perf_counter() - started}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accuracy, ece = demo.mean_std([r["accuracy"] for r in runs]), demo.mean_std([r["ece"] for r in runs])
    return {
        "accuracies": [r["accuracy"] for r in runs], "eces": [r["ece"] for r in runs], "accuracy": accuracy[0], "accuracy_std": accuracy[1],
        "ece": ece[0], "ece_std": ece[1], "seconds": statistics.fmean(r["seconds"] for r in runs),
    }  # fmt: skip


def choose_temperature(source: CacheReader, problem: Problem, args: argparse.Namespace) -> dict[str, Any]:
    """T_s: the candidate with the best mean validation accuracy of the full float32 arm (the
    lower T on a tie: sparse targets keep more of a sharper distribution)."""
    validation = {}
    for temperature in args.temperatures:
        runs = []
        for seed in range(args.seeds):
            harness.say(f"{problem.name}: T_s candidate {temperature:g}, seed {seed}")
            runs.append(distil(source, problem, temperature, seed, "bucket", "validation"))
        validation[f"{temperature:g}"] = summarize(runs)  # keyed as JSON keeps it
    chosen = max(args.temperatures, key=lambda t: (validation[f"{t:g}"]["accuracy"], -t))
    return {"candidates": args.temperatures, "validation": validation, "chosen": chosen}


def accuracy(problem: Problem, arms: list[Arm], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    harness.say(f"{problem.name}: training the teacher ({TEACHER['arch']}, {problem.teacher_epochs} epochs) ...")
    started = time.perf_counter()
    teacher = train_teacher(problem)
    teacher_s = time.perf_counter() - started
    x_test, y_test = problem.splits["test"]
    with torch.no_grad():
        teacher_scores = scores(teacher(PREPROCESSING.apply(torch.from_numpy(x_test))), y_test)
    source = write_source(root / "source", problem, teacher)
    if args.skip_accuracy:  # the trainer's speed alone: T_s is the first candidate, no student is trained here
        temperature, arms = {"candidates": args.temperatures[:1], "validation": {}, "chosen": args.temperatures[0]}, []
    else:
        temperature = choose_temperature(source, problem, args)
    t_s = temperature["chosen"]
    full_bytes = source.meta.layout.row_bytes(problem.classes)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    readers: dict[str, CacheReader] = {}
    for arm in arms:
        try:
            meta = layout_meta(source.meta, arm, t_s)
        except ValueError as exc:
            skipped[arm.name] = str(exc)
            harness.say(f"{problem.name}: {arm.name} skipped: {exc}")
            continue
        if arm.cache not in readers:
            readers[arm.cache] = write_layout(root / arm.cache, source, meta)
        reader = readers[arm.cache]
        runs = []
        for seed in range(args.seeds):
            harness.say(f"{problem.name}: {arm.name}, seed {seed}")
            runs.append(distil(reader, problem, t_s, seed, arm.tail, "test"))
        row_bytes = meta.layout.row_bytes(problem.classes)
        results[arm.name] = {
            "spec": arm.spec, "dtype": arm.dtype, "tail": arm.tail if arm.spec.startswith("topk") else None,
            "row_bytes": row_bytes, "bytes_vs_full": row_bytes / full_bytes, **summarize(runs),
            "sampled": sampled_rows(reader) if arm.spec.startswith("sampled") else None,
            "tail_mass": float(np.exp(reader.read(("tail_logmass",))["tail_logmass"]).mean()) if arm.spec.startswith("topk") else None,
        }  # fmt: skip
    splits = {split: len(y) for split, (_, y) in problem.splits.items()}
    soft_targets = torch.softmax(torch.from_numpy(source.read(("logits",))["logits"]) / t_s, dim=-1)
    return {
        "classes": problem.classes, "input_shape": list(problem.input_shape), "splits": splits, "epochs": problem.epochs,
        "teacher": {"arch": TEACHER["arch"], "epochs": problem.teacher_epochs, "seconds": teacher_s, **teacher_scores},
        "temperature": temperature, "serving_temperature": t_s, "full_row_bytes": full_bytes, "arms": results, "skipped": skipped,
        "teacher_top1_mass": float(soft_targets.max(dim=-1).values.mean()),  # on the transfer set, at T_s
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. The trainer's speed: ShardStream + train_step on each cache, each side in its own process


def side_main(args: argparse.Namespace) -> int:
    tune_malloc()  # as offline-distill does
    reader = CacheReader(args.side_cache)
    student = harness.Student(
        args.student, reader.meta, seed=args.seed, device=CPU, temperature=args.side_temperature, alpha=RECIPE["alpha"], lr=RECIPE["lr"]
    )
    batches = harness.shard_batches(reader, args.batch_size, args.seed, args.shuffle_buffer, 0, CPU)
    return harness.serve_epochs(batches, student.step, harness.synchronizer(CPU), epochs=args.speed_epochs)


def training_speed(source: CacheReader, t_s: float, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """steps/s of each sparse side ÷ the full side's in the same round; the median over rounds."""
    caches = {}
    for kind in SIDES:
        meta = layout_meta(source.meta, Arm(kind), t_s)
        caches[kind] = (
            source.directory if kind == "full" else write_layout(root / f"speed-{kind.replace(':', '-')}", source, meta).directory
        )
    side_args = argparse.Namespace(**{**vars(args), "student": args.speed_student, "batch_size": RECIPE["batch_size"], "seed": 0,
                                      "side_temperature": t_s})  # fmt: skip
    commands = {kind: harness.side_command("targets", kind, caches[kind], side_args, SIDE_OPTIONS) for kind in SIDES}
    env = {"OMP_NUM_THREADS": str(args.speed_threads)} if args.speed_threads else None
    with harness.side_processes(commands, env) as sides:
        epoch = 1

        def run(kind: str) -> dict[str, Any]:
            nonlocal epoch
            figures = sides[kind].epoch(epoch)
            epoch += figures["epochs"]
            return {**figures, "steps_per_s": figures["steps"] / figures["seconds"]}

        for kind in SIDES:  # warm-up: allocator, first touch of pages
            run(kind)
        rounds = harness.alternate(SIDES, args.rounds, run)
    out: dict[str, Any] = {
        "samples": source.num_samples,
        "batch_size": RECIPE["batch_size"],
        "student": args.speed_student,
        "threads": args.speed_threads or "torch's default",
        "rounds": rounds,
    }
    out["steps_per_s"] = {kind: statistics.median(r["steps_per_s"] for r in runs) for kind, runs in rounds.items()}
    for kind in SIDES[1:]:
        ratios = [s["steps_per_s"] / f["steps_per_s"] for s, f in zip(rounds[kind], rounds["full"], strict=True)]
        out[f"{kind}_vs_full"] = statistics.median(ratios)
        out[f"{kind}_vs_full_per_round"] = ratios
    out["max_foreign_cpu"] = max(r["foreign_cpu"] for runs in rounds.values() for r in runs)
    return out


# ---------------------------------------------------------------------------------------------
# 3. --service: teacher-serve --targets LAYOUT, each sparse layout ÷ full


def serve_round(teacher: Path, root: Path, args: argparse.Namespace, spec: str, tag: str) -> dict[str, Any]:
    """A fresh ``teacher-serve --targets spec`` (its start untimed) and bench.service's
    pre-encoded requests, each once, all misses: samples/s from the last warm-up ack to the
    last ack; the cache must then hold exactly the acknowledged ids, in ``spec``'s layout."""
    from bench import service

    pool = service.input_pool(tuple(args.input_shape), args.request_size, args.seed)
    plan = service.plan_requests(tag, pool, args.request_size, args.warmup_requests + args.requests, args.classes, args.seed)
    cache = root / f"cache-{tag}"
    serve_args = [
        "--teacher", str(teacher), "--cache", str(cache), "--targets", spec, "--temperature", str(args.serve_temperature),
        "--device", "cpu", "--max-batch", str(args.request_size), "--ack", "durable", "--log-level", "warning",
    ]  # fmt: skip
    server = ServeProcess(serve_args, root / f"serve-{tag}.log", env=harness.child_env())
    try:
        service.ready(server, args.ready_timeout)
        figures = service.drive(server, service.INFER, plan, args.clients, args.warmup_requests, scrape=False)
    finally:
        code = server.stop(timeout=service.STOP_TIMEOUT)
    if code != 0:
        raise SystemExit(f"teacher-serve --targets {spec} exited with {code} after SIGTERM:\n{server.output(3000)}")
    stored = service.check_cache(cache, plan, figures["acknowledged_samples"])
    layout = CacheReader(cache).meta.logits_layout
    if not stored["cache_matches_acks"] or layout != spec:
        raise SystemExit(
            f"{cache}: holds {stored['cache_samples']} rows of {layout} targets; expected the {figures['acknowledged_samples']} acknowledged, as {spec}"
        )
    return {**figures, **stored, "command": shlex.join(server.command)}


def serving(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ABBA rounds over ``SIDES``; each sparse side's samples/s ÷ the full side's of the same round."""
    teacher = harness.write_teacher(root / "teacher.pt", args.teacher_arch, args.input_shape, args.classes, seed=args.seed)
    harness.say(f"teacher {args.teacher_arch} ({teacher.params:,} parameters, random weights), {args.classes} classes")
    done = dict.fromkeys(SIDES, 0)

    def run(spec: str) -> dict[str, Any]:
        done[spec] += 1
        harness.say(f"round {done[spec]}/{args.serve_rounds}: teacher-serve --targets {spec} ...")
        figures = serve_round(teacher.path, root, args, spec, f"{spec.replace(':', '-')}-r{done[spec]}")
        harness.say(f"  {figures['samples_per_s']:,.1f} samples/s ({figures['timed_requests']} timed requests, {figures['seconds']:.1f} s)")
        return figures

    rounds = harness.alternate(SIDES, args.serve_rounds, run)
    out: dict[str, Any] = {
        "teacher": args.teacher_arch, "teacher_params": teacher.params, "input_shape": args.input_shape, "classes": args.classes,
        "request_size": args.request_size, "clients": args.clients, "requests": args.requests, "serving_temperature": args.serve_temperature,
        "samples_per_s": {spec: statistics.median(r["samples_per_s"] for r in runs) for spec, runs in rounds.items()},
        "bytes_per_sample": {spec: statistics.median(r["bytes_per_sample"] for r in runs) for spec, runs in rounds.items()},
    }  # fmt: skip
    for spec in SIDES[1:]:
        ratios = [s["samples_per_s"] / f["samples_per_s"] for s, f in zip(rounds[spec], rounds["full"], strict=True)]
        out[f"{spec}_vs_full"], out[f"{spec}_vs_full_per_round"] = statistics.median(ratios), ratios
    out["max_foreign_cpu"] = max(r["foreign_cpu"] for runs in rounds.values() for r in runs)
    out["rounds"] = rounds
    return out


def report_service(result: dict[str, Any]) -> None:
    s = result["service"]
    harness.print_header(
        "Compressed targets: teacher-serve --targets topk:5 / sampled:16 against --targets full", result["env"],
        f"teacher    {s['teacher']} ({s['teacher_params']:,} parameters, random weights), uint8 {s['input_shape']}, {s['classes']} classes, "
        f"serving T={s['serving_temperature']:g}",
        f"load       {s['clients']} clients x 1 request in flight, {s['request_size']} samples per request (= --max-batch), "
        f"{s['requests']} timed requests per round, --ack durable, every request a miss",
    )  # fmt: skip
    print(f"\nsamples/s, median of {len(s['rounds']['full'])} ABBA rounds (a fresh server each); ÷ full: median of the paired ratios")
    harness.table(
        [("--targets", ""), ("samples/s", ",.1f"), ("cache B/sample", ",.1f"), ("÷ full", ".3f"), ("per round", ""), ("target", ""), ("met", "")],
        [[spec, s["samples_per_s"][spec], s["bytes_per_sample"][spec], s.get(f"{spec}_vs_full"),
          " ".join(f"{v:.2f}" for v in s.get(f"{spec}_vs_full_per_round", [])), "" if spec == "full" else harness.target("targets_serving_vs_full"),
          "" if spec == "full" else harness.YES[harness.met("targets_serving_vs_full", s[f"{spec}_vs_full"])]] for spec in SIDES],
    )  # fmt: skip
    harness.noise_warning(s["max_foreign_cpu"])


# ---------------------------------------------------------------------------------------------
# Goals


def within(arm: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    accuracy_gap, ece_gap = arm["accuracy"] - full["accuracy"], arm["ece"] - full["ece"]
    accuracy_met, ece_met = harness.met("targets_accuracy_minus_full", accuracy_gap), harness.met("targets_ece_minus_full", ece_gap)
    return {"accuracy_minus_full": accuracy_gap, "ece_minus_full": ece_gap, "accuracy_met": accuracy_met, "ece_met": ece_met}


def goals(problems: dict[str, Any], speed: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pairs, digits = problems.get("digit-pairs"), problems.get("digits")
    if pairs and "full float32" in pairs["arms"]:
        full = pairs["arms"]["full float32"]
        small = {name: {"bytes_vs_full": a["bytes_vs_full"], **within(a, full)} for name, a in pairs["arms"].items()
                 if harness.met("targets_bytes_vs_full", a["bytes_vs_full"])}  # fmt: skip
        passing = sorted((name for name, g in small.items() if g["accuracy_met"] and g["ece_met"]), key=lambda n: small[n]["bytes_vs_full"])
        out["pairs_small_layout"] = {"candidates": small, "passing": passing, "met": bool(passing)}
        topk = {name: a for name, a in pairs["arms"].items() if a["spec"].startswith("topk")}
        calibration = {}
        for name, arm in pairs["arms"].items():
            if arm["spec"].startswith("sampled") and topk:
                nearest = min(topk, key=lambda n: (abs(math.log(topk[n]["row_bytes"] / arm["row_bytes"])), topk[n]["ece"]))
                calibration[name] = {
                    "topk": nearest, "bytes": arm["row_bytes"], "topk_bytes": topk[nearest]["row_bytes"], "ece": arm["ece"],
                    "topk_ece": topk[nearest]["ece"], "sampled_better": arm["ece"] < topk[nearest]["ece"],
                    "ece_std": arm["ece_std"], "topk_ece_std": topk[nearest]["ece_std"],
                }  # fmt: skip
        out["pairs_sampled_vs_topk_calibration"] = calibration
    if digits and "full float32" in digits["arms"]:
        full = digits["arms"]["full float32"]
        close = sorted((a["row_bytes"], name) for name, a in digits["arms"].items() if within(a, full)["accuracy_met"])
        out["digits_smallest_within"] = {"arm": close[0][1] if close else None, "row_bytes": close[0][0] if close else None,
                                         **(within(digits["arms"][close[0][1]], full) if close else {})}  # fmt: skip
    if speed:
        out["training_speed"] = {kind: {"ratio": speed[f"{kind}_vs_full"], "met": harness.met("targets_training_vs_full", speed[f"{kind}_vs_full"])}
                                 for kind in SIDES[1:]}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Report


def report(result: dict[str, Any]) -> None:
    harness.print_header(
        "Compressed targets: every layout from the same teacher logits", result["env"],
        f"recipe     {result['recipe']}, {result['seeds']} seed(s), cosine schedule; teacher {TEACHER}",
    )  # fmt: skip
    for name, problem in result["problems"].items():
        t = problem["temperature"]
        print(f"\n{name}: C={problem['classes']}, inputs uint8 {problem['input_shape']}, splits {problem['splits']}, "
              f"{problem['epochs']} epochs; teacher test accuracy {problem['teacher']['accuracy']:.4f}, ECE {problem['teacher']['ece']:.4f}; "
              f"its mean top-1 probability on the transfer set at T_s {problem['teacher_top1_mass']:.4f}")  # fmt: skip
        if not problem["arms"]:
            print(f"--skip-accuracy: T_s={t['chosen']:g}, no layout trained")
            continue
        print("T_s on the validation split (full float32): "
              + ", ".join(f"T={c:g} {t['validation'][f'{c:g}']['accuracy']:.4f}" for c in t["candidates"]) + f"; chosen T_s={t['chosen']:g}")  # fmt: skip
        full = problem["arms"].get("full float32")
        harness.table(
            [("layout", ""), ("B/sample", ",d"), ("÷ full", ".3f"), ("accuracy", ""), ("Δ points", "+.2f"), ("ECE", ""),
             ("Δ ECE", "+.4f"), ("tail mass", ".4f"), ("distinct/row", ".2f"), ("variable B", ".1f"), ("train s", ".1f")],
            [[arm_name, a["row_bytes"], a["bytes_vs_full"], f"{a['accuracy']:.4f} ± {a['accuracy_std']:.4f}",
              (a["accuracy"] - full["accuracy"]) * 100 if full else None, f"{a['ece']:.4f} ± {a['ece_std']:.4f}",
              a["ece"] - full["ece"] if full else None, a["tail_mass"], a["sampled"]["distinct_mean"] if a["sampled"] else None,
              a["sampled"]["variable_bytes"] if a["sampled"] else None, a["seconds"]] for arm_name, a in problem["arms"].items()],
        )  # fmt: skip
        for arm_name, why in problem["skipped"].items():
            print(f"skipped {arm_name}: {why}")
    speed = result.get("speed")
    if speed:
        print(f"\nTrainer speed, ShardStream + train_step ({speed['student']}, batch {speed['batch_size']}, {speed['samples']:,} samples, "
              f"0 workers, {speed['threads']} threads), median of {len(speed['rounds']['full'])} ABBA rounds of paired ratios")  # fmt: skip
        harness.table(
            [("cache", ""), ("steps/s", ".1f"), ("÷ full", ".3f"), ("per round", ""), ("target", ""), ("met", "")],
            [[kind, speed["steps_per_s"][kind], speed.get(f"{kind}_vs_full"),
              " ".join(f"{v:.2f}" for v in speed.get(f"{kind}_vs_full_per_round", [])), harness.target("targets_training_vs_full") if kind != "full" else "",
              harness.YES[harness.met("targets_training_vs_full", speed.get(f"{kind}_vs_full"))] if kind != "full" else ""] for kind in SIDES],
        )  # fmt: skip
        harness.noise_warning(speed["max_foreign_cpu"])
    print_goals(result["goals"])


def print_goals(goals: dict[str, Any]) -> None:
    print("\nGoals")
    small = goals.get("pairs_small_layout")
    if small:
        print(f"  digit pairs, a layout at <= 10% of full float32's bytes within 0.3 points and 0.01 ECE of full: {harness.YES[small['met']]}"
              + (f" ({', '.join(small['passing'])})" if small["passing"] else ""))  # fmt: skip
        for name, g in small["candidates"].items():
            print(f"    {name}: {g['bytes_vs_full']:.3f} of the bytes, {g['accuracy_minus_full'] * 100:+.2f} points ({harness.YES[g['accuracy_met']]}), "
                  f"ECE {g['ece_minus_full']:+.4f} ({harness.YES[g['ece_met']]})")  # fmt: skip
    for name, c in goals.get("pairs_sampled_vs_topk_calibration", {}).items():
        print(f"  digit pairs, {name} ({c['bytes']} B) ECE {c['ece']:.4f} ± {c['ece_std']:.4f} against {c['topk']} ({c['topk_bytes']} B) "
              f"{c['topk_ece']:.4f} ± {c['topk_ece_std']:.4f}: sampled better calibrated: {harness.YES[c['sampled_better']]}")  # fmt: skip
    digits = goals.get("digits_smallest_within")
    if digits:
        print(f"  digits, the smallest layout within 0.3 points of full: {digits['arm']} ({digits['row_bytes']} B)"
              + (f", {digits['accuracy_minus_full'] * 100:+.2f} points" if digits["arm"] else ""))  # fmt: skip
    for kind, g in goals.get("training_speed", {}).items():
        print(
            f"  trainer steps/s, {kind} ÷ full: {g['ratio']:.3f} (target {harness.target('targets_training_vs_full')}): {harness.YES[g['met']]}"
        )


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, workdir_of="the caches")
    p.add_argument("--quick", action="store_true", help=f"1 seed, few epochs, a subset of layouts, small pair splits ({QUICK})")
    p.add_argument("--problems", nargs="+", choices=("digits", "digit-pairs"), default=["digits", "digit-pairs"])
    p.add_argument("--layouts", nargs="+", default=None, metavar="LAYOUT",
                   help="full[:DTYPE], topk:K[:TAIL][:DTYPE] or sampled:N[:DTYPE] (default: every layout of the issue)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=None, help="student seeds per arm (0, 1, ...)")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, help="T_s candidates, chosen on the validation split")
    p.add_argument("--epochs", type=int, default=None, help=f"student epochs (default per problem: {EPOCHS})")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--pair-samples", type=int, default=None, help="digit pairs in the train split (the transfer set)")
    p.add_argument("--pair-eval-samples", type=int, default=None, help="digit pairs in each of the validation and test splits")
    p.add_argument("--rounds", type=int, default=None, help="ABBA rounds of the trainer's speed")
    p.add_argument("--speed-epochs", type=int, default=None, help="epochs per timed side in a round")
    p.add_argument("--skip-speed", action="store_true", help="no trainer speed measurement")
    p.add_argument("--skip-accuracy", action="store_true",
                   help="the trainer's speed alone: the teacher and its cache, T_s = the first of --temperatures, no arm trained")  # fmt: skip
    p.add_argument("--speed-student", default=RECIPE["student"], help="the student of both speed sides (default: the recipe's)")
    p.add_argument("--speed-threads", type=int, default=None, help="OMP_NUM_THREADS of the speed sides (default: torch's default)")
    p.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the accuracy runs (figures, not timings: one thread is as fast for these students and "
                   "keeps a busy neighbour from stalling OpenMP); the speed sides keep torch's default, as offline-distill")  # fmt: skip
    service = p.add_argument_group("--service", "teacher-serve --targets LAYOUT against --targets full (as bench.service drives it)")
    service.add_argument("--service", action="store_true", help="measure the service's throughput per layout instead")
    service.add_argument("--teacher-arch", default="resnet", help="an offline.models registry name (random weights)")
    service.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32], metavar="D", help="uint8 sample shape")
    service.add_argument("--classes", type=int, default=100)
    service.add_argument("--request-size", type=int, default=256, help="samples per request = the server's --max-batch")
    service.add_argument("--clients", type=int, default=4, help="client threads, one request in flight each")
    service.add_argument("--serve-rounds", type=int, default=None, help=f"ABBA rounds ({SERVICE})")
    service.add_argument("--requests", type=int, default=None, help=f"timed requests per round ({SERVICE})")
    service.add_argument("--warmup-requests", type=int, default=3)
    service.add_argument("--serve-temperature", type=float, default=4.0, help="the servers' --temperature (teacher-serve's default)")
    service.add_argument("--ready-timeout", type=float, default=300.0)
    harness.add_side_options(p, SIDES)
    p.add_argument("--student", default=RECIPE["student"], help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--side-temperature", type=float, help=argparse.SUPPRESS)
    args = harness.parse(p, argv, QUICK, FULL)
    for key, value in SERVICE["quick" if args.quick else "full"].items():
        setattr(args, key, getattr(args, key) or value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        return side_main(args)
    if args.service:
        tune_malloc()  # the clients' process, as bench.service
        with harness.workdir("bench-targets-service-", args.tmpdir, args.keep) as root:
            result = {"env": harness.environment(), "service": serving(root, args)}
            result["goals"] = {
                "serving": {spec: {"ratio": result["service"][f"{spec}_vs_full"],
                                   "met": harness.met("targets_serving_vs_full", result["service"][f"{spec}_vs_full"])}
                            for spec in SIDES[1:]}
            }  # fmt: skip
        harness.emit(result, args.json, report_service)
        return 0
    arms = [Arm.parse(text) for text in args.layouts]
    torch.set_num_threads(args.threads)
    with harness.workdir("bench-targets-", args.tmpdir, args.keep) as root:
        problems, speed = {}, None
        for problem in make_problems(args):
            (root / problem.name).mkdir()
            problems[problem.name] = accuracy(problem, arms, root / problem.name, args)
        if not args.skip_speed:
            name = "digit-pairs" if "digit-pairs" in problems else args.problems[0]
            harness.say(f"trainer speed on the {name} caches: {', '.join(SIDES)}, {args.rounds} ABBA rounds ...")
            speed = {
                "problem": name,
                **training_speed(CacheReader(root / name / "source"), problems[name]["serving_temperature"], root / name, args),
            }
        result = {
            "env": harness.environment(), "recipe": RECIPE, "teacher": TEACHER, "seeds": args.seeds, "layouts": args.layouts,
            "problems": problems, "speed": speed, "goals": goals(problems, speed),
        }  # fmt: skip
    harness.emit(result, args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
