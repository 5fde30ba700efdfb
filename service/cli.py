"""``teacher-serve``: a thin recipe. It reads the settings (an existing cache gives the ones it
records, ``settings.take_from_cache``), loads the teacher, binds the port, opens the cache
(refusing one written by another teacher), and runs uvicorn on that socket. Known errors end as
one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from ..offline.cache import CacheError
from ..offline.cache.layout import make_layout
from ..offline.cache.trust import TRUST_HELP, UntrustedCode
from ..offline.malloc import tune_malloc
from .settings import ENV_PREFIX, CacheConflict, ServeSettings, option_name, recorded_meta, take_from_cache
from .spool import resolve_writer

PROG = "teacher-serve"
LM_TEMPERATURE = 1.0  # the serving temperature of an hf: language model when none is given or recorded
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
            f"(for example {ENV_PREFIX}MAX_BATCH=512); the command line wins. On an existing cache, the options it records (the "
            "input contract, the temperature, the views, the target layout) default to its values, and a given one must agree."
        ),
    )
    a = p.add_argument
    a(
        "--teacher",
        action="append",
        metavar="SPEC",
        help="model.pt2 | student.pt | ARCH (with --weights) | module:factory (with --weights); repeat for an ensemble; "
        "SPEC#3,5,8 or SPEC#@clusters.json:K gives a specialist its cluster (required)",
    )
    a("--weights", action="append", metavar="FILE", help="weights for the SPECs that need them, in order (torch.load weights_only)")
    a(
        "--ensemble",
        choices=("geometric", "arithmetic", "specialists"),
        help="geometric: mean of logits; arithmetic: mean of probabilities at the serving temperature; specialists: the first "
        "--teacher is a generalist, the others specialists on clusters of its classes (Hinton et al. 2015, section 5), "
        "combined at the serving temperature (default: the cache's, else geometric)",
    )
    a(
        "--specialist-top-n",
        type=int,
        metavar="N",
        help="with --ensemble specialists: run the specialists whose cluster holds one of the generalist's N most probable "
        "classes for a sample (default 1)",
    )
    a(
        "--cache",
        metavar="DIR",
        help="cache directory, created if missing, or a URL such as s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL); an "
        "existing cache also gives every option it records that is not given (required)",
    )
    a(
        "--writer-id",
        metavar="ID",
        help="this replica's name among the writers of one cache: its shards and manifest carry it (default: none on a local "
        "directory, which then has one writer; on a URL the spool's, else the host name and a random suffix)",
    )
    a(
        "--spool",
        metavar="DIR",
        help="local directory of the journal (default: a local cache's own directory; for a URL, under the temp dir)",
    )
    a("--temperature", type=float, metavar="T", help="serving temperature (default: the cache's, else 1 for an hf: language model, else 4)")
    a("--host", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8000)")
    a("--device", choices=("auto", "cpu", "cuda"), help="where the teacher runs (default auto: cuda when available)")
    a("--max-batch", type=int, metavar="N", help="samples per teacher forward pass (default 256)")
    a(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help="a language model's tokens per forward pass, sequences x the longest of them; a request over it is refused (default 8192)",
    )
    a("--max-delay-ms", type=float, metavar="MS", help="how long a batch waits to fill (default 5)")
    a("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    a("--ack", choices=("durable", "buffered"), help="durable: answer once on disk; buffered: answer before the write (default durable)")
    a("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on every route but health (default: no key)")
    a("--model-name", metavar="NAME", help="model name in the URL (default teacher)")
    a(
        "--input-shape",
        nargs="+",
        metavar="D",
        help="the shape of one sample, 3,32,32 or 3 32 32, where the model does not fix it "
        "(default: the cache's, else the model's; a .pt2 whose only dynamic dimension is the batch fixes it)",
    )
    a("--input-dtype", metavar="DTYPE", help="sample dtype clients send, e.g. uint8 (default: the cache's, else the model's, else float32)")
    a(
        "--normalize",
        metavar="MEAN,STD",
        help="(x*scale - MEAN) / STD on the device; per channel: m1/m2/m3,s1/s2/s3 (default: the cache's, else the model's, else none)",
    )
    a(
        "--input-scale",
        metavar="S",
        help="multiply inputs by S first, e.g. 1/255 for uint8 images; a number or a fraction "
        "(default: the cache's, else the model's, else 1)",
    )
    a("--num-classes", type=int, metavar="C", help="classes, when the weights do not say (default: from the weights)")
    a("--logits-dtype", choices=("float32", "float16"), help="dtype of the cached logits (default: the cache's, else float32)")
    a(
        "--targets",
        metavar="LAYOUT",
        help="what the cache keeps of each output: full, topk:K (the K largest logits and the tail's mass) or "
        "sampled:N (the counts of N classes drawn from the soft targets); the sparse ones at the serving temperature "
        "(default: the cache's, else full)",
    )
    a("--target-seed", type=int, metavar="N", help="salt of sampled:N's draws, recorded in the cache (default: the cache's, else 0)")
    a(
        "--views",
        type=int,
        metavar="V",
        help="cache the teacher's outputs on V augmented views of each sample (default: the cache's, else 1)",
    )
    a(
        "--augment",
        metavar="POLICY",
        help="how the views are made, on the device, from one seed per view: random-crop:P, random-crop-flip:P, "
        "random-resized-crop, or module:factory; needs --views V >= 2 (default: the cache's, else none)",
    )
    a("--view-salt", type=int, metavar="N", help="salt of the view seeds, recorded in the cache (default: the cache's, else 0)")
    a("--max-body-mb", type=float, metavar="MB", help="largest request body (default 64)")
    a("--max-queue-mb", type=float, metavar="MB", help="input bytes that may wait for the teacher (default 256)")
    a("--max-inflight-mb", type=float, metavar="MB", help="request bodies held at once, from receipt to answer (default 512)")
    a("--shard-samples", type=int, metavar="N", help="samples per shard (default 65536)")
    a("--shard-mb", type=float, metavar="MB", help="bytes per shard (default 512)")
    a("--access-log", action="store_true", default=None, help="log every request (default: off)")
    a("--trust-code", action="store_true", default=None, help=f"{TRUST_HELP} (default: off)")
    a("--log-level", choices=("critical", "error", "warning", "info", "debug"), help="what the log shows (default info)")
    return p


def load_settings(argv: Sequence[str] | None) -> ServeSettings:
    args = serve_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    return ServeSettings(**given)


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


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), for uvicorn to serve on. Bound before the cache is opened, so
    that a port in use is refused with nothing created in the cache directory."""
    # As uvicorn binds one: IPv6 for an address with a colon, else IPv4 ("localhost" is 127.0.0.1);
    # SO_REUSEADDR, so that a port in TIME_WAIT is free while one with a listener is not.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def describe_listen_error(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"--host {host}: not an address this machine can resolve ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return f"--port {port}: {host}:{port} is already in use (another teacher-serve?); choose another port or stop what listens there"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"--port {port}: not allowed to listen on {host}:{port} (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc})"


