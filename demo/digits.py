"""``distill-demo``: the product's whole job, end to end, on scikit-learn's bundled digits.

1. train a teacher (``cnn-large``: conv stages, dropout in the head) on the train split and save
   it as a ``student.pt``-style record, which ``teacher-serve`` loads;
2. start ``teacher-serve`` on a free loopback port and wait until it is ready;
3. ``teacher-push`` the transfer set (the train split, with its labels) in binary mode, then
   stop the server (SIGTERM);
4. ``cache-convert`` the cache into a copy that keeps only the teacher's top 2 logits per sample
   and the tail's mass (``--targets topk:2``);
5. ``offline-distill`` the same student three times per seed, at its default recipe, with the
   labels of a seeded 10% of the samples (``--label-fraction 0.1``, the paper's section 6
   setting): distilled, distilled from the topk:2 copy, and on the labels alone (``--alpha 0``),
   each evaluated on the test split;
6. print a table, write ``summary.json`` and ``curves.png``.

Every tool runs as its own process, as a user would run it. The students' recipe is
``offline-distill``'s default, chosen on validation splits (``python -m kdcache.demo.sweep``),
never on a test split.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..offline.cli_help import HelpFormatter
from ..service.launch import LaunchError, ServeProcess

# The demo's own choices; the students' lr, epochs, batch, schedule and alpha are offline-distill's defaults
# (its recipe, chosen by `python -m kdcache.demo.sweep` on validation splits).
STUDENT = "mlp-small"
TEMPERATURE = 4.0
LABEL_FRACTION = 0.1  # the paper's section 6: soft targets for every sample, labels for a tenth
SEEDS = 3
TEACHER_ARCH = "cnn-large"
TEACHER_EPOCHS = 10
SPLIT_SEED = 0  # a stratified 70/30 split; tests/digits.py uses this one too
INPUT_SCALE = 1 / 16  # digits pixels are 0..16: sent as uint8, scaled on the teacher's device

PROG = "distill-demo"
TASKS = ("digits", "lm")  # distill-demo --task: this module's demo, or demo/lm.py's
# The console scripts this demo drives, and their entry points (used when the scripts are not
# installed next to this interpreter, e.g. `python -m kdcache.demo.digits` from a plain checkout).
TOOLS = {
    "teacher-serve": "service.cli:serve_main",
    "teacher-push": "service.push:push_main",
    "offline-distill": "offline.cli:distill_main",
    "cache-convert": "offline.convert:main",
}
ARMS = {"labels_only": "labels only (alpha 0)", "distilled": "distilled", "distilled_topk2": "distilled, topk:2 cache"}
COMPRESSED_TARGETS = "topk:2"  # what the distilled_topk2 arm's cache keeps (cache-convert --targets)


class StepError(Exception):
    """A step of the demo that failed, explained in one line."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


# ---------------------------------------------------------------------------------------------
# Data and teacher (components shared with demo/sweep.py)


