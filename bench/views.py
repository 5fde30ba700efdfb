"""Views benchmark: does a cache of augmented views let offline-distill train with augmentation
and lose nothing to online KD (the teacher in the loop)?

Three measurements (method: docs/benchmarks.md, "Augmented views"):

1. **Accuracy** on scikit-learn's digits (the demo's split and teacher; every arm the same
   student, epochs, lr, batch, T, alpha and seeds): labels only; labels + augmentation (fresh
   views each epoch); distilled from the plain one-view cache (today's); distilled from caches
   of V augmented views per sample for each V in ``--views``; online KD with the same policy
   (the teacher in the loop on fresh views). Target: offline from V = epochs within 0.3 points
   of online KD (means over the seeds). Bytes per sample and seconds for each.
2. **Serving**: the teacher's forward on B samples × V views made on its device from their
   seeds ÷ the raw forward of V·B ready inputs (target >= 0.9).
3. **Training**: steps/s of ``train_step`` on views replayed from a cache ÷ on the same policy
   applied to in-memory tensors (target >= 0.9).

    .venv/bin/python -m bench.views            # about 5 minutes on 2 cores
    .venv/bin/python -m bench.views --quick    # about a minute
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.demo import digits as demo
from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.cache.views import parse_policy, view_seeds
from kdcache.offline.dataset import ShardStream
from kdcache.offline.evaluate import evaluate
from kdcache.offline.losses import Objective
from kdcache.offline.malloc import tune_malloc
from kdcache.offline.step import EpochStats, step_on_inputs, train_step
from kdcache.offline.train import TrainConfig, train
from kdcache.service.teacher import load_teacher

PREPROCESSING = Preprocessing(scale=demo.INPUT_SCALE)
# The recipe of every accuracy arm (issue 13's): AdamW, cosine schedule, batch 64, T=4, alpha 0.7.
# The schedule: cosine, as the online arm's (which steps it per epoch; offline-distill steps it per batch).
RECIPE = {"student": "mlp", "lr": 3e-3, "batch_size": 64, "temperature": 4.0, "alpha": 0.7, "schedule": "cosine"}


# ---------------------------------------------------------------------------------------------
# 1. Accuracy


def fill(directory: Path, teacher: torch.nn.Module, split: dict[str, np.ndarray], policy: str | None, views: int) -> dict[str, Any]:
    """The cache teacher-serve --views V --augment POLICY writes (or a plain one): the teacher's
    logits on each view made from its seed."""
    x, y = split["x_train"], split["y_train"]
    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    augment = parse_policy(policy) if policy else None
    meta = CacheMeta(
        models.weights_fingerprint(teacher.state_dict()), "digits-teacher", 10, x.shape[1:], "uint8", PREPROCESSING,
        views_per_id=views, augment=augment.describe() if augment else None,
    )  # fmt: skip
    started = time.perf_counter()
    with torch.no_grad():
        raw = torch.from_numpy(x)
        if augment is None:
            logits = teacher(PREPROCESSING.apply(raw)).numpy()
        else:
            seeds = torch.from_numpy(view_seeds(0, ids, views))
            logits = np.stack([teacher(PREPROCESSING.apply(augment(raw, seeds[:, v]))).numpy() for v in range(views)], axis=1)
            logits = logits if views > 1 else logits[:, 0]
    with CacheWriter(directory, meta) as writer:
        writer.append(ids, x, logits, y)
    reader = CacheReader(directory)
    return {"fill_s": time.perf_counter() - started, "bytes_per_sample": reader.total_bytes / reader.num_samples}


def offline(cache: Path, eval_npz: Path, out: Path, seed: int, epochs: int, alpha: float) -> dict[str, Any]:
    """offline-distill's loop, in this process."""
    started = time.perf_counter()
    config = TrainConfig(
        caches=[str(cache)], epochs=epochs, seed=seed, eval_path=str(eval_npz), out=str(out), progress=False, export=False,
        **{**RECIPE, "alpha": alpha},
    )  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines: --json keeps stdout to one object
        summary = train(config)
    return {"accuracy": summary["eval_accuracy"], "seconds": time.perf_counter() - started}


