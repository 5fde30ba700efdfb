"""``python -m kdcache.demo.sweep``: how ``offline-distill``'s default recipe was chosen, on
validation splits only, and (``--test``) how it does on the test splits it was never tuned on.

The problems are ``demo.problems``' three (the digits, digit pairs with C = 100, 28×28 placed
digits); the students are ``mlp`` (the default) and ``cnn-small``. For each problem a teacher is
trained on the train split's labels and its logits are written, with every label, to a cache by
``CacheWriter``. Students are trained in worker processes by ``offline.train.train`` (the loop
behind ``offline-distill``; the CLI is skipped only to fit the many runs into the time) and scored
on the validation split.

The search is coordinate-wise over the recipe rule (``offline.recipe.RecipeRule``), each stage
starting from the best rule of the one before, by the mean validation accuracy over every
(problem, student) cell:

1. learning rate × step budget (epochs follow from the cache's sample count);
2. batch size × schedule;
3. alpha.

``--test`` then trains, on the test split, 3 seeds each: the code's ``DEFAULT_RULE`` distilled,
the same rule with alpha 0 (labels only at the defaults), and each cell's best rule of the
search, and checks the goals: defaults beat labels only, and lie within 0.5 points of the best.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import digits as demo
from .problems import PROBLEMS, Problem, make_problem

STUDENTS = ("mlp", "cnn-small")
TEACHERS = {"digits": ("cnn-large", 10), "digit-pairs": ("mlp-teacher", 5), "digits-28": ("cnn-large", 8)}  # arch, epochs
STAGES = {
    "lr × steps": {"lr": [1e-3, 3e-3, 1e-2], "steps": [1000, 3000, 6000]},
    "batch × schedule": {"batch_size": [64, 128], "schedule": ["warmup-cosine", "cosine", "constant"]},
    "alpha": {"alpha": [0.5, 0.7, 0.9, 1.0]},
}
# The conv student on 28×28 costs as much as the other five cells together on a 2-core CPU: it
# takes part in the first stage (where the learning rate and the steps are chosen) and in the test.
LATER_STAGES_SKIP = {"digits-28/cnn-small"}
# offline-distill's recipe before issue 19, for reference: 10 epochs whatever the cache, lr 1e-3, batch 128, cosine.
OLD_DEFAULTS = {"lr": 1e-3, "epochs": 10, "batch_size": 128, "schedule": "cosine", "alpha": 0.9}
GOAL_POINTS = 0.005  # defaults within 0.5 points of the best recipe


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kdcache.demo.sweep",
        description="Choose offline-distill's default recipe on validation splits; --test scores it on the test splits.",
    )
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS), help="problems to sweep (default: all three)")
    p.add_argument("--students", nargs="+", default=list(STUDENTS), help="students to sweep (default: mlp cnn-small)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per validation run (default: 2)")
    p.add_argument("--test-seeds", type=int, default=3, help="seeds per test run (default: 3)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the generated problems' splits by this factor (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="training processes at once, one thread each (default: 2)")
    p.add_argument("--test", action="store_true", help="after the search, score the defaults on the test splits")
    p.add_argument("--test-only", action="store_true", help="skip the search; score DEFAULT_RULE and labels only on the test splits")
    p.add_argument(
        "--check-students", action="store_true",
        help="instead: train every built-in student on digits-28 (validation split, one seed) at the default recipe",
    )  # fmt: skip
    p.add_argument(
        "--start", metavar="KEY=VALUE,...",
        help="the rule the first stage run starts from, e.g. lr=0.01,steps=6000 (default: the code's DEFAULT_RULE)",
    )  # fmt: skip
    p.add_argument("--stages", nargs="+", type=int, metavar="N", help="which stages to run, 1-3 (default: all)")
    p.add_argument(
        "--prior", nargs="+", metavar="FILE",
        help="JSON written by earlier runs (--json): their scored rules count in each cell's best recipe for the test",
    )  # fmt: skip
    p.add_argument(
        "--teacher", action="append", metavar="PROBLEM=ARCH:EPOCHS",
        help=f"another teacher for a problem, e.g. digit-pairs=cnn-large:5 (default: {', '.join(f'{k}={a}:{e}' for k, (a, e) in TEACHERS.items())})",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every run and the verdicts to FILE")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return sweep_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Problems, teachers and caches


def prepare(problem: Problem, root: Path, teacher: tuple[str, int] | None = None) -> dict[str, Any]:
    """Train the problem's teacher on its train split, write its cache and the eval sets."""
    from ..offline.cache import CacheMeta, CacheWriter, Preprocessing
    from ..offline.models import weights_fingerprint

    arch, epochs = teacher or TEACHERS[problem.name]
    x, y = problem.splits["train"]
    started = time.perf_counter()
    teacher = demo.train_teacher(x, y, arch, epochs, num_classes=problem.classes, input_scale=problem.input_scale)
    logits = demo.teacher_logits(teacher, x, problem.input_scale)
    directory = root / problem.name
    meta = CacheMeta(
        teacher_fingerprint=weights_fingerprint(teacher.state_dict()), teacher_name=arch, num_classes=problem.classes,
        input_shape=x.shape[1:], input_dtype=x.dtype.name, preprocessing=Preprocessing(scale=problem.input_scale), serving_temperature=1.0,
    )  # fmt: skip
    with CacheWriter(directory / "cache", meta) as writer:
        writer.append(np.arange(len(x)), x, logits, y)
    teacher_scores = {}
    for split in ("validation", "test"):
        xs, ys = problem.splits[split]
        np.savez(directory / f"{split}.npz", inputs=xs, labels=ys)
        teacher_scores[split] = float((demo.teacher_logits(teacher, xs, problem.input_scale).argmax(1) == ys).mean())
    return {
        "problem": problem.describe(), "teacher": arch, "teacher_epochs": epochs, "teacher_accuracy": teacher_scores,
        "teacher_seconds": time.perf_counter() - started, "cache": str(directory / "cache"), "samples": len(x),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Runs (in worker processes)


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread each, several processes


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One ``offline.train.train`` run; returns the job with its accuracy and seconds."""
    from ..offline.train import TrainConfig, train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kd-sweep-run-") as out:
        config = TrainConfig(
            caches=[job["cache"]], student=job["student"], seed=job["seed"], eval_path=job["eval"], out=out, device="cpu",
            progress=False, export=False, **job["recipe"],
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train(config)
    return {**job, "accuracy": summary["eval_accuracy"], "seconds": time.perf_counter() - started, "settled": summary["recipe"]}


class Runner:
    """Runs jobs on a pool of processes and remembers every result."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=init_worker)
        self.results: list[dict[str, Any]] = []

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        done = self.pool.map(run_one, jobs, chunksize=1)
        self.results += done
        return done

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def rule_recipe(rule: dict[str, Any], samples: int) -> dict[str, Any]:
    """The explicit recipe (lr, epochs, batch size, schedule, alpha) a rule gives a cache."""
    from ..offline.recipe import RecipeRule

    recipe = RecipeRule(**rule).recipe(samples)
    return {"lr": recipe.lr, "epochs": recipe.epochs, "batch_size": recipe.batch_size, "schedule": recipe.schedule, "alpha": recipe.alpha}


def cells(prepared: dict[str, dict[str, Any]], students: Sequence[str]) -> list[tuple[str, str]]:
    return [(name, student) for name in prepared for student in students]


def score_rules(
    runner: Runner, rules: list[dict[str, Any]], prepared: dict[str, dict[str, Any]], students: Sequence[str], seeds: int, split: str,
    skip: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:  # fmt: skip
    """Every rule on every cell but ``skip``, ``seeds`` seeds each: per rule, per cell mean accuracy and the mean over cells."""
    chosen = [(name, student) for name, student in cells(prepared, students) if f"{name}/{student}" not in skip]
    jobs = []
    for index, rule in enumerate(rules):
        for (name, student), seed in itertools.product(chosen, range(seeds)):
            info = prepared[name]
            recipe = rule["explicit"] if "explicit" in rule else rule_recipe(rule["rule"], info["samples"])
            if "alpha" in rule:
                recipe = {**recipe, "alpha": rule["alpha"]}
            jobs.append({
                "rule_index": index, "problem": name, "student": student, "seed": seed, "recipe": recipe,
                "cache": info["cache"], "eval": str(Path(info["cache"]).parent / f"{split}.npz"), "split": split,
            })  # fmt: skip
    done = runner.run(jobs)
    scored = []
    for index, rule in enumerate(rules):
        per_cell = {}
        for name, student in chosen:
            accs = [r["accuracy"] for r in done if r["rule_index"] == index and r["problem"] == name and r["student"] == student]
            mean, std = demo.mean_std(accs)
            per_cell[f"{name}/{student}"] = {"mean": mean, "std": std, "runs": accs}
        overall = float(np.mean([c["mean"] for c in per_cell.values()]))
        scored.append({**{k: v for k, v in rule.items()}, "cells": per_cell, "mean": overall})
    return scored


def describe_rule(rule: dict[str, Any]) -> str:
    if "explicit" in rule:
        r = rule["explicit"]
        return f"fixed: lr {r['lr']:g}, {r['epochs']} epochs, batch {r['batch_size']}, {r['schedule']}, alpha {r['alpha']:g}"
    r = rule["rule"]
    text = f"lr {r['lr']:g}, {r['steps']} steps, batch {r['batch_size']}, {r['schedule']}, alpha {r['alpha']:g}"
    return text + (f" (alpha {rule['alpha']:g})" if "alpha" in rule else "")


def print_table(title: str, scored: list[dict[str, Any]]) -> None:
    names = list(scored[0]["cells"])
    header = f"{'rule':<62}" + "".join(f"{n:>22}" for n in names) + f"{'mean':>8}"
    print(f"\n## {title}\n{header}\n" + "-" * len(header))
    for row in scored:
        print(
            f"{describe_rule(row):<62}" + "".join(f"{row['cells'][n]['mean']:>14.4f} ± {row['cells'][n]['std']:.3f}" for n in names)
            + f"{row['mean']:>8.4f}",
            flush=True,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The search and the test


def search(runner: Runner, prepared: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from ..offline.recipe import DEFAULT_RULE

    best = {**asdict(DEFAULT_RULE), **parse_start(args.start)}
    stages = {}
    everything = prior_rows(args.prior or [])
    for number, (title, grid) in enumerate(STAGES.items(), start=1):
        if args.stages and number not in args.stages:
            continue
        keys = list(grid)
        rules = [{"rule": {**best, **dict(zip(keys, values, strict=True))}} for values in itertools.product(*grid.values())]
        skip = LATER_STAGES_SKIP if number > 1 else frozenset()
        scored = score_rules(runner, rules, prepared, args.students, args.seeds, "validation", skip)
        print_table(f"validation: {title}", scored)
        best = max(scored, key=lambda row: row["mean"])["rule"]
        stages[title] = scored
        everything += scored
    reference = score_rules(runner, [{"explicit": OLD_DEFAULTS}], prepared, args.students, args.seeds, "validation")
    labels_only = score_rules(runner, [{"rule": best, "alpha": 0.0}], prepared, args.students, args.seeds, "validation")
    print_table("validation: references", reference + labels_only)
    return {"stages": stages, "chosen": best, "old_defaults": reference, "labels_only": labels_only, "best_per_cell": best_per_cell(everything)}


def prior_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The scored rules (rows) in files that earlier runs wrote with --json."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows += data.get("rows") or [row for stage in data.get("search", {}).get("stages", {}).values() for row in stage]
    return rows


def best_per_cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each cell's best rule by validation accuracy over every rule tried: the test's "best recipe in the sweep"."""
    best = {}
    for cell in sorted({cell for row in rows if "rule" in row and "alpha" not in row for cell in row["cells"]}):
        winner = max((row for row in rows if "rule" in row and "alpha" not in row and cell in row["cells"]), key=lambda row: row["cells"][cell]["mean"])
        best[cell] = {"rule": winner["rule"], "validation": winner["cells"][cell]["mean"]}
    return best


def parse_start(text: str | None) -> dict[str, Any]:
    """``lr=0.01,steps=6000`` as rule fields, typed as the rule's defaults are."""
    from ..offline.recipe import DEFAULT_RULE

    fields = asdict(DEFAULT_RULE)
    start: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--start: {key!r} is not a rule field ({', '.join(fields)})")
        start[key] = type(fields[key])(value)
    return start


def test(runner: Runner, prepared: dict[str, dict[str, Any]], best_per_cell: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    from ..offline.recipe import DEFAULT_RULE

    default = {"rule": asdict(DEFAULT_RULE)}
    scored = score_rules(runner, [default, {**default, "alpha": 0.0}, {"explicit": OLD_DEFAULTS}], prepared, args.students, args.test_seeds, "test")
    print_table("test: the defaults, labels only at the defaults, the old defaults", scored)
    distilled, labels_only = scored[0]["cells"], scored[1]["cells"]
    best: dict[str, Any] = {}
    if best_per_cell:
        for cell, winner in best_per_cell.items():
            name, student = cell.split("/")
            if name not in prepared or student not in args.students:
                continue
            if winner["rule"] == default["rule"]:  # the defaults are this cell's best: their runs are above
                best[cell] = {"rule": winner["rule"], **distilled[cell]}
                continue
            one = score_rules(runner, [{"rule": winner["rule"]}], {name: prepared[name]}, [student], args.test_seeds, "test")[0]
            best[cell] = {"rule": winner["rule"], **one["cells"][cell]}
    verdicts = {}
    for cell in distilled:
        row = {
            "distilled": distilled[cell]["mean"], "labels_only": labels_only[cell]["mean"],
            "beats_labels_only": distilled[cell]["mean"] > labels_only[cell]["mean"],
        }  # fmt: skip
        if cell in best:
            top = max(best[cell]["mean"], distilled[cell]["mean"])
            row |= {"best_in_sweep": best[cell]["mean"], "gap_to_best": top - distilled[cell]["mean"],
                    "within_goal": top - distilled[cell]["mean"] <= GOAL_POINTS}  # fmt: skip
        verdicts[cell] = row
    print("\n## test verdicts")
    for cell, row in verdicts.items():
        extra = f", best {row['best_in_sweep']:.4f} (gap {row['gap_to_best'] * 100:.2f} points)" if "best_in_sweep" in row else ""
        print(f"{cell:<24} defaults {row['distilled']:.4f} vs labels only {row['labels_only']:.4f}{extra}")
    return {"rows": scored, "best": best, "verdicts": verdicts}


# Students too slow for the default recipe's steps on a 2-core CPU: checked at CHECK_EPOCHS epochs instead.
HEAVY_STUDENTS = {"cnn-large", "resnet", "resnet-8", "mlp-teacher"}
CHECK_EPOCHS = 5


def check_students(runner: Runner, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Every built-in student on one problem's validation split, one seed."""
    from ..offline.models import REGISTRY, count_parameters
    from ..offline.recipe import DEFAULT_RULE

    default = rule_recipe(asdict(DEFAULT_RULE), info["samples"])
    jobs = [
        {"problem": "digits-28", "student": name, "seed": 0, "cache": info["cache"], "split": "validation",
         "eval": str(Path(info["cache"]).parent / "validation.npz"),
         "recipe": {**default, "epochs": CHECK_EPOCHS} if name in HEAVY_STUDENTS else default}
        for name in REGISTRY
    ]  # fmt: skip
    done = runner.run(jobs)
    print(f"\n## every student on {info['problem']}: validation accuracy, seed 0\n{'student':<12} {'params':>10} {'epochs':>7} {'accuracy':>9} {'seconds':>8}")
    for row in done:
        row["params"] = count_parameters(REGISTRY[row["student"]]((28, 28), 10))
        print(f"{row['student']:<12} {row['params']:>10,} {row['recipe']['epochs']:>7} {row['accuracy']:>9.4f} {row['seconds']:>8.0f}")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_students:
        args.problems = ["digits-28"]
    started = time.perf_counter()
    result: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="kd-sweep-") as tmp:
        root = Path(tmp)
        prepared = {}
        teachers = {}
        for item in args.teacher or []:
            name, _, spec = item.partition("=")
            arch, _, epochs = spec.partition(":")
            if name not in PROBLEMS or not arch or not epochs.isdigit():
                raise SystemExit(f"--teacher {item}: expected PROBLEM=ARCH:EPOCHS with PROBLEM one of {', '.join(PROBLEMS)}")
            teachers[name] = (arch, int(epochs))
        for name in args.problems:
            prepared[name] = prepare(make_problem(name, args.scale), root, teachers.get(name))
            info = prepared[name]
            print(
                f"# {info['problem']}; teacher {info['teacher']} ({info['teacher_epochs']} epochs): validation "
                f"{info['teacher_accuracy']['validation']:.4f}, {info['teacher_seconds']:.0f} s",
                flush=True,
            )
        result["problems"] = prepared
        runner = Runner(args.workers)
        try:
            if args.check_students:
                result["students"] = check_students(runner, prepared["digits-28"])
            elif not args.test_only:
                result["search"] = search(runner, prepared, args)
            if args.test or args.test_only:
                winners = result["search"]["best_per_cell"] if "search" in result else best_per_cell(prior_rows(args.prior or []))
                result["test"] = test(runner, prepared, winners, args)
        finally:
            runner.close()
        result["runs"] = runner.results
    result["seconds"] = time.perf_counter() - started
    print(f"# {time.perf_counter() - started:.0f} s, {len(result['runs'])} runs", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

