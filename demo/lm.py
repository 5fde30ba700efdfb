"""``distill-demo --task lm``: the product's whole job on a language model, on the CPU.

1. load a real text corpus that every machine with Python has (``python-stdlib``: the standard
   library's own source, split by file; see demo/corpora.py), train a byte-level BPE tokenizer on
   its train split, and pack both splits into sequences of ``SEQ_LEN`` tokens: the first
   ``TRANSFER_SEQUENCES`` of the train split are the transfer set (``train.npz``), the test split's
   are ``eval.npz`` (held-out files);
2. train a ``transformers`` GPT-2 teacher on the whole train split (about 4 times the transfer
   set's text: the teacher knows more than the transfer set holds, distillation's usual setting)
   for a fixed number of AdamW steps and ``save_pretrained`` it with its tokenizer;
3. start ``teacher-serve --teacher hf:DIR --targets topk:16 --temperature 1 --logits-dtype float16``, ``teacher-push`` the transfer set,
   stop the server (SIGTERM);
4. ``offline-distill --task lm`` a small GPT student from the cache per seed, distilled and on the
   tokens alone (``--alpha 0``, the same recipe: offline-distill's, but ``STUDENT_EPOCHS`` epochs
   so that the demo fits in 10 minutes on 2 cores), each evaluated on ``eval.npz``;
5. print a table (perplexities, the cache's bytes per token) and write ``summary.json``.

Every tool runs as its own process, as a user would run it (the helpers of demo/digits.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..offline.cli_help import HelpFormatter
from . import corpora
from .digits import PROG, StepError, Steps, TeacherServer, last_line, mean_std, run_tool

CORPUS = "python-stdlib"
SEQ_LEN = 128
EVAL_SEQUENCES = 256  # held-out sequences the perplexities are measured on (32,768 tokens)
TARGETS = "topk:16"  # what teacher-serve caches per token
# teacher-serve --temperature: the soft targets' T, which offline-distill trains at (a top-k cache holds
# that T only). 1, not the service's default 4: in this demo's setting (seed 0, teacher 143.5), the
# cross-entropy-only student reached eval perplexity 235.1, distilled at T=4 234.8, at T=1 206.0.
TEMPERATURE = 1.0
STUDENT = "gpt:layers=2,dim=128,heads=4"  # about 0.9 M parameters with the 4,096-token vocabulary
TEACHER = {"n_layer": 4, "n_embd": 256, "n_head": 4}  # about 4.2 M parameters
TEACHER_STEPS = 340  # about 3 minutes on 2 CPU cores
TEACHER_BATCH = 16
TEACHER_LR = 1e-3  # 143.7 eval perplexity at 340 steps, against 145.4 at 2e-3 and much worse at 3e-3 with batch 8
TEACHER_WARMUP = 20
SEEDS = 1
# The students' share: 1,024 x 128 tokens (131,072, a quarter of the teacher's training tokens),
# 6 epochs at offline-distill's batch of 32 (192 steps, 786,432 tokens a student): its recipe's
# 1,000 steps would take each student about 5 times as long as the demo allows.
TRANSFER_SEQUENCES = 1024
STUDENT_EPOCHS = 6
ARMS = {"distilled": "distilled", "ce": "cross-entropy only (alpha 0)"}


# ---------------------------------------------------------------------------------------------
# Teacher


def build_teacher(vocab_size: int, seq_len: int = SEQ_LEN, eos_id: int = 0, **sizes: int):
    """A GPT-2 ``transformers`` model without dropout (a few minutes of training does not overfit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, **{**TEACHER, **sizes}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train_lm(
    model, input_ids: np.ndarray, steps: int, batch: int = TEACHER_BATCH, lr: float = TEACHER_LR, seed: int = 0, device: str = "cpu"
):
    """Next-token cross-entropy with AdamW (betas 0.9/0.98, weight decay 0.01, gradients clipped
    at 1), ``TEACHER_WARMUP`` linear warm-up steps then a cosine to 0, shuffled batches of rows.
    Returns the model in eval mode, on ``device``."""
    import torch

    torch.manual_seed(seed)
    model.to(device)
    data = torch.from_numpy(input_ids).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(TEACHER_WARMUP, steps)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(data), generator=generator), 0
    model.train()
    for _ in range(steps):
        if position + batch > len(order):
            order, position = torch.randperm(len(data), generator=generator), 0
        rows = data[order[position : position + batch].to(device)]
        position += batch
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval()


