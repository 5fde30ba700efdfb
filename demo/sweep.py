"""``python -m kdcache.demo.sweep``: how the defaults of ``distill-demo`` were chosen, on validation only.

A validation split is carved out of the demo's train split (stratified, fixed seed); the test
split is never loaded. A teacher (the demo's) is trained on the rest of the train split, its
logits are written to one cache per transfer fraction with ``CacheWriter``, and students are
trained in this process with ``offline.train.train`` (the loop behind ``offline-distill``; the
demo itself runs the real service and CLIs, which this sweep skips only to fit its many runs
into minutes). Every distilled setting is compared with the labels-only student (alpha 0) of the
same student, fraction, epochs and seeds. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import digits as demo

VALIDATION_SEED = 1
VALIDATION_FRACTION = 0.25


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kdcache.demo.sweep", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--students", nargs="+", default=["mlp-small", "cnn-small"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.1, 1.0])
    p.add_argument("--temperatures", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.9])
    p.add_argument("--epochs", nargs="+", type=int, default=[demo.EPOCHS])
    p.add_argument("--lrs", nargs="+", type=float, default=[demo.LR])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=demo.TEACHER_EPOCHS)
    return p.parse_args(argv)


def validation_split() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    split = demo.load_split()  # only its train half is used below
    x_fit, x_val, y_fit, y_val = train_test_split(
        split["x_train"], split["y_train"], test_size=VALIDATION_FRACTION, random_state=VALIDATION_SEED, stratify=split["y_train"]
    )
    return {"x_fit": x_fit, "y_fit": y_fit, "x_val": x_val, "y_val": y_val}


def write_cache(directory: Path, x: np.ndarray, logits: np.ndarray, labels: np.ndarray, fingerprint: str) -> Path:
    from ..offline.cache import CacheMeta, CacheWriter, Preprocessing

    meta = CacheMeta(
        teacher_fingerprint=fingerprint, teacher_name=demo.TEACHER_ARCH, num_classes=logits.shape[1], input_shape=x.shape[1:],
        input_dtype=x.dtype.name, preprocessing=Preprocessing(scale=demo.INPUT_SCALE), serving_temperature=1.0,
    )  # fmt: skip
    with CacheWriter(directory, meta) as writer:
        writer.append(np.arange(len(x)), x, logits, labels)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from ..offline.models import weights_fingerprint
    from ..offline.train import TrainConfig, train

    args = parse_args(argv)
    # Tiny models: one thread avoids OpenMP spin-waiting, several times faster on a shared 2-core machine.
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = validation_split()
    teacher = demo.train_teacher(data["x_fit"], data["y_fit"], demo.TEACHER_ARCH, args.teacher_epochs)
    logits = demo.teacher_logits(teacher, data["x_fit"])
    teacher_val = float((demo.teacher_logits(teacher, data["x_val"]).argmax(1) == data["y_val"]).mean())
    fingerprint = weights_fingerprint(teacher.state_dict())
    print(
        f"# fit {len(data['y_fit'])}, validation {len(data['y_val'])} (from the train split, seed {VALIDATION_SEED}); "
        f"teacher {demo.TEACHER_ARCH} {args.teacher_epochs} epochs: validation accuracy {teacher_val:.4f}",
        flush=True,
    )

    def val_accuracies(cache: Path, student: str, epochs: int, lr: float, temperature: float, alpha: float, root: Path) -> list[float]:
        accuracies = []
        for seed in range(args.seeds):
            config = TrainConfig(
                caches=[str(cache)], student=student, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha, seed=seed,
                eval_path=str(root / "val.npz"), out=str(root / f"run-{time.perf_counter_ns()}"), device="cpu", progress=False, export=False,
            )  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                accuracies.append(train(config)["eval_accuracy"])
        return accuracies

    header = f"{'student':<10} {'labels':>6} {'epochs':>6} {'lr':>6} {'T':>4} {'alpha':>5}  {'val acc':>15}  {'vs labels only':>14}"
    print(header)
    print("-" * len(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="kd-sweep-") as tmp:
        root = Path(tmp)
        np.savez(root / "val.npz", inputs=data["x_val"], labels=data["y_val"])
        caches = {
            fraction: write_cache(root / f"cache-{fraction}", data["x_fit"], logits, demo.keep_labels(data["y_fit"], fraction), fingerprint)
            for fraction in args.fractions
        }
        for student, fraction, epochs, lr in itertools.product(args.students, args.fractions, args.epochs, args.lrs):
            baseline, base_std = demo.mean_std(val_accuracies(caches[fraction], student, epochs, lr, 1.0, 0.0, root))
            print(
                f"{student:<10} {fraction:>6.0%} {epochs:>6} {lr:>6g} {'-':>4} {0:>5g}  {baseline:>8.4f} ± {base_std:.4f}  {'':>14}",
                flush=True,
            )
            for temperature, alpha in itertools.product(args.temperatures, args.alphas):
                mean, std = demo.mean_std(val_accuracies(caches[fraction], student, epochs, lr, temperature, alpha, root))
                print(
                    f"{student:<10} {fraction:>6.0%} {epochs:>6} {lr:>6g} {temperature:>4g} {alpha:>5g}  {mean:>8.4f} ± {std:.4f}  {mean - baseline:>+14.4f}",
                    flush=True,
                )
    print(f"# {args.seeds} seeds per row; {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
