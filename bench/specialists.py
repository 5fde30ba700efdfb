"""Hinton's specialists on the bundled digits (issue 21): is a generalist with specialists a
better teacher than the generalist alone, does a student distilled from it learn more, and what
does serving it cost?

1. The problem's teacher (``demo.sweep.prepare``) fills ``cache/`` on the transfer set; the
   validation and test splits are written beside it.
2. Per clustering method: ``cache-inspect cache/ --clusters K --cluster-method M --json``.
3. Per seed: the generalist, ``offline-distill --cache cache/ --student S`` at the defaults; per
   method, head and cluster k, ``offline-distill --cache cache/ --specialist @clusters-M.json:k
   --specialist-head HEAD --init generalist/student.pt``.
4. The teachers, loaded as ``teacher-serve`` loads them (``service.teacher.load_teacher``): the
   generalist alone and with its specialists, for each method, head and
   ``--specialist-top-n`` N, scored on validation and test. The method, head and N are chosen on
   validation (the mean over seeds).
5. Students: each teacher (the generalist alone, and with the chosen specialists) serves the
   transfer set at T_s = 4, the student's default T, into a cache; the same student and recipe
   are distilled from each, and scored on test.
6. Cost: ``Teacher.forward`` time per sample over the test set at batch 256, the generalist
   alone against the combination, side by side, against (1 + the mean active specialists); and
   the same for random-weight ``--cost-arch`` members, where the forward pass dominates.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.demo.problems import make_problem
from kdcache.demo.sweep import prepare
from kdcache.offline.cache import CacheWriter
from kdcache.service.teacher import Teacher, load_teacher

QUICK = {"seeds": 1, "clusters": 2, "top_n": [1, 2], "heads": ["dustbin"], "methods": ["spectral"], "cost_repeats": 3}
FULL = {"seeds": 3, "clusters": 2, "top_n": [1, 2], "heads": ["dustbin", "full"], "methods": ["spectral", "covariance"], "cost_repeats": 10}
STUDENT_T = 4.0  # the distilled students' temperature (offline-distill's default on full logits), and T_s for their caches
COST_BATCH = 256


def train_runs(root: Path, cache: Path, clusterings: dict[str, Any], seed: int, args: Any) -> dict[str, Any]:
    """The generalist and, per clustering method and head, its specialists for one seed."""
    common = ["--student", args.student, "--seed", str(seed), "--no-progress", "--no-export"]
    generalist = root / f"generalist-{seed}"
    harness.tool("offline-distill", "--cache", str(cache), "--out", str(generalist), *common, log=root / f"generalist-{seed}.log")
    runs: dict[str, Any] = {"generalist": generalist / "student.pt", "specialists": {}}
    for method, clustering in clusterings.items():
        for head in args.heads:
            paths = []
            for k in range(len(clustering["clusters"])):
                out = root / f"specialist-{method}-{head}-{k}-{seed}"
                harness.tool(
                    "offline-distill", "--cache", str(cache), "--specialist", f"@{root / f'clusters-{method}.json'}:{k}",
                    "--specialist-head", head, "--init", str(generalist / "student.pt"), "--out", str(out), *common,
                    log=out.with_suffix(".log"),
                )  # fmt: skip
                paths.append(out / "student.pt")
            runs["specialists"][f"{method}, {head}"] = paths
    return runs


def load(runs: dict[str, Any], variant: str | None, top_n: int, temperature: float = 1.0) -> Teacher:
    """The generalist alone (``variant`` None), or with the specialists of one "method, head"."""
    specs = [str(runs["generalist"])] + ([str(p) for p in runs["specialists"][variant]] if variant else [])
    return load_teacher(
        specs, ensemble="specialists" if variant else "geometric", temperature=temperature, device="cpu", specialist_top_n=top_n
    )


def accuracy(teacher: Teacher, split: Path) -> tuple[float, float]:
    """Test accuracy, and the mean specialists run per sample."""
    data = np.load(split)
    logits = np.concatenate([teacher.forward(part) for part in np.array_split(data["inputs"], max(1, len(data["inputs"]) // COST_BATCH))])
    runs = getattr(teacher.combiner, "specialist_runs", 0) / max(1, getattr(teacher.combiner, "samples", 1))
    return float((logits.argmax(1) == data["labels"]).mean()), runs


def distil_from(
    teacher: Teacher, prepared: dict[str, Any], root: Path, tag: str, seed: int, args: Any, x: np.ndarray, y: np.ndarray
) -> float:
    """The teacher's outputs on the transfer set in a cache at T_s; a student distilled from it, scored on test."""
    cache = root / f"cache-{tag}-{seed}"
    meta = teacher.cache_meta()
    logits = np.concatenate([teacher.forward(part) for part in np.array_split(x, max(1, len(x) // COST_BATCH))])
    with CacheWriter(cache, meta) as writer:
        writer.append(np.arange(len(x)), x, logits, y)
    out = root / f"student-{tag}-{seed}"
    harness.tool(
        "offline-distill", "--cache", str(cache), "--student", args.student, "--seed", str(seed), "--eval", prepared["test"],
        "--out", str(out), "--no-progress", "--no-export", log=out.with_suffix(".log"),
    )  # fmt: skip
    return float(json.loads((out / "metrics.json").read_text())["eval_accuracy"])


def forward_seconds(teacher: Teacher, x: np.ndarray, batch: int = COST_BATCH) -> float:
    started = time.perf_counter()
    for part in np.array_split(x, max(1, len(x) // batch)):
        teacher.forward(part)
    return time.perf_counter() - started


def cost(alone: Teacher, combined: Teacher, x: np.ndarray, repeats: int, batch: int = COST_BATCH) -> dict[str, Any]:
    """Per-sample forward time at ``batch``, the two teachers alternated ``repeats`` times; the medians."""
    for teacher in (alone, combined):
        forward_seconds(teacher, x, batch)  # warm-up
    combined.combiner.samples = combined.combiner.specialist_runs = 0
    times: dict[str, list[float]] = {"alone": [], "combined": []}
    for _ in range(repeats):
        times["alone"].append(forward_seconds(alone, x, batch) / len(x))
        times["combined"].append(forward_seconds(combined, x, batch) / len(x))
    active = combined.combiner.specialist_runs / max(1, combined.combiner.samples)
    alone_s, combined_s = statistics.median(times["alone"]), statistics.median(times["combined"])
    return {
        "alone_us_per_sample": alone_s * 1e6, "combined_us_per_sample": combined_s * 1e6, "ratio": combined_s / alone_s,
        "mean_active": active, "bound": 1 + active, "met": combined_s / alone_s <= 1 + active, "batch": batch,
    }  # fmt: skip


def random_members(
    root: Path, arch: str, shape: tuple[int, ...], clusters: list[list[int]], classes: int, device: str = "cpu"
) -> tuple[Teacher, Teacher]:
    """A generalist alone and with dustbin-head specialists, all ``arch`` with random weights
    (the cost does not depend on them), saved as student.pt records for uint8 inputs of ``shape``."""
    from kdcache.offline import models
    from kdcache.offline.cache import CacheMeta, Preprocessing

    torch.manual_seed(0)
    specs = []
    for i, cluster in enumerate([None, *clusters]):
        width = classes if cluster is None else len(cluster) + 1
        meta = CacheMeta("0" * 64, "random", width, shape, "uint8", preprocessing=Preprocessing(scale=1 / 255))
        specialist = None if cluster is None else {"classes": list(cluster), "head": "dustbin", "classes_total": classes}
        record = models.student_record(arch, models.build(arch, shape, width), meta, temperature=1.0, alpha=1.0, specialist=specialist)
        specs.append(str(root / f"random-{arch.replace(':', '-')}-{'x'.join(map(str, shape))}-{i}.pt"))
        torch.save(record, specs[-1])
    alone = load_teacher(specs[:1], temperature=1.0, device=device)
    return alone, load_teacher(specs, ensemble="specialists", temperature=1.0, device=device)


COST_MEMBERS = ["cnn-large@1x28x28", "resnet@3x32x32"]  # --cost-only: arch@sample shape


def member_shapes(texts: list[str]) -> dict[str, tuple[int, ...]]:
    return {text: tuple(int(d) for d in text.partition("@")[2].split("x")) for text in texts}


def cost_only(args: Any) -> dict[str, Any]:
    """The cost rows alone, for random-weight members on ``args.device``: C = 10, the clusters
    {0..4} and {5..8} (class 9 in none), the generalist's top 1."""
    clusters, costs = [[0, 1, 2, 3, 4], [5, 6, 7, 8]], {}
    with harness.workdir("kd-specialists-cost-", args.tmpdir, args.keep) as root:
        for name, shape in member_shapes(args.cost_members).items():
            x = np.random.default_rng(0).integers(0, 256, (args.cost_batch * 8, *shape), dtype=np.uint8)
            members = random_members(root, name.partition("@")[0], shape, clusters, 10, args.device)
            costs[name] = cost(*members, x, args.cost_repeats, args.cost_batch)
            harness.say(f"{name}: {costs[name]}")
    return {"environment": harness.environment(args.device), "device": args.device, "clusters": clusters, "cost": costs}


def run(args: Any) -> dict[str, Any]:
    if args.cost_only:
        return cost_only(args)
    torch.set_num_threads(2)
    problem = make_problem(args.problem)
    with harness.workdir("kd-specialists-", args.tmpdir, args.keep) as root:
        prepared = prepare(problem, root)
        prepared.update(test=str(root / args.problem / "test.npz"), validation=str(root / args.problem / "validation.npz"))
        cache = Path(prepared["cache"])
        clusterings = {}
        for method in args.methods:
            inspect = harness.tool("cache-inspect", str(cache), "--clusters", str(args.clusters), "--cluster-method", method, "--json")
            (root / f"clusters-{method}.json").write_text(inspect.stdout)
            clusterings[method] = json.loads(inspect.stdout)
            harness.say(f"{method} clusters: {clusterings[method]['clusters']} (confusion covered {clusterings[method]['covered']:.1%})")
        x, y = problem.splits["train"]
        variants = [f"{method}, {head}" for method in args.methods for head in args.heads]
        arms = [("generalist", None, 1)] + [(f"{variant}, top {n}", variant, n) for variant in variants for n in args.top_n]
        scores: dict[str, dict[str, list[float]]] = {name: {"validation": [], "test": [], "active": []} for name, _, _ in arms}
        seeds: list[dict[str, Any]] = []
        for seed in range(args.seeds):
            runs = train_runs(root, cache, clusterings, seed, args)
            for name, head, n in arms:
                teacher = load(runs, head, n)
                for split in ("validation", "test"):
                    score, active = accuracy(teacher, Path(prepared[split]))
                    scores[name][split].append(score)
                scores[name]["active"].append(active)
            seeds.append(runs)
            harness.say(f"seed {seed}: " + ", ".join(f"{name} {s['test'][-1]:.4f}" for name, s in scores.items()))
        mean = {name: {k: statistics.fmean(v) for k, v in s.items()} for name, s in scores.items()}
        chosen = max((name for name, _, _ in arms[1:]), key=lambda name: mean[name]["validation"])
        _, variant, top_n = next(arm for arm in arms if arm[0] == chosen)
        students: dict[str, list[float]] = {"generalist": [], chosen: []}
        for seed, runs in enumerate(seeds):
            students["generalist"].append(distil_from(load(runs, None, 1, STUDENT_T), prepared, root, "generalist", seed, args, x, y))
            students[chosen].append(distil_from(load(runs, variant, top_n, STUDENT_T), prepared, root, "specialists", seed, args, x, y))
        test_x = np.load(prepared["test"])["inputs"]
        costs = {"digits": cost(load(seeds[0], None, 1), load(seeds[0], variant, top_n), test_x, args.cost_repeats)}
        shape, fake = (1, 28, 28), np.random.default_rng(0).integers(0, 256, (COST_BATCH * 4, 1, 28, 28), dtype=np.uint8)
        costs[args.cost_arch] = cost(
            *random_members(root, args.cost_arch, shape, clusterings[args.methods[0]]["clusters"], problem.classes), fake, args.cost_repeats
        )
        return {
            "environment": harness.environment(), "problem": prepared["problem"], "teacher": prepared["teacher"],
            "teacher_accuracy": prepared["teacher_accuracy"], "student": args.student, "seeds": args.seeds,
            "clusters": clusterings, "teachers": {"per_seed": scores, "mean": mean}, "chosen": {"arm": chosen, "variant": variant, "top_n": top_n},
            "students": {"per_seed": students, "mean": {k: statistics.fmean(v) for k, v in students.items()}}, "cost": costs,
        }  # fmt: skip


def report(result: dict[str, Any]) -> None:
    if "teachers" not in result:
        harness.print_header("Specialists: cost (issue 21)", result["environment"], f"device {result['device']}")
        _cost_table(result["cost"])
        return
    harness.print_header(
        "Specialists (issue 21)",
        result["environment"],
        result["problem"],
        f"teacher {result['teacher']}, student {result['student']}, {result['seeds']} seed(s)",
    )
    for method, clustering in result["clusters"].items():
        print(f"{method} clusters: {clustering['clusters']} (confusion covered {clustering['covered']:.1%})")
    print()
    mean = result["teachers"]["mean"]
    harness.table(
        [("teacher", "<"), ("validation", ">"), ("test", ">"), ("specialists per sample", ">")],
        [(name, f"{m['validation']:.4f}", f"{m['test']:.4f}", f"{m['active']:.2f}") for name, m in mean.items()],
    )
    print(f"\nchosen on validation: {result['chosen']['arm']}\n")
    harness.table(
        [("student distilled from", "<"), ("test (mean)", ">"), ("per seed", "<")],
        [(name, f"{statistics.fmean(v):.4f}", " ".join(f"{a:.4f}" for a in v)) for name, v in result["students"]["per_seed"].items()],
    )
    print()
    _cost_table(result["cost"])


def _cost_table(costs: dict[str, Any]) -> None:
    harness.table(
        [("members", "<"), ("alone µs/sample", ">"), ("with specialists", ">"), ("ratio", ">"), ("bound 1 + active", ">"), ("met", "<")],
        [(k, f"{c['alone_us_per_sample']:.1f}", f"{c['combined_us_per_sample']:.1f}", f"{c['ratio']:.2f}", f"{c['bound']:.2f}", str(c["met"])) for k, c in costs.items()],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the caches and runs")
    p.add_argument("--quick", action="store_true", help="one seed, the dustbin head, N in 1, 2")
    p.add_argument("--problem", default="digits", help="a problem of demo.problems")
    p.add_argument("--student", default="mlp", help="the generalist's, the specialists' and the distilled students' architecture")
    p.add_argument("--seeds", type=int, help=f"seeds (default {FULL['seeds']}; quick {QUICK['seeds']})")
    p.add_argument("--clusters", type=int, help=f"K for cache-inspect --clusters (default {FULL['clusters']})")
    p.add_argument("--top-n", type=int, nargs="+", help=f"the --specialist-top-n values tried (default {FULL['top_n']})")
    p.add_argument("--heads", nargs="+", choices=("dustbin", "full"), help=f"the heads tried (default {FULL['heads']})")
    p.add_argument(
        "--methods", nargs="+", choices=("spectral", "covariance"), help=f"the clustering methods tried (default {FULL['methods']})"
    )
    p.add_argument("--cost-arch", default="cnn-large", help="members of the second cost row, random weights on 28×28 uint8")
    p.add_argument("--cost-only", action="store_true", help="only the cost, of random-weight cnn-large and resnet members")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where --cost-only's teachers run")
    p.add_argument("--cost-members", nargs="+", default=COST_MEMBERS, help="--cost-only's members: ARCH@CxHxW, random weights")
    p.add_argument("--cost-batch", type=int, default=COST_BATCH, help="--cost-only's batch size")
    p.add_argument("--cost-repeats", type=int, help=f"timed passes per teacher (default {FULL['cost_repeats']})")
    return harness.timed_main(harness.parse(p, argv, QUICK, FULL), run, report)


if __name__ == "__main__":
    sys.exit(main())