def perplexity(model, input_ids: np.ndarray, batch: int = 64) -> float:
    """exp of the mean next-token cross-entropy over every predicted position (``L - 1`` per row)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for rows in torch.from_numpy(input_ids).to(device).split(batch):
            logits = model(input_ids=rows).logits[:, :-1].float()
            targets = rows[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(total / max(count, 1))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The demo


def lm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} --task lm",
        description="Train a GPT-2 teacher on the Python standard library's source, serve it, push the token transfer set, "
        "distil a small GPT student from the cache with and without the teacher's top-k targets, and compare held-out perplexities.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--task", choices=("lm",), default="lm", help="the demo: this one (distill-demo --task digits is the other)")
    p.add_argument("--out", default="demo-lm-out", metavar="DIR", help="where the teacher, token files, cache, runs and summary.json go")
    p.add_argument("--json", action="store_true", help="print only the summary JSON on stdout")
    p.add_argument("--corpus", choices=corpora.CORPORA, default=CORPUS, help="the text: Python source, or the Python docs' English prose")
    p.add_argument("--train-bytes", type=int, default=corpora.TRAIN_BYTES, help="train text budget in bytes (the teacher's training text)")
    p.add_argument(
        "--transfer-sequences",
        type=int,
        default=TRANSFER_SEQUENCES,
        help=f"the transfer set: the train split's first N {SEQ_LEN}-token sequences",
    )
    p.add_argument("--seeds", type=int, default=SEEDS, help="student seeds per arm")
    p.add_argument("--student", default=STUDENT, help="offline-distill --student for both arms")
    p.add_argument(
        "--epochs", type=int, default=STUDENT_EPOCHS, help="student epochs over the transfer set, 0 for offline-distill's recipe"
    )
    p.add_argument("--lr", type=float, help="student learning rate (default: offline-distill's recipe)")
    p.add_argument("--batch-size", type=int, help="student batch size (default: offline-distill's recipe)")
    p.add_argument("--alpha", type=float, help="weight of the soft term in the distilled arm (default: offline-distill's recipe)")
    p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS, help=f"AdamW steps of the teacher's training, batch {TEACHER_BATCH}")
    p.add_argument("--targets", default=TARGETS, help="what teacher-serve caches per token (teacher-serve --targets)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="the soft targets' temperature (teacher-serve --temperature)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the teacher and students run (auto: cuda when available)"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = lm_parser()
    args = p.parse_args(argv)
    problems = []
    if args.seeds < 1:
        problems.append(f"--seeds must be >= 1, got {args.seeds}")
    if args.teacher_steps < 1 or args.epochs < 0 or args.transfer_sequences < 1:
        problems.append(
            f"--teacher-steps and --transfer-sequences must be >= 1 and --epochs >= 0, got {args.teacher_steps}, {args.transfer_sequences} and {args.epochs}"
        )
    if args.train_bytes < 10_000:
        problems.append(f"--train-bytes must be >= 10000, got {args.train_bytes}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if args.alpha is not None and not 0 < args.alpha <= 1:
        problems.append(f"--alpha must lie in (0, 1] (the other arm is alpha 0), got {args.alpha}")
    if problems:
        p.error("; ".join(problems))
    return args


def prepare_out(out: Path) -> dict[str, Path]:
    """The demo's paths under ``out``; what an earlier run left there is removed first."""
    names = {"teacher": "teacher", "train": "train.npz", "eval": "eval.npz", "cache": "cache", "runs": "runs", "logs": "logs",
             "summary": "summary.json"}  # fmt: skip
    paths = {key: out / name for key, name in names.items()}
    for path in paths.values():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for key in ("teacher", "runs", "logs"):
        paths[key].mkdir(parents=True)
    return paths


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def data_step(args: argparse.Namespace, paths: dict[str, Path], state: dict[str, Any]) -> str:
    train_texts, test_texts = corpora.load_corpus(args.corpus, train_bytes=args.train_bytes)
    tokenizer = corpora.train_tokenizer(train_texts)
    corpora.save_tokenizer(tokenizer, paths["teacher"])
    train, evaluation = corpora.pack(tokenizer, train_texts, SEQ_LEN), corpora.pack(tokenizer, test_texts, SEQ_LEN, EVAL_SEQUENCES)
    if len(train) == 0 or len(evaluation) == 0:
        raise StepError("data", f"too little text for {SEQ_LEN}-token sequences: {len(train)} train, {len(evaluation)} eval")
    transfer = train[: args.transfer_sequences]
    np.savez(paths["train"], input_ids=transfer)
    np.savez(paths["eval"], input_ids=evaluation)
    train_bytes = sum(len(text.encode("utf-8")) for text in train_texts)
    state.update(
        train=train, transfer=transfer, eval=evaluation, vocab_size=tokenizer.get_vocab_size(), eos_id=tokenizer.token_to_id(corpora.EOS)
    )
    state["data"] = {
        "corpus": args.corpus, "train_documents": len(train_texts), "test_documents": len(test_texts), "train_bytes": train_bytes,
        "vocab_size": state["vocab_size"], "seq_len": SEQ_LEN, "train_sequences": len(train), "eval_sequences": len(evaluation),
        "train_tokens": int(train.size), "bytes_per_token": train_bytes / max(train.size, 1), "transfer_sequences": len(transfer),
        "transfer_tokens": int(transfer.size),
    }  # fmt: skip
    d = state["data"]
    return (f"{d['train_documents']} train documents ({train_bytes:,} bytes) -> {len(train):,} x {SEQ_LEN} tokens "
            f"({len(transfer):,} of them the transfer set), {len(evaluation)} eval sequences, vocabulary {d['vocab_size']:,}")  # fmt: skip