def load_split(seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """scikit-learn's digits as uint8 8×8 images, split 70/30, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=seed, stratify=digits.target)
    return {"x_train": x_train, "y_train": y_train.astype(np.int64), "x_test": x_test, "y_test": y_test.astype(np.int64)}


def preprocess(x: np.ndarray, input_scale: float = INPUT_SCALE):  # -> torch.Tensor; torch is imported lazily so that --help is quick
    import torch

    return torch.from_numpy(x).float() * input_scale


def train_teacher(
    x: np.ndarray, y: np.ndarray, arch: str = TEACHER_ARCH, epochs: int = TEACHER_EPOCHS, seed: int = 0, num_classes: int = 10,
    input_scale: float = INPUT_SCALE,
):
    """Plain supervised training with AdamW (lr 2e-3, weight decay 1e-4, cosine schedule, batch
    64) on all of ``x``'s labels."""
    import torch

    from ..offline import models

    torch.manual_seed(seed)
    model = models.build(arch, x.shape[1:], num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / 64)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    inputs, labels = preprocess(x, input_scale), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def teacher_logits(model, x: np.ndarray, input_scale: float = INPUT_SCALE) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([model(preprocess(part, input_scale)) for part in np.array_split(x, max(1, len(x) // 1024))]).numpy().astype(np.float32)


def save_teacher(model, arch: str, path: Path) -> Path:
    """The teacher in the format ``offline-distill`` saves students in, which ``teacher-serve`` loads."""
    import torch

    from ..offline.cache import Preprocessing
    from ..offline.models import STUDENT_FORMAT

    record = {
        "format": STUDENT_FORMAT, "version": 1, "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_classes": 10, "input_shape": [8, 8], "input_dtype": "uint8",
        "preprocessing": Preprocessing(scale=INPUT_SCALE).to_dict(),
    }  # fmt: skip
    torch.save(record, path)
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Running the tools as processes


def tool_command(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module, _, function = TOOLS[name].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def last_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    # tqdm redraws with carriage returns; the last redraw is what was on screen.
    return lines[-1].split("\r")[-1] if lines else "(no output)"


def run_tool(step: str, name: str, args: list[str], log_path: Path, timeout: float = 600, env: dict[str, str] | None = None) -> None:
    """Run a tool to completion with its output in ``log_path``; a failure ends the demo."""
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run([*tool_command(name), *args], stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise StepError(step, f"{name} did not finish in {timeout:.0f} s (log: {log_path})") from None
    if proc.returncode != 0:
        raise StepError(step, f"{name} exited with {proc.returncode}: {last_line(log_path)} (log: {log_path})")


class TeacherServer(ServeProcess):
    """``teacher-serve`` as a subprocess on a free loopback port; a failure to start is a step error."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        super().__init__(args, log_path, command=tool_command("teacher-serve"))

    def wait_ready(self, timeout: float = 120.0) -> TeacherServer:
        try:
            super().wait_ready(timeout)
        except LaunchError as exc:
            raise StepError("serve", str(exc)) from None
        return self


# ---------------------------------------------------------------------------------------------
# The demo


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a teacher on scikit-learn's digits, serve it, push the transfer set, distil a student from the "
        "cache with and without the teacher's soft targets, and compare them on the test split.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--task", choices=TASKS, default="digits",
        help="digits: this demo; lm: a GPT-2 teacher and a small GPT student on the Python standard library's source "
        "(its options: distill-demo --task lm --help)",
    )  # fmt: skip
    p.add_argument("--out", default="demo-out", metavar="DIR", help="where the teacher, cache, runs, summary.json and curves.png go")
    p.add_argument("--json", action="store_true", help="print only the summary JSON on stdout")
    p.add_argument("--seeds", type=int, default=SEEDS, help="student seeds per arm")
    p.add_argument(
        "--label-fraction", "--transfer-fraction", dest="label_fraction", type=float, default=LABEL_FRACTION,
        help="fraction of the transfer set whose labels the students train on (offline-distill --label-fraction)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, help="student epochs (default: offline-distill's recipe)")
    p.add_argument("--lr", type=float, help="student learning rate (default: offline-distill's recipe)")
    p.add_argument("--student", default=STUDENT, help="a built-in student of offline-distill, or module:factory")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="distillation (and serving) temperature T")
    p.add_argument("--alpha", type=float, help="weight of the soft term in the distilled arms (default: offline-distill's recipe)")
    p.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="epochs of the teacher's own training")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument(
        "--augment",
        metavar="POLICY",
        help="serve V augmented views of each sample made by POLICY (e.g. random-crop:1); both arms train on them",
    )
    p.add_argument("--views", type=int, default=1, metavar="V", help="views per sample with --augment (teacher-serve --views)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = demo_parser()
    args = p.parse_args(argv)
    problems = []
    if args.seeds < 1:
        problems.append(f"--seeds must be >= 1, got {args.seeds}")
    if not 0 < args.label_fraction <= 1:
        problems.append(f"--label-fraction must lie in (0, 1], got {args.label_fraction}")
    if (args.epochs is not None and args.epochs < 1) or args.teacher_epochs < 1:
        problems.append(f"--epochs and --teacher-epochs must be >= 1, got {args.epochs} and {args.teacher_epochs}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if args.alpha is not None and not 0 < args.alpha <= 1:
        problems.append(f"--alpha must lie in (0, 1] (the other arm is alpha 0), got {args.alpha}")
    if args.views < 1:
        problems.append(f"--views must be >= 1, got {args.views}")
    elif args.views > 1 and not args.augment:
        problems.append(f"--views {args.views} needs --augment POLICY (without one every view is the sample itself)")
    if args.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if problems:
        p.error("; ".join(problems))
    return args


class Steps:
    """Runs the steps in order, timing each and saying on stderr what it is doing."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, what: str, body: Callable[[], str | None]) -> None:
        print(f"[{name}] {what} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            result = body()
        except StepError:
            raise
        except Exception as exc:  # anything else a step raises still ends as one line naming the step
            raise StepError(name, f"{type(exc).__name__}: {exc}") from exc
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s" + (f": {result}" if result else ""), file=sys.stderr, flush=True)


def prepare_out(out: Path) -> dict[str, Path]:
    """The demo's paths under ``out``; what an earlier run left there is removed first."""
    paths = {
        "teacher": out / "teacher.pt", "transfer": out / "transfer.npz", "test": out / "test.npz", "cache": out / "cache",
        "cache_topk2": out / "cache-top2", "runs": out / "runs", "logs": out / "logs", "summary": out / "summary.json", "curves": out / "curves.png",
    }  # fmt: skip
    for path in paths.values():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    paths["runs"].mkdir()
    paths["logs"].mkdir()
    return paths


def read_run(run_dir: Path) -> tuple[float, list[float]]:
    """The final test accuracy of an ``offline-distill`` run and its per-epoch curve."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    curve = [json.loads(line)["eval_accuracy"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(summary["eval_accuracy"]), [float(a) for a in curve]


def plot_curves(arms: dict[str, dict[str, Any]], teacher_accuracy: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, arm in arms.items():
        curves = np.asarray(arm["curves"], dtype=np.float64)
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        ax.plot(epochs, mean, marker="o" if len(epochs) <= 40 else None, markersize=3, label=f"{ARMS[key]}: {arm['mean']:.3f}")
        if len(curves) > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.axhline(teacher_accuracy, color="grey", linestyle="--", label=f"teacher: {teacher_accuracy:.3f}")
    ax.set(xlabel="epoch", ylabel="test accuracy (mean over seeds, ±1 std)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..offline import models
    from ..offline.cache import CacheReader

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    try:
        paths = prepare_out(out)
    except OSError as exc:
        raise StepError("prepare", f"cannot use --out {out}: {exc}") from None
    steps = Steps()
    state: dict[str, Any] = {}

    def data() -> str:
        from ..offline.cache.ids import normalize_ids
        from ..offline.dataset import keeps_label

        split = load_split()
        ids = np.arange(len(split["y_train"]), dtype=np.int64)
        np.savez(paths["transfer"], inputs=split["x_train"], labels=split["y_train"], ids=ids)
        np.savez(paths["test"], inputs=split["x_test"], labels=split["y_test"])
        # Every label goes into the cache; offline-distill --label-fraction keeps those of a seeded fraction.
        state.update(split, labelled=int(keeps_label(normalize_ids(ids), args.label_fraction, 0).sum()))
        return f"{len(ids)} train ({state['labelled']} labels used by the students), {len(split['y_test'])} test"

    def teacher() -> str:
        model = train_teacher(state["x_train"], state["y_train"], TEACHER_ARCH, args.teacher_epochs)
        accuracy = float((teacher_logits(model, state["x_test"]).argmax(1) == state["y_test"]).mean())
        save_teacher(model, TEACHER_ARCH, paths["teacher"])
        state["teacher"] = {
            "arch": TEACHER_ARCH,
            "params": models.count_parameters(model),
            "epochs": args.teacher_epochs,
            "test_accuracy": accuracy,
        }
        return f"{TEACHER_ARCH}, {state['teacher']['params']:,} parameters, test accuracy {accuracy:.4f}"

    steps.run("data", "loading scikit-learn digits", data)
    steps.run("teacher", f"training the teacher ({TEACHER_ARCH}, {args.teacher_epochs} epochs, all labels)", teacher)

    serve_args = [
        "--teacher",
        str(paths["teacher"]),
        "--cache",
        str(paths["cache"]),
        "--device",
        device,
        "--temperature",
        str(args.temperature),
        *(["--views", str(args.views), "--augment", args.augment] if args.augment else []),
    ]
    server = TeacherServer(serve_args, paths["logs"] / "teacher-serve.log")
    try:
        steps.run("serve", f"starting teacher-serve on {server.url}", lambda: server.wait_ready() and "ready")

        def push() -> str:
            run_tool(
                "push",
                "teacher-push",
                ["--url", server.url, "--data", str(paths["transfer"]), "--no-progress"],
                paths["logs"] / "teacher-push.log",
            )
            return last_line(paths["logs"] / "teacher-push.log").removeprefix("teacher-push: ")

        steps.run("push", "teacher-push: the transfer set over HTTP, binary tensors", push)

        def stop() -> str:
            code = server.stop()
            if code != 0:
                raise StepError("stop", f"teacher-serve exited with {code} on SIGTERM, expected 0 (log: {server.log_path})")
            return "exit status 0, shard published"

        steps.run("stop", "stopping teacher-serve (SIGTERM)", stop)
    finally:
        server.stop()  # a no-op once stopped; after a failed step, the server must not outlive the demo

    def describe_cache(directory: Path) -> dict[str, Any]:
        reader = CacheReader(directory)
        meta = reader.meta
        return {
            "targets": meta.logits_layout, "samples": reader.num_samples, "shards": len(reader.shards), "bytes": reader.total_bytes,
            "bytes_per_sample": reader.total_bytes / max(reader.num_samples, 1), "label_coverage": reader.label_coverage(),
            "target_bytes_per_sample": meta.layout.row_bytes(meta.num_classes),
            "full_float32_target_bytes_per_sample": 4 * meta.num_classes * meta.views_per_id,
        }  # fmt: skip

    cache = describe_cache(paths["cache"])
    if cache["samples"] != len(state["y_train"]):
        raise StepError(
            "push", f"{paths['cache']} holds {cache['samples']} samples, expected the {len(state['y_train'])} of the train split"
        )

    def compress() -> str:
        run_tool(
            "convert",
            "cache-convert",
            [str(paths["cache"]), str(paths["cache_topk2"]), "--targets", COMPRESSED_TARGETS, "--no-progress"],
            paths["logs"] / "cache-convert.log",
        )
        return last_line(paths["logs"] / "cache-convert.log").removeprefix("cache-convert: ")

    steps.run("convert", f"cache-convert: the cache's teacher logits to {COMPRESSED_TARGETS} targets", compress)
    compressed_cache = describe_cache(paths["cache_topk2"])

    arms: dict[str, dict[str, Any]] = {
        key: {"alpha": 0.0 if key == "labels_only" else args.alpha, "accuracies": [], "curves": []} for key in ARMS
    }
    recipe: dict[str, Any] = {}
    caches = {key: paths["cache_topk2"] if key == "distilled_topk2" else paths["cache"] for key in ARMS}

    # The students are tiny: on the CPU one thread beats several (no OpenMP spin-waiting), the more
    # so on a machine shared with other work. OMP_NUM_THREADS set by the user wins.
    distill_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if device == "cpu" else None

    def distill(key: str, seed: int) -> str:
        arm, run_dir = arms[key], paths["runs"] / f"{key}-seed{seed}"
        given = {"--epochs": args.epochs, "--lr": args.lr, "--alpha": arm["alpha"]}
        distill_args = [
            "--cache", str(caches[key]), "--student", args.student, "--seed", str(seed), "--temperature", str(args.temperature),
            "--label-fraction", str(args.label_fraction), "--eval", str(paths["test"]), "--out", str(run_dir), "--device", device,
            "--no-export", "--no-progress", *(word for flag, value in given.items() if value is not None for word in (flag, str(value))),
        ]  # fmt: skip
        log_path = paths["logs"] / f"offline-distill-{key}-seed{seed}.log"
        run_tool(f"distill {key} seed {seed}", "offline-distill", distill_args, log_path, env=distill_env)
        accuracy, curve = read_run(run_dir)
        if key == "distilled":
            recipe.update(json.loads((run_dir / "metrics.json").read_text())["recipe"])
        arm["accuracies"].append(accuracy)
        arm["curves"].append(curve)
        return f"test accuracy {accuracy:.4f}"

    for seed in range(args.seeds):
        for key in arms:
            steps.run(f"distill {key}", f"offline-distill {args.student}, {ARMS[key]}, seed {seed}", functools.partial(distill, key, seed))
    for arm in arms.values():
        arm["mean"], arm["std"] = mean_std(arm["accuracies"])
        arm["curve_mean"] = np.asarray(arm["curves"]).mean(axis=0).tolist()

    title = f"{args.student} on digits, {args.label_fraction:.0%} labels, T={args.temperature:g}, alpha={recipe['alpha']:g}"
    steps.run("plot", f"writing {paths['curves']}", lambda: plot_curves(arms, state["teacher"]["test_accuracy"], paths["curves"], title))
    summary = {
        "settings": {
            "student": args.student, "epochs": recipe["epochs"], "lr": recipe["lr"], "batch_size": recipe["batch_size"],
            "schedule": recipe["schedule"], "seeds": args.seeds, "temperature": args.temperature, "alpha": recipe["alpha"],
            "label_fraction": args.label_fraction, "recipe_given": recipe["given"], "device": device, "split_seed": SPLIT_SEED,
            "augment": args.augment, "views": args.views if args.augment else 1,
        },
        "data": {"train_samples": len(state["y_train"]), "labelled_train_samples": state["labelled"], "test_samples": len(state["y_test"])},
        "teacher": state["teacher"],
        "cache": cache,
        "compressed_cache": compressed_cache,
        "arms": {key: {k: v for k, v in arm.items() if k != "curves"} for key, arm in arms.items()},
        "gain": arms["distilled"]["mean"] - arms["labels_only"]["mean"],
        "seconds": steps.seconds,
        "files": {"summary": str(paths["summary"]), "curves": str(paths["curves"]), "cache": str(paths["cache"]),
                  "compressed_cache": str(paths["cache_topk2"]), "runs": str(paths["runs"])},
    }  # fmt: skip
    paths["summary"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    s, arms, cache, compressed = summary["settings"], summary["arms"], summary["cache"], summary["compressed_cache"]
    seconds = summary["seconds"]

    def student(key: str) -> str:
        arm = arms[key]
        accuracy = (
            f"{s['student']}, test accuracy {arm['mean']:.4f} ± {arm['std']:.4f}  ({', '.join(f'{a:.4f}' for a in arm['accuracies'])})"
        )
        if key != "distilled_topk2":
            return accuracy
        target, full = compressed["target_bytes_per_sample"], compressed["full_float32_target_bytes_per_sample"]
        return f"{accuracy}; targets {target:,} bytes/sample, {target / full:.0%} of full float32 ({full:,})"

    rows = [
        ("teacher", f"{summary['teacher']['arch']}, test accuracy {summary['teacher']['test_accuracy']:.4f}"),
        *((f"student, {ARMS[key]}", student(key)) for key in ARMS),
        ("gain from the teacher", f"{summary['gain']:+.4f}"),
        (
            "labels kept",
            f"{summary['data']['labelled_train_samples']} of {summary['data']['train_samples']} (--label-fraction {s['label_fraction']:g})",
        ),
        ("cache", f"{cache['samples']:,} samples, {cache['bytes']:,} bytes, {cache['bytes_per_sample']:,.1f} bytes/sample"),
        (
            f"{compressed['targets']} cache",
            f"{compressed['samples']:,} samples, {compressed['bytes']:,} bytes, {compressed['bytes_per_sample']:,.1f} bytes/sample "
            "(cache-convert, no teacher)",
        ),
        *(
            [("views", f"{s['views']} per sample by {s['augment']}, replayed from their seeds in every arm")] if s.get("augment") else []
        ),  # fmt: skip
        (
            "settings",
            f"T={s['temperature']:g} alpha={s['alpha']:g} epochs={s['epochs']} lr={s['lr']:g} batch={s['batch_size']} "
            f"{s['schedule']} seeds={s['seeds']} device={s['device']}"
            + (f" (given: {', '.join(s['recipe_given'])}; the rest offline-distill's recipe)" if s["recipe_given"] else " (offline-distill's recipe)"),
        ),
        *((f"time: {name}", f"{value:.1f} s") for name, value in seconds.items()),
        ("time: total", f"{sum(seconds.values()):.1f} s"),
        ("wrote", f"{summary['files']['summary']}, {summary['files']['curves']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def task_of(argv: Sequence[str]) -> str:
    """The ``--task`` in ``argv`` (``digits`` without one); a bad one ends the program like any bad option."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False)
    p.add_argument("--task", choices=TASKS, default="digits")
    return p.parse_known_args(argv)[0].task


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if task_of(argv) == "lm":
        from .lm import main as lm_main

        return lm_main(argv)
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        summary = run_demo(args)
    except StepError as exc:
        print(f"{PROG}: error: step {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
