"""A user's first hour (issue 19), as processes: a folder of 28×28 PNGs, their own float teacher
exported to ``.pt2``, and the product's commands at their defaults.

1. ``demo.problems``' ``digits-28`` written as image folders (``images/``: the transfer set,
   ``eval/``: its test split); a ``cnn-large`` teacher trained on 0..1 inputs and exported to
   ``teacher.pt2`` with a dynamic batch.
2. ``teacher-serve --teacher teacher.pt2 --cache c/ --input-dtype uint8 --input-scale 1/255``,
   ``teacher-push --data images/``, stop; then ``teacher-serve --teacher teacher.pt2 --cache c/``
   alone, the same push (all hits expected), stop.
3. ``offline-distill --cache c/ --eval eval/`` against the same with ``--alpha 0``, per student
   and seed, every other setting at its default.
4. The same teacher served without ``--input-scale`` into ``c-unscaled/``: what ``cache-inspect
   --json``, ``teacher-serve``'s log and ``offline-distill`` say, and the student it gives.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.demo import digits as demo
from kdcache.demo.problems import make_problem
from kdcache.service.launch import ServeProcess

QUICK = {"seeds": 1, "students": ["mlp"], "scale": 0.25, "teacher_epochs": 3}
FULL = {"seeds": 3, "students": ["mlp", "cnn-small"], "scale": 1.0, "teacher_epochs": 8}
TEACHER_ARCH = "cnn-large"


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    from PIL import Image

    for index, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"digit-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


def export_teacher(model: torch.nn.Module, path: Path) -> Path:
    """The teacher as a user exports it: float32 [B, 1, 28, 28] in 0..1, dynamic batch."""

    class Channel(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x[:, 0])

    program = torch.export.export(Channel(model).eval(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def serve_and_push(root: Path, serve_args: list[str], tag: str) -> dict[str, Any]:
    """One teacher-serve run: start, push images/, stop. Returns the push's summary and the log."""
    server = ServeProcess(serve_args, root / f"serve-{tag}.log")
    try:
        server.wait_ready(300)
        push = harness.tool(
            "teacher-push", "--url", server.url, "--data", str(root / "images"), "--no-progress", log=root / f"push-{tag}.log"
        )
    finally:
        code = server.stop()
    line = push.stdout.strip().splitlines()[-1] if push.stdout.strip() else push.stderr.strip().splitlines()[-1]
    log = (root / f"serve-{tag}.log").read_text()
    return {
        "push": line, "exit": code, "log_warnings": [w for w in log.splitlines() if "warning:" in w],
        "taken_from_cache": [w for w in log.splitlines() if "from the cache" in w],
    }  # fmt: skip


def distil(root: Path, cache: Path, student: str, seed: int, alpha: str | None) -> dict[str, Any]:
    out = root / "runs" / f"{cache.name}-{student}-{seed}-{alpha or 'default'}"
    args = ["--cache", str(cache), "--eval", str(root / "eval"), "--out", str(out), "--student", student, "--seed", str(seed)]
    proc = harness.tool("offline-distill", *args, *(["--alpha", alpha] if alpha else []), "--no-progress", "--no-export")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["eval_accuracy"], "recipe": metrics["recipe"], "warnings": metrics.get("warnings", []),
            "printed_warnings": [w for w in proc.stdout.splitlines() + proc.stderr.splitlines() if w.startswith("warning:")]}  # fmt: skip