def teacher_step(args: argparse.Namespace, paths: dict[str, Path], state: dict[str, Any]) -> str:
    model = build_teacher(state["vocab_size"], SEQ_LEN, state["eos_id"])
    train_lm(model, state["train"], args.teacher_steps, device=args.device)
    model.save_pretrained(str(paths["teacher"]))
    ppl = perplexity(model, state["eval"])
    state["teacher"] = {**TEACHER, "params": count_parameters(model), "steps": args.teacher_steps, "batch": TEACHER_BATCH,
                        "lr": TEACHER_LR, "eval_perplexity": ppl}  # fmt: skip
    return f"GPT-2 {TEACHER['n_layer']} layers x {TEACHER['n_embd']}, {state['teacher']['params']:,} parameters, eval perplexity {ppl:.2f}"


def cache_step(args: argparse.Namespace, paths: dict[str, Path], steps: Steps) -> None:
    """teacher-serve on the saved teacher, teacher-push of train.npz, SIGTERM."""
    serve_args = ["--teacher", f"hf:{paths['teacher']}", "--targets", args.targets, "--cache", str(paths["cache"]),
                  "--input-shape", str(SEQ_LEN), "--temperature", str(args.temperature), "--logits-dtype", "float16",
                  "--device", args.device]  # fmt: skip
    server = TeacherServer(serve_args, paths["logs"] / "teacher-serve.log")
    try:
        steps.run("serve", f"starting teacher-serve on {server.url}", lambda: server.wait_ready() and "ready")

        def push() -> str:
            log = paths["logs"] / "teacher-push.log"
            run_tool("push", "teacher-push", ["--url", server.url, "--data", str(paths["train"]), "--no-progress"], log)
            return last_line(log).removeprefix("teacher-push: ")

        steps.run("push", "teacher-push: the token transfer set over HTTP", push)

        def stop() -> str:
            code = server.stop()
            if code != 0:
                raise StepError("stop", f"teacher-serve exited with {code} on SIGTERM, expected 0 (log: {server.log_path})")
            return "exit status 0, shard published"

        steps.run("stop", "stopping teacher-serve (SIGTERM)", stop)
    finally:
        server.stop()  # a no-op once stopped; after a failed step, the server must not outlive the demo


