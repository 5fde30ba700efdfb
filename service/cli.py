"""``teacher-serve``: a thin recipe. It reads the settings, loads the teacher, opens the cache
(refusing one written by another teacher), and runs uvicorn. Known errors end as one line on
stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from ..offline.cache import CacheError
from ..offline.cache.layout import make_layout
from ..offline.malloc import tune_malloc
from .settings import ENV_PREFIX, ServeSettings

PROG = "teacher-serve"
log = logging.getLogger(PROG)


def fail(prog: str, message: str, code: int = 2) -> int:
    """One line on stderr, no traceback: how every known error of the service's CLIs ends."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    print(f"{prog}: error: {lines[-1] if lines else message}", file=sys.stderr)
    return code


def run_cli(prog: str, body: Callable[[], int], known: tuple[type[BaseException], ...]) -> int:
    try:
        return body()
    except known as exc:
        return fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a teacher (or an ensemble) over the Open Inference Protocol (KServe v2): answer soft targets and "
            f"append the teacher's outputs to an HDF5 cache. Every option can also be set as {ENV_PREFIX}<OPTION> "
            f"(for example {ENV_PREFIX}MAX_BATCH=512); the command line wins."
        ),
    )
    a = p.add_argument
    a(
        "--teacher",
        action="append",
        metavar="SPEC",
        help="model.pt2 | student.pt | ARCH (with --weights) | module:factory (with --weights); repeat for an ensemble",
    )
    a("--weights", action="append", metavar="FILE", help="weights for the SPECs that need them, in order (torch.load weights_only)")
    a("--ensemble", choices=("geometric", "arithmetic"), help="geometric: mean of logits (default); arithmetic: mean of probabilities")
    a("--cache", metavar="DIR", help="cache directory, created if missing")
    a("--temperature", type=float, metavar="T", help="serving temperature (default 4)")
    a("--host", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8000)")
    a("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when available")
    a("--max-batch", type=int, metavar="N", help="samples per teacher forward pass (default 256)")
    a("--max-delay-ms", type=float, metavar="MS", help="how long a batch waits to fill (default 5)")
    a("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    a("--ack", choices=("durable", "buffered"), help="durable (default): answer once on disk; buffered: answer before the write")
    a("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on every route but health")
    a("--model-name", metavar="NAME", help="model name in the URL (default teacher)")
    a(
        "--input-shape",
        nargs="+",
        metavar="D",
        help="the shape of one sample, 3,32,32 or 3 32 32, where the model does not fix it "
        "(a .pt2 whose only dynamic dimension is the batch fixes it)",
    )
    a("--input-dtype", metavar="DTYPE", help="sample dtype clients send, e.g. uint8 (default: the model's, else float32)")
    a("--normalize", metavar="MEAN,STD", help="(x*scale - MEAN) / STD on the device; per channel: m1/m2/m3,s1/s2/s3")
    a("--input-scale", type=float, metavar="S", help="multiply inputs by S first, e.g. 0.00392156862745098 (1/255) for uint8 images")
    a("--num-classes", type=int, metavar="C", help="classes, when the weights do not say")
    a("--logits-dtype", choices=("float32", "float16"), help="dtype of the cached logits (default float32)")
    a(
        "--targets",
        metavar="LAYOUT",
        help="what the cache keeps of each output: full (default), topk:K (the K largest logits and the tail's mass) or "
        "sampled:N (the counts of N classes drawn from the soft targets); the sparse ones at the serving temperature",
    )
    a("--target-seed", type=int, metavar="N", help="salt of sampled:N's draws, recorded in the cache (default: the cache's, else 0)")
    a("--views", type=int, metavar="V", help="cache the teacher's outputs on V augmented views of each sample (default 1)")
    a(
        "--augment",
        metavar="POLICY",
        help="how the views are made, on the device, from one seed per view: random-crop:P, random-crop-flip:P, "
        "random-resized-crop, or module:factory (default: none, the sample itself)",
    )
    a("--view-salt", type=int, metavar="N", help="salt of the view seeds, recorded in the cache (default 0)")
    a("--max-body-mb", type=float, metavar="MB", help="largest request body (default 64)")
    a("--max-queue-mb", type=float, metavar="MB", help="input bytes that may wait for the teacher (default 256)")
    a("--max-inflight-mb", type=float, metavar="MB", help="request bodies held at once, from receipt to answer (default 512)")
    a("--shard-samples", type=int, metavar="N", help="samples per shard (default 65536)")
    a("--shard-mb", type=float, metavar="MB", help="bytes per shard (default 512)")
    a("--access-log", action="store_true", default=None, help="log every request")
    a("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    return p


def load_settings(argv: Sequence[str] | None) -> ServeSettings:
    args = serve_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    return ServeSettings(**given)


def option_name(setting: str) -> str:
    """The command-line spelling of a setting: ``input_shape`` is ``--input-shape``."""
    return "--" + setting.replace("_", "-")


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        option = option_name(field.split(".")[0])
        message = error["msg"]
        if error["type"] == "missing":
            message = f"required (or set {ENV_PREFIX}{field.split('.')[0].upper()})"
        parts.append(f"{option}: {message}")
    return "; ".join(parts)


class HideQueryStrings(logging.Filter):
    """The access log shows paths without their query strings: no route takes parameters there,
    and a client that puts its token in the URL by mistake must not have it written to a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?...", *args[3:])
        return True


def serve_main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        return fail(PROG, describe_validation(exc))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env)
        if not api_key:
            return fail(PROG, f"--api-key-env {settings.api_key_env}: that environment variable is not set or empty")
    elif settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without --api-key-env: anyone who can reach this port can use the teacher and fill the cache", settings.host
        )

    tune_malloc()
    # Heavy imports only once the arguments are known to be good.
    import uvicorn

    from .app import create_app
    from .loading import TeacherError, parse_normalize
    from .runtime import TeacherService
    from .teacher import load_teacher

    try:
        normalize = parse_normalize(settings.normalize) if settings.normalize else None
    except ValueError as exc:
        return fail(PROG, f"--normalize: {exc}")
    try:
        teacher = load_teacher(
            settings.teacher, weights=settings.weights, ensemble=settings.ensemble, temperature=settings.temperature,
            device=settings.device, dtype=settings.dtype, input_shape=settings.input_shape, input_dtype=settings.input_dtype,
            normalize=normalize, input_scale=settings.input_scale, num_classes=settings.num_classes,
        )  # fmt: skip
    except TeacherError as exc:
        return fail(PROG, exc.spelled(option_name))
    if settings.views > 1 or settings.augment:
        from ..offline.cache.views import PolicyError, check_policy, parse_policy

        if settings.views > 1 and not settings.augment:
            return fail(PROG, f"--views {settings.views} needs --augment POLICY: without one every view is the sample itself")
        try:
            augment = parse_policy(settings.augment)
            check_policy(augment, teacher.contract.input_shape, teacher.contract.input_dtype, device=teacher.device)
        except PolicyError as exc:
            return fail(PROG, f"--augment: {exc}")
        teacher.serve_views(settings.views, augment, settings.view_salt)
    try:
        make_layout(settings.targets, num_classes=teacher.num_classes)
    except ValueError as exc:
        return fail(PROG, f"--targets: {exc}")
    try:
        service = TeacherService.open(settings, teacher, api_key)
    except CacheError as exc:
        return fail(PROG, f"refusing to start on {settings.cache}: {exc}")
    except OSError as exc:
        return fail(PROG, f"cannot open the cache {settings.cache}: {exc}")
    store = service.store
    recovery = store.recovery
    if recovery.journal_samples:
        log.info(
            "recovered the journal of an interrupted run: %d samples, %d new, now published (%d torn bytes dropped)",
            recovery.journal_samples, recovery.restored_samples, recovery.torn_bytes,
        )  # fmt: skip
    log.info(
        "teacher %s (%s, fingerprint %s) on %s/%s; cache %s holds %d samples; ack %s%s",
        teacher.name, f"ensemble of {len(teacher.members)}" if len(teacher.members) > 1 else "single", teacher.fingerprint[:12],
        teacher.device, str(teacher.compute_dtype).replace("torch.", ""), settings.cache, store.num_samples, settings.ack,
        f"; {teacher.views} view(s) per sample by {settings.augment}" if teacher.augment is not None else "",
    )  # fmt: skip
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-sends the signal to the handler
    # that was there before it; make that one a no-op, so a clean shutdown exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        config = uvicorn.Config(
            create_app(service), host=settings.host, port=settings.port, log_level=settings.log_level,
            access_log=settings.access_log, timeout_graceful_shutdown=30,
        )  # fmt: skip
        logging.getLogger("uvicorn.access").addFilter(HideQueryStrings())  # after Config set logging up
        uvicorn.Server(config).run()
    finally:
        store.close()
    if store.close_error is not None:
        return fail(
            PROG, f"could not publish the cache at shutdown ({type(store.close_error).__name__}: {store.close_error}); "
            f"the acknowledged samples stay in {settings.cache}/.journal for the next start", code=1,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
