"""How the defaults of ``offline-distill --task lm`` (offline/lm/defaults.py) were chosen: a small
sweep on a validation split of the transfer set, never on an eval or test split.

Setup (the demo's, ``distill-demo --task lm``, scaled down to fit 2 CPU cores): the
``python-stdlib`` corpus's train documents (demo/corpora.py; its test split is never read), in a
seeded order, cut into validation documents (``--validation-bytes``), the transfer set's
(``--transfer-bytes``) and the rest, which only the teacher trains on: a real teacher knows more
than the transfer set holds, and the validation documents are held out of both. A byte-level BPE
tokenizer, sequences of ``--seq-len`` tokens, a GPT-2 teacher (demo/lm.py's ``build_teacher`` and
``train_lm``), and its top-16 targets over the transfer set in a cache written with
``CacheWriter`` (what ``teacher-serve --targets topk:16`` stores). Each run is ``offline-distill
--task lm`` (in this process) of the default student on that cache, ``--eval`` the validation
set; a stage varies one setting around the best so far: alpha, then lr, then the batch size at a
fixed number of tokens, then the steps.

    .venv/bin/python -m bench.lm_sweep --out /tmp/lm-sweep
    .venv/bin/python -m bench.lm_sweep --out /tmp/lm-temperature --temperatures 0.5 1 2 4 --steps 800

About an hour on 2 CPU cores shared with other work (the teacher about 15 minutes; a run of 400
steps 0.5 to 5 minutes); the figures that chose the defaults are in offline/lm/defaults.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.offline.lm.defaults import DEFAULT_STUDENT, LM_RULE

TARGETS = "topk:16"
VALIDATION_SHARE = 0.1


def split_documents(texts: list[str], transfer_bytes: int, validation_bytes: int) -> tuple[list[str], list[str], list[str]]:
    """The corpus's train documents in a seeded order, cut into the validation documents, the
    transfer set's and the rest (which only the teacher trains on), by their bytes."""
    order = np.random.default_rng(0).permutation(len(texts))
    parts: tuple[list[str], list[str], list[str]] = ([], [], [])
    budgets = [validation_bytes, transfer_bytes]
    for index in order:
        text = texts[index]
        side = next((i for i, left in enumerate(budgets) if left > 0), 2)
        parts[side].append(text)
        if side < 2:
            budgets[side] -= len(text.encode("utf-8"))
    return parts