def distill_run(args: argparse.Namespace, paths: dict[str, Path], key: str, seed: int) -> dict[str, Any]:
    """One ``offline-distill --task lm`` run; its metrics.json."""
    run_dir = paths["runs"] / f"{key}-s{seed}"
    given = {
        "--epochs": args.epochs or None,
        "--lr": args.lr,
        "--batch-size": args.batch_size,
        "--alpha": 0.0 if key == "ce" else args.alpha,
    }
    command = [
        "--task", "lm", "--cache", str(paths["cache"]), "--student", args.student, "--eval", str(paths["eval"]), "--out", str(run_dir),
        "--seed", str(seed), "--device", args.device, "--no-progress", "--no-export",
        *(word for flag, value in given.items() if value is not None for word in (flag, str(value))),
    ]  # fmt: skip
    run_tool(f"distill {key} seed {seed}", "offline-distill", command, paths["logs"] / f"offline-distill-{key}-s{seed}.log")
    return json.loads((run_dir / "metrics.json").read_text())


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    try:
        paths = prepare_out(out)
    except OSError as exc:
        raise StepError("prepare", f"cannot use --out {out}: {exc}") from None
    steps, state = Steps(), {}
    steps.run("data", f"{args.corpus}: tokenizer and {SEQ_LEN}-token sequences", lambda: data_step(args, paths, state))
    steps.run("teacher", f"training the teacher ({args.teacher_steps} steps on the CPU)", lambda: teacher_step(args, paths, state))
    cache_step(args, paths, steps)
    tokens = int(state["transfer"].size)
    cache_bytes = directory_bytes(paths["cache"])
    cache = {"targets": args.targets, "bytes": cache_bytes, "tokens": tokens, "bytes_per_token": cache_bytes / tokens,
             "full_float32_bytes_per_token": 4 * state["vocab_size"]}  # fmt: skip
    arms: dict[str, dict[str, Any]] = {key: {"alpha": 0.0 if key == "ce" else args.alpha, "perplexities": []} for key in ARMS}
    recipe: dict[str, Any] = {}

    def distill(key: str, seed: int) -> str:
        metrics = distill_run(args, paths, key, seed)
        ppl = float(metrics["eval_perplexity"])
        arms[key]["perplexities"].append(ppl)
        if key == "distilled":
            recipe.update({name: metrics.get(name) for name in ("epochs", "steps", "lr", "batch_size", "schedule", "alpha", "temperature")})
        return f"eval perplexity {ppl:.2f}"

    # The students are small: OMP_NUM_THREADS is the user's, else torch's default (every core).
    for seed in range(args.seeds):
        for key in ARMS:
            steps.run(f"distill {key}", f"offline-distill {args.student}, {ARMS[key]}, seed {seed}", functools.partial(distill, key, seed))
    for arm in arms.values():
        arm["mean"], arm["std"] = mean_std(arm["perplexities"])
    summary = {
        "settings": {"student": args.student, "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "alpha": args.alpha, "targets": args.targets, "temperature": args.temperature, "device": args.device, "recipe": recipe},
        "data": state["data"], "teacher": state["teacher"], "cache": cache, "arms": arms,
        "gain": arms["ce"]["mean"] - arms["distilled"]["mean"],
        "seconds": steps.seconds,
        "files": {"summary": str(paths["summary"]), "teacher": str(paths["teacher"]), "cache": str(paths["cache"]), "runs": str(paths["runs"])},
    }  # fmt: skip
    paths["summary"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    s, d, t, cache, arms = summary["settings"], summary["data"], summary["teacher"], summary["cache"], summary["arms"]

    def student(key: str) -> str:
        arm = arms[key]
        runs = ", ".join(f"{p:.2f}" for p in arm["perplexities"])
        return f"{s['student']}, eval perplexity {arm['mean']:.2f} ± {arm['std']:.2f}  ({runs})"

    rows = [
        ("teacher", f"GPT-2 {t['n_layer']}x{t['n_embd']}, {t['params']:,} parameters, {t['steps']} steps, eval perplexity {t['eval_perplexity']:.2f}"),
        *((f"student, {ARMS[key]}", student(key)) for key in ARMS),
        ("perplexity gain", f"{summary['gain']:+.2f} (cross-entropy only minus distilled)"),
        ("data", f"{d['corpus']}: {d['train_tokens']:,} train tokens ({d['bytes_per_token']:.2f} bytes/token), of which "
                 f"{d['transfer_tokens']:,} the transfer set; {d['eval_sequences']} x {d['seq_len']} eval tokens; vocabulary {d['vocab_size']:,}"),
        ("cache", f"{cache['targets']}, {cache['bytes']:,} bytes on disk, {cache['bytes_per_token']:.1f} bytes/token "
                  f"(full float32 logits: {cache['full_float32_bytes_per_token']:,})"),
        ("settings", f"T={s['temperature']:g}, seeds={s['seeds']}, device={s['device']}; students' recipe (offline-distill's, from the "
                     "distilled run): " + ", ".join(f"{k}={v}" for k, v in s["recipe"].items())),
        *((f"time: {name}", f"{value:.1f} s") for name, value in summary["seconds"].items()),
        ("time: total", f"{sum(summary['seconds'].values()):.1f} s"),
        ("wrote", summary["files"]["summary"]),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
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