def run(args: Any) -> dict[str, Any]:
    torch.set_num_threads(2)
    result: dict[str, Any] = {"environment": harness.environment(), "settings": {k: getattr(args, k) for k in FULL}}
    with harness.workdir("kd-first-hour-", args.tmpdir, args.keep) as root:
        problem = make_problem("digits-28", args.scale)
        x, y = problem.splits["train"]
        write_folder(root / "images", x, y)
        write_folder(root / "eval", *problem.splits["test"])
        harness.say(f"{problem.describe()}; training the teacher")
        teacher = demo.train_teacher(x, y, TEACHER_ARCH, args.teacher_epochs, input_scale=1 / 255)
        test_x, test_y = problem.splits["test"]
        result["teacher_test_accuracy"] = float((demo.teacher_logits(teacher, test_x, 1 / 255).argmax(1) == test_y).mean())
        pt2 = export_teacher(teacher, root / "teacher.pt2")
        cache, unscaled = root / "c", root / "c-unscaled"
        harness.say("serving with --input-scale 1/255, then restarting with --teacher and --cache only")
        result["first"] = serve_and_push(
            root, ["--teacher", str(pt2), "--cache", str(cache), "--input-dtype", "uint8", "--input-scale", "1/255"], "first"
        )
        result["restart"] = serve_and_push(root, ["--teacher", str(pt2), "--cache", str(cache)], "restart")
        harness.say("serving without --input-scale")
        result["unscaled"] = serve_and_push(root, ["--teacher", str(pt2), "--cache", str(unscaled), "--input-dtype", "uint8"], "unscaled")
        for name, directory in (("inspect", cache), ("inspect_unscaled", unscaled)):
            inspect = json.loads(harness.tool("cache-inspect", str(directory), "--json").stdout)
            result[name] = {"soft_targets": inspect.get("soft_targets"), "warnings": inspect.get("warnings"), "samples": inspect["samples"]}
        runs: dict[str, list[dict[str, Any]]] = {}
        for student in args.students:
            for seed in range(args.seeds):
                for arm, directory, alpha in (("distilled", cache, None), ("labels_only", cache, "0"), ("unscaled", unscaled, None)):
                    harness.say(f"offline-distill {student} seed {seed}: {arm}")
                    runs.setdefault(f"{student}/{arm}", []).append(distil(root, directory, student, seed, alpha))
        result["students"] = {
            key: {"mean": float(np.mean([r["accuracy"] for r in rs])), "std": float(np.std([r["accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                  "runs": rs} for key, rs in runs.items()
        }  # fmt: skip
    return result


def report(result: dict[str, Any]) -> None:
    harness.print_header("A user's first hour (issue 19): digits-28 PNG folders, a .pt2 teacher, the defaults", result["environment"])
    print(f"teacher    {TEACHER_ARCH}, test accuracy {result['teacher_test_accuracy']:.4f}")
    for tag in ("first", "restart", "unscaled"):
        print(f"{tag:<10} {result[tag]['push']}")
    print(f"restart    {'; '.join(result['restart']['taken_from_cache']) or '(no line about the cache)'}")
    for name in ("inspect", "inspect_unscaled"):
        st = result[name]["soft_targets"] or {}
        print(f"{name:<16} mean top-1 {st.get('mean_top1', float('nan')):.4f}, warnings {len(result[name]['warnings'] or [])}")
    print(f"serve log warnings (unscaled): {len(result['unscaled']['log_warnings'])}; (scaled): {len(result['first']['log_warnings'])}")
    rows = [(key, value["mean"], value["std"], len(value["runs"])) for key, value in result["students"].items()]
    harness.table([("student/arm", ""), ("test accuracy", ".4f"), ("std", ".4f"), ("seeds", "d")], rows)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the folders, caches and runs")
    p.add_argument("--quick", action="store_true", help="a quarter of the data, one seed, mlp only")
    p.add_argument("--seeds", type=int, help=f"seeds per arm (default {FULL['seeds']}; quick {QUICK['seeds']})")
    p.add_argument("--students", nargs="+", help=f"students (default {' '.join(FULL['students'])})")
    p.add_argument("--scale", type=float, help="share of digits-28's splits to use (default 1)")
    p.add_argument("--teacher-epochs", type=int, help=f"teacher epochs (default {FULL['teacher_epochs']})")
    return harness.timed_main(harness.parse(p, argv, QUICK, FULL), run, report)


if __name__ == "__main__":
    sys.exit(main())