def serve_main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        return fail(PROG, describe_validation(exc))
    try:
        settings = resolve_writer(settings)
    except CacheError as exc:
        return fail(PROG, str(exc))
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
    from .contract import TeacherError, parse_normalize
    from .runtime import TeacherService
    from .teacher import load_teacher

    try:
        recorded = recorded_meta(settings.cache)
    except CacheError as exc:
        return fail(PROG, f"refusing to start on {settings.cache}: {exc}")
    taken: list[str] = []
    if recorded is not None:
        try:
            settings, taken = take_from_cache(settings, recorded, f"{settings.cache}/")
        except (CacheConflict, UntrustedCode) as exc:
            return fail(PROG, str(exc))
    augmenting = settings.augment not in (None, "none")
    if settings.views > 1 and not augmenting:
        return fail(PROG, f"--views {settings.views} needs --augment POLICY: without one every view is the sample itself")
    if augmenting and settings.views == 1 and not (recorded is not None and recorded.augment is not None):
        # One view per sample would be one augmented copy, fixed for good: the teacher would never
        # see the original, nor the student another view. (A cache written so before stays usable.)
        return fail(
            PROG, f"--augment {settings.augment} needs --views V with V >= 2: with one view the cache would hold a single "
            "augmented copy of each sample and never the original; give --views (e.g. 8), or omit --augment",
        )  # fmt: skip
    from .lm import PREFIX  # here, not at the top: teacher-push imports this module, and service.lm imports torch

    if "temperature" not in settings.model_fields_set and all(spec.startswith(PREFIX) for spec in settings.teacher):
        # A language model's default: at T = 4 its per-token targets were near uniform and the demo's
        # distilled student tied the cross-entropy one (234.8 vs 235.1 perplexity); at 1 it won (206.0).
        settings = settings.model_copy(update={"temperature": LM_TEMPERATURE})
    try:
        normalize = parse_normalize(settings.normalize) if settings.normalize else None
    except ValueError as exc:
        return fail(PROG, f"--normalize: {exc}")
    try:
        teacher = load_teacher(
            settings.teacher, weights=settings.weights, ensemble=settings.ensemble, temperature=settings.temperature,
            device=settings.device, dtype=settings.dtype, input_shape=settings.input_shape, input_dtype=settings.input_dtype,
            normalize=normalize, input_scale=settings.input_scale, num_classes=settings.num_classes,
            trust_code=settings.trust_code, specialist_top_n=settings.specialist_top_n,
        )  # fmt: skip
    except UntrustedCode as exc:
        return fail(PROG, str(exc))
    except TeacherError as exc:
        message = exc.spelled(option_name)
        if taken:  # perhaps not this teacher's cache: say where the settings came from
            message += f" (taken from the cache {settings.cache}/, which {recorded.teacher_name} wrote: {' '.join(taken)})"
        return fail(PROG, message)
    if settings.views > 1 or settings.augment:
        from ..offline.cache.views import PolicyError, check_policy, parse_policy

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
        listener = listen(settings.host, settings.port)  # before the cache is touched: a port in use leaves it as it was
    except OSError as exc:
        return fail(PROG, describe_listen_error(settings.host, settings.port, exc))
    try:
        service = TeacherService.open(settings, teacher, api_key)
    except (CacheError, OSError) as exc:
        listener.close()
        return fail(PROG, f"{'refusing to start on' if isinstance(exc, CacheError) else 'cannot open the cache'} {settings.cache}: {exc}")
    if taken:  # logged once the service starts, so that a refusal stays one line
        log.info("taken from the cache %s/: %s", settings.cache, " ".join(taken))
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
        host, port = listener.getsockname()[:2]
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", f"[{host}]" if ":" in host else host, port
        )  # uvicorn says it only for the sockets it binds itself
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        store.close()
    if store.close_error is not None:
        return fail(
            PROG, f"could not publish the cache at shutdown ({type(store.close_error).__name__}: {store.close_error}); "
            f"the acknowledged samples stay in {store.journal.path} for the next start", code=1,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