def prepare(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The token files, the teacher and its cache under ``out``. The teacher trains on the
    transfer set and more text of its own (as a real teacher knows more than the transfer set
    holds); the validation documents are held out of both."""
    import torch

    from kdcache.demo import corpora
    from kdcache.demo.lm import build_teacher, perplexity, train_lm
    from kdcache.offline.cache import CacheMeta, CacheWriter

    texts, _ = corpora.load_corpus("python-stdlib", train_bytes=args.teacher_bytes)  # the corpus's test split is never read here
    validation_texts, transfer_texts, extra_texts = split_documents(texts, args.transfer_bytes, args.validation_bytes)
    tokenizer = corpora.train_tokenizer(transfer_texts + extra_texts, vocab_size=args.vocab)
    validation, transfer = (corpora.pack(tokenizer, part, args.seq_len) for part in (validation_texts, transfer_texts))
    teacher_rows = np.concatenate([transfer, corpora.pack(tokenizer, extra_texts, args.seq_len)])
    np.savez(out / "validation.npz", input_ids=validation)
    torch.manual_seed(0)
    teacher = build_teacher(tokenizer.get_vocab_size(), args.seq_len, tokenizer.token_to_id(corpora.EOS))
    teacher = train_lm(teacher, teacher_rows, args.teacher_steps)
    # One cache per serving temperature (--temperatures; the sweep's own at T = 1): the same
    # teacher logits, encoded at each T as teacher-serve --temperature T would store them.
    writers = {
        t: CacheWriter(
            out / cache_name(t),
            CacheMeta("0" * 64, "gpt2-sweep-teacher", tokenizer.get_vocab_size(), (args.seq_len,), "int64", logits_layout=TARGETS,
                      task="lm", serving_temperature=t),
        )
        for t in args.temperatures or [1.0]
    }  # fmt: skip
    with torch.no_grad():
        for start in range(0, len(transfer), 64):
            batch = transfer[start : start + 64]
            logits = teacher(input_ids=torch.from_numpy(batch)).logits.float().numpy()
            for writer in writers.values():
                writer.append([f"r{start + i}" for i in range(len(batch))], batch, logits, lengths=np.full(len(batch), args.seq_len))
    for writer in writers.values():
        writer.close()
    return {
        "vocab": tokenizer.get_vocab_size(), "transfer_sequences": len(transfer), "validation_sequences": len(validation),
        "teacher_sequences": len(teacher_rows), "teacher_validation_perplexity": perplexity(teacher, validation),
    }  # fmt: skip


def cache_name(temperature: float) -> str:
    return "cache" if temperature == 1.0 else f"cache-t{temperature:g}"


def distill(
    out: Path, name: str, *, alpha: float, lr: float, batch: int, steps: int, student: str, temperature: float = 1.0
) -> dict[str, Any]:
    from kdcache.offline.cli import distill_main

    run = out / "runs" / name
    argv = [
        "--task", "lm", "--cache", str(out / cache_name(temperature)), "--student", student, "--eval", str(out / "validation.npz"),
        "--out", str(run), "--alpha", str(alpha), "--lr", str(lr), "--batch-size", str(batch), "--epochs", "1000",
        "--max-steps", str(steps), "--device", "cpu", "--no-progress", "--seed", "0",
    ]  # fmt: skip
    log = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(log):
        code = distill_main(argv)
    if code:
        raise SystemExit(f"offline-distill {' '.join(argv)} failed ({code}):\n{log.getvalue()}")
    metrics = json.loads((run / "metrics.json").read_text())
    result = {"name": name, "alpha": alpha, "lr": lr, "batch_size": batch, "steps": steps, "temperature": temperature,
              "seconds": time.perf_counter() - started, "validation_perplexity": metrics["eval_perplexity"]}  # fmt: skip
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def sweep(out: Path, student: str, steps: int) -> list[dict[str, Any]]:
    """One setting at a time around the best so far: alpha, lr, batch size (same tokens), steps."""
    results: list[dict[str, Any]] = []

    def best(stage: list[dict[str, Any]]) -> dict[str, Any]:
        return min(stage, key=lambda r: r["validation_perplexity"])

    center = {"alpha": 0.5, "lr": 3e-3, "batch": 32, "steps": steps}

    def stage(key: str, values: list[Any], label: str) -> None:
        runs = []
        for value in values:
            setting = {**center, key: value}
            if key == "batch":  # the same tokens: steps scale inversely
                setting["steps"] = center["steps"] * center["batch"] // value
            name = f"{label}-{value}"
            known = [r for r in results if (r["alpha"], r["lr"], r["batch_size"], r["steps"]) == tuple(setting.values())]
            runs.append(known[0] if known else distill(out, name, alpha=setting["alpha"], lr=setting["lr"], batch=setting["batch"],
                                                       steps=setting["steps"], student=student))  # fmt: skip
        results.extend(r for r in runs if r not in results)
        chosen = best(runs)
        center.update(alpha=chosen["alpha"], lr=chosen["lr"], batch=chosen["batch_size"], steps=chosen["steps"])

    stage("alpha", [0.0, 0.25, 0.5, 0.75, 1.0], "alpha")
    stage("lr", [1e-3, 3e-3, 1e-2], "lr")
    stage("batch", [16, 32, 64], "batch")
    steps_now = center["steps"]
    stage("steps", [steps_now // 2, steps_now, steps_now * 2], "steps")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lm_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="lm-sweep-out", help="work directory (token files, teacher cache, runs)")
    p.add_argument(
        "--teacher-bytes", type=int, default=1_500_000, help="python-stdlib train text: the teacher's, the transfer set's and validation"
    )
    p.add_argument("--transfer-bytes", type=int, default=400_000, help="of which the transfer set (the cache's sequences)")
    p.add_argument("--validation-bytes", type=int, default=60_000, help="of which the validation documents (held out of both)")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--teacher-steps", type=int, default=1500, help="the teacher's AdamW steps (batch 16)")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="the student of every run")
    p.add_argument("--steps", type=int, default=400, help="steps of every run but the last stage's")
    p.add_argument(
        "--temperatures", type=float, nargs="+", default=None, metavar="T",
        help="instead of the sweep: the serving temperature, one cache per T, each distilled at the defaults (LM_RULE) for --steps",
    )  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    data = prepare(out, args)
    print(json.dumps(data), file=sys.stderr, flush=True)
    if args.temperatures:
        results = [
            distill(out, f"temperature-{t:g}", alpha=LM_RULE.alpha, lr=LM_RULE.lr, batch=LM_RULE.batch_size, steps=args.steps,
                    student=args.student, temperature=t)
            for t in args.temperatures
        ]  # fmt: skip
    else:
        results = sweep(out, args.student, args.steps)
    summary = {"settings": vars(args), "data": data, "runs": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"teacher validation perplexity {data['teacher_validation_perplexity']:.2f}; {data['transfer_sequences']} transfer sequences, "
          f"{data['validation_sequences']} validation sequences")  # fmt: skip
    for r in results:
        print(f"{r['name']:<16} alpha {r['alpha']:<5} lr {r['lr']:<7g} batch {r['batch_size']:<3} steps {r['steps']:<5} T {r['temperature']:<4g} "
              f"validation perplexity {r['validation_perplexity']:.3f}  ({r['seconds']:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