def online(
    teacher: torch.nn.Module | None, split: dict[str, np.ndarray], policy: str, seed: int, epochs: int, alpha: float
) -> dict[str, Any]:
    """The teacher in the loop on fresh views each epoch (or labels only, ``teacher`` None):
    the same student, optimiser, schedule and step as offline-distill."""
    started = time.perf_counter()
    augment = parse_policy(policy)
    x, y = torch.from_numpy(split["x_train"]), torch.from_numpy(split["y_train"])
    torch.manual_seed(seed)
    student = models.build(RECIPE["student"], x.shape[1:], 10)
    optimizer = torch.optim.AdamW(student.parameters(), lr=RECIPE["lr"], weight_decay=harness.TRAINER.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    objective = Objective(RECIPE["temperature"], alpha)
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for index in torch.randperm(len(x), generator=generator).split(RECIPE["batch_size"]):
            seeds = torch.randint(0, 1 << 62, (len(index),), generator=generator)
            inputs = PREPROCESSING.apply(augment(x[index], seeds))
            with torch.no_grad():
                targets = teacher(inputs) if teacher is not None else torch.zeros(len(index), 10)
            step_on_inputs(student, optimizer, inputs, targets, y[index], objective=objective)
        scheduler.step()
    meta = CacheMeta("0" * 64, "t", 10, x.shape[1:], "uint8", PREPROCESSING)
    accuracy = evaluate(student, torch.from_numpy(split["x_test"]), torch.from_numpy(split["y_test"]), meta, torch.device("cpu"))
    return {"accuracy": accuracy, "seconds": time.perf_counter() - started}


def accuracy(args: Any, root: Path) -> dict[str, Any]:
    split = demo.load_split()
    harness.say(f"training the demo's teacher ({demo.TEACHER_ARCH}, {demo.TEACHER_EPOCHS} epochs)")
    teacher = demo.train_teacher(split["x_train"], split["y_train"])
    eval_npz = root / "test.npz"
    np.savez(eval_npz, inputs=split["x_test"], labels=split["y_test"])
    caches = {"plain": (None, 1)} | {f"views-{v}": (args.policy, v) for v in args.views}
    filled = {name: fill(root / name, teacher, split, policy, v) for name, (policy, v) in caches.items()}
    arms: dict[str, dict[str, Any]] = {}

    def arm(name: str, run: Any, cache: str | None) -> None:
        runs = []
        for seed in range(args.seeds):
            harness.say(f"{name}, seed {seed}")
            runs.append(run(seed))
        accuracies = [r["accuracy"] for r in runs]
        arms[name] = {
            "accuracies": accuracies, "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seconds": statistics.fmean(r["seconds"] for r in runs),
            "bytes_per_sample": filled[cache]["bytes_per_sample"] if cache else None,
            "fill_s": filled[cache]["fill_s"] if cache else None,
        }  # fmt: skip

    arm("labels only", lambda s: offline(root / "plain", eval_npz, root / f"run-labels-{s}", s, args.epochs, 0.0), "plain")
    arm("labels + augmentation", lambda s: online(None, split, args.policy, s, args.epochs, 0.0), None)
    arm("distilled, plain cache (1 view, no augmentation)", lambda s: offline(root / "plain", eval_npz, root / f"run-plain-{s}", s, args.epochs, RECIPE["alpha"]), "plain")  # fmt: skip
    for v in args.views:
        arm(f"distilled, {v} views", lambda s, v=v: offline(root / f"views-{v}", eval_npz, root / f"run-{v}-{s}", s, args.epochs, RECIPE["alpha"]), f"views-{v}")  # fmt: skip
    arm("online KD, same policy", lambda s: online(teacher, split, args.policy, s, args.epochs, RECIPE["alpha"]), None)
    full = arms.get(f"distilled, {args.epochs} views")
    gap = None if full is None else full["mean"] - arms["online KD, same policy"]["mean"]
    return {"arms": arms, "offline_E_minus_online": gap, "target_met": harness.met("views_offline_minus_online", gap)}


# ---------------------------------------------------------------------------------------------
# 2 and 3. Speed


def rate(run: Any, repeats: int) -> list[float]:
    """Items per second of ``run()`` (which returns the items it did), ``repeats`` timings after one untimed call."""
    run()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        items = run()
        out.append(items / (time.perf_counter() - started))
    return out


def paired(sides: dict[str, Any], rounds: int, repeats: int) -> tuple[float, float, float, list[float]]:
    """The two sides' median rates and the median of the per-round ratios (first side ÷ second):
    each round runs both sides back to back (ABBA), so a drift of the machine, which moves this
    VM's rates by 10–30% within minutes, cancels within a round rather than between the sides."""
    first, second = sides
    timed = harness.alternate(list(sides), rounds, lambda kind: {"rate": statistics.median(rate(sides[kind], repeats))})
    per_round = [a["rate"] / b["rate"] for a, b in zip(timed[first], timed[second], strict=True)]
    medians = [statistics.median(r["rate"] for r in timed[kind]) for kind in (first, second)]
    return medians[0], medians[1], statistics.median(per_round), per_round


def serving(args: Any, root: Path) -> dict[str, Any]:
    """teacher.forward on B samples × V views made on the device ÷ on V·B ready inputs."""
    harness.write_teacher(root / "teacher.pt", "resnet", (3, 32, 32), 10)
    plain = load_teacher([str(root / "teacher.pt")], device="cpu")
    viewed = load_teacher([str(root / "teacher.pt")], device="cpu")
    viewed.serve_views(args.serve_views, parse_policy("random-crop:4"))
    batch = 256 // args.serve_views
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
    ready = rng.integers(0, 256, (batch * args.serve_views, 3, 32, 32), dtype=np.uint8)
    seeds = view_seeds(0, [str(i) for i in range(batch)], args.serve_views)
    sides = {"views": lambda: len(viewed.forward(samples, seeds)) * args.serve_views, "raw": lambda: len(plain.forward(ready))}
    views_rate, raw_rate, ratio, per_round = paired(sides, args.rounds, 3)
    return {
        "views_per_s": views_rate,
        "raw_per_s": raw_rate,
        "ratio": ratio,
        "ratio_per_round": per_round,
        "views": args.serve_views,
        "batch": batch,
    }


def training(args: Any, root: Path) -> dict[str, Any]:
    """train_step's steps/s on views replayed from a cache ÷ on the policy applied to in-memory tensors."""
    n, views, policy = args.train_samples, 8, parse_policy("random-crop:4")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    meta = CacheMeta("0" * 64, "t", 10, (3, 32, 32), "uint8", Preprocessing(scale=1 / 255), views_per_id=views, augment=policy.describe())
    with CacheWriter(root / "train-cache", meta) as writer:
        writer.append(np.arange(n), x, rng.normal(size=(n, views, 10)).astype(np.float32), rng.integers(0, 10, n))
    reader = CacheReader(root / "train-cache")
    stream = ShardStream.from_readers([reader], reader.meta, batch_size=256, seed=0)
    plain_meta = CacheMeta("0" * 64, "t", 10, (3, 32, 32), "uint8", Preprocessing(scale=1 / 255))
    memory = {"inputs": torch.from_numpy(x), "labels": torch.from_numpy(rng.integers(0, 10, n)), "logits": torch.randn(n, 10)}
    cpu, objective = torch.device("cpu"), Objective(4.0, 0.9)
    torch.manual_seed(0)
    model = models.build("cnn-small", (3, 32, 32), 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    epoch = [0]

    def replayed() -> int:
        stream.set_epoch(epoch[0])
        epoch[0] += 1
        steps = 0
        for batch in stream:
            train_step(model, optimizer, batch, meta=reader.meta, objective=objective, device=cpu, stats=EpochStats(cpu))
            steps += 1
        return steps

    def in_memory() -> int:
        steps = 0
        for index in torch.randperm(n).split(256):
            seeds = torch.randint(0, 1 << 62, (len(index),))
            batch = {"inputs": policy(memory["inputs"][index], seeds), "labels": memory["labels"][index], "logits": memory["logits"][index]}
            train_step(model, optimizer, batch, meta=plain_meta, objective=objective, device=cpu, stats=EpochStats(cpu))
            steps += 1
        return steps

    replayed_rate, memory_rate, ratio, per_round = paired({"replayed": replayed, "in-memory": in_memory}, args.rounds, 1)
    return {"replayed_steps_per_s": replayed_rate, "in_memory_steps_per_s": memory_rate, "ratio": ratio, "ratio_per_round": per_round}


# ---------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> None:
    harness.print_header(
        "Augmented views: offline from a cache of views against online KD", result["env"], f"policy     {result['policy']}"
    )
    acc = result["accuracy"]
    print(f"\nAccuracy on the digits test split, {result['seeds']} seeds, {result['epochs']} epochs, {RECIPE}")
    harness.table(
        [("arm", ""), ("mean", ".4f"), ("std", ".4f"), ("bytes/sample", ",.0f"), ("fill s", ".1f"), ("train s", ".1f")],
        [(name, a["mean"], a["std"], a["bytes_per_sample"], a["fill_s"], a["seconds"]) for name, a in acc["arms"].items()],
    )
    gap = acc["offline_E_minus_online"]
    if gap is not None:
        print(
            f"offline from {result['epochs']} views - online KD: {gap * 100:+.2f} points (target >= -0.3): {harness.YES[acc['target_met']]}"
        )
    s, t = result["serving"], result["training"]
    print(f"\nServing: {s['views']} views of {s['batch']} samples made on the device, {s['views_per_s']:,.0f} views/s ÷ raw forward "
          f"{s['raw_per_s']:,.0f} inputs/s = {s['ratio']:.2f} (target {harness.target('views_serving_vs_raw')}): "
          f"{harness.YES[harness.met('views_serving_vs_raw', s['ratio'])]}")  # fmt: skip
    print(f"Training: replayed views {t['replayed_steps_per_s']:.2f} steps/s ÷ in-memory augmentation {t['in_memory_steps_per_s']:.2f} "
          f"= {t['ratio']:.2f} (target {harness.target('views_training_vs_memory')}): "
          f"{harness.YES[harness.met('views_training_vs_memory', t['ratio'])]}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="caches and runs")
    p.add_argument("--quick", action="store_true", help="1 seed, fewer epochs and views")
    p.add_argument("--policy", default="random-crop:1", help="the views' policy (1-pixel shifts of the 8×8 digits)")
    p.add_argument("--views", type=int, nargs="+", default=None, help="V of each cache of views (default: 1 4 16 and the epochs)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="ABBA rounds of each speed measurement")
    p.add_argument("--serve-views", type=int, default=8, help="views per sample in the serving measurement (256 inputs per forward)")
    p.add_argument("--train-samples", type=int, default=None)
    args = harness.parse(p, argv, quick={"epochs": 6, "seeds": 1, "rounds": 2, "train_samples": 1024},
                         full={"epochs": 30, "seeds": 3, "rounds": 10, "train_samples": 4096})  # fmt: skip
    args.views = args.views or sorted({1, 4, 16, args.epochs} if not args.quick else {1, args.epochs})
    tune_malloc()  # as offline-distill and teacher-serve do: measure what ships
    with harness.workdir("bench-views-", args.tmpdir, args.keep) as root:
        result = {
            "env": harness.environment(), "policy": args.policy, "epochs": args.epochs, "seeds": args.seeds, "recipe": RECIPE,
            "accuracy": accuracy(args, root), "serving": serving(args, root), "training": training(args, root),
        }  # fmt: skip
    harness.emit(result, args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
