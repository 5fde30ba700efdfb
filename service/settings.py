"""The service's settings: one pydantic model. Every option of ``teacher-serve`` can also be set
through an environment variable named ``TEACHER_SERVE_<OPTION>`` (``--max-batch`` is
``TEACHER_SERVE_MAX_BATCH``); a command-line option wins over the environment. List options
(``--teacher``, ``--weights``, ``--input-shape``) take comma-separated values in the
environment: ``TEACHER_SERVE_TEACHER=a.pt2,b.pt2``; ``--input-shape`` takes them on the command
line too (``3,32,32`` or ``3 32 32``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..offline.cache import CacheMeta
from ..offline.cache.layout import parse_targets
from ..offline.cache.trust import Origin

ENV_PREFIX = "TEACHER_SERVE_"


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


def _shape(value: object) -> object:
    """``3,32,32`` or ``3 32 32``: one string from the environment, one per word from argparse."""
    words = [value] if isinstance(value, str) else value
    if isinstance(words, list) and all(isinstance(word, str) for word in words):
        return _split(" ".join(words))
    return value


def _scale(value: object) -> object:
    """``0.00392156862745098`` or a fraction such as ``1/255``, from argparse or the environment."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    numerator, slash, denominator = text.partition("/")
    try:
        scale = float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise PydanticCustomError("input_scale", "expected a number > 0 or a fraction such as 1/255, got {given}", {"given": repr(value)})
    return scale


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    teacher: Annotated[list[str], NoDecode] = Field(min_length=1, description="teacher SPEC; several make an ensemble")
    cache: Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)] = Field(
        min_length=1, description="cache directory (created if missing), or a URL such as s3://bucket/prefix"
    )
    writer_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="this replica's name in a cache that several write (default: none on a local cache; on a URL the spool's, else host-random)",
    )  # fmt: skip
    spool: Path | None = Field(
        None, description="local directory of the journal (default: a local cache's own; a URL's: under the temp dir)"
    )
    weights: Annotated[list[str], NoDecode] = Field(default_factory=list, description="weights for the SPECs that need them, in order")
    ensemble: Literal["geometric", "arithmetic", "specialists"] = "geometric"
    specialist_top_n: int = Field(
        1, ge=1, le=1 << 16, description="specialists run where their cluster meets the generalist's top N classes"
    )
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False, description="serving temperature T")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch: int = Field(256, ge=1, le=65536, description="samples per teacher forward pass")
    max_batch_tokens: int = Field(
        8192, ge=1, le=1 << 24, description="a language model's tokens per forward pass: sequences x the longest of them"
    )
    max_delay_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    ack: Literal["durable", "buffered"] = "durable"
    api_key_env: str | None = Field(None, description="environment variable holding the bearer token")
    model_name: str = Field("teacher", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    input_shape: Annotated[list[Annotated[int, Field(ge=1)]], NoDecode] | None = Field(
        None, min_length=1, description="the shape of one sample: 3,32,32 or 3 32 32"
    )
    input_dtype: str | None = None
    normalize: str | None = Field(None, description="MEAN,STD (per channel: m1/m2/m3,s1/s2/s3)")
    input_scale: float | None = Field(None, gt=0, allow_inf_nan=False, description="S, or a fraction such as 1/255")
    num_classes: int | None = Field(None, ge=1)
    logits_dtype: Literal["float32", "float16"] = "float32"
    targets: str = Field("full", description="the cache's target layout: full, topk:K or sampled:N")
    target_seed: int | None = Field(
        None, ge=0, lt=1 << 63, description="salt of sampled:N's draws, recorded in the cache (default: the cache's, else 0)"
    )
    views: int = Field(1, ge=1, le=4096, description="augmented views of each sample, made on the device")
    augment: str | None = Field(
        None, description="the views' policy: random-crop:P, random-crop-flip:P, random-resized-crop, module:factory"
    )
    view_salt: int = Field(0, ge=0, lt=1 << 64, description="salt of the view seeds, recorded in the cache")
    max_body_mb: float = Field(64.0, gt=0, description="largest request body accepted")
    max_queue_mb: float = Field(256.0, gt=0, description="input bytes that may wait for the teacher")
    max_inflight_mb: float = Field(512.0, gt=0, description="request bodies held at once, from receipt to answer")
    shard_samples: int = Field(65536, ge=1)
    shard_mb: float = Field(512.0, gt=0)
    access_log: bool = False
    trust_code: bool = Field(False, description="import the code a file names: a cache's augment policy, a student.pt's arch")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    _split_lists = field_validator("teacher", "weights", mode="before")(_split)
    _split_shape = field_validator("input_shape", mode="before")(_shape)
    _fraction = field_validator("input_scale", mode="before")(_scale)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: str) -> str:
        name, size = parse_targets(value)  # a ValueError names the forms
        return name if size is None else f"{name}:{size}"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * (1 << 20))

    @property
    def max_queue_bytes(self) -> int:
        return int(self.max_queue_mb * (1 << 20))


# ---------------------------------------------------------------------------------------------
# A restart on an existing cache: the settings it records are the defaults


class CacheConflict(ValueError):
    """A setting given on the command line (or in the environment) that disagrees with the cache."""


def option_name(setting: str) -> str:
    """The command-line spelling of a setting: ``input_shape`` is ``--input-shape``."""
    return "--" + setting.replace("_", "-")


def recorded_meta(cache: str) -> CacheMeta | None:
    """The metadata of the cache at ``cache`` (a directory or a URL), or None where no writer has
    written a manifest yet (a new cache, or one whose manifest a writer rebuilds from its
    shards). A CacheError for a manifest that cannot be read, or a store that cannot be reached."""
    from ..offline.cache.manifest import index_names, load_namespace
    from ..offline.cache.reader import open_storage

    storage = open_storage(cache)
    if storage.remote:
        storage.check()  # a bad endpoint, credentials or bucket, named before the teacher loads
    elif not Path(cache).is_dir():
        return None
    if not index_names(storage):
        return None
    return load_namespace(storage).meta


_FACTORY = object()  # a module:factory policy, which is code: imported when named on the command line, or with --trust-code
_VIEW_SETTINGS = ("views", "augment", "view_salt")


def _recorded(meta: CacheMeta, teachers: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of the teacher-serve that wrote a cache of ``meta``, as ServeSettings values,
    and each as the log and the errors show it."""
    pre = meta.preprocessing
    recorded: dict[str, Any] = {
        "input_shape": list(meta.input_shape),
        "input_dtype": meta.input_dtype,
        "input_scale": pre.scale,
        "normalize": f"{'/'.join(map(repr, pre.mean))},{'/'.join(map(repr, pre.std))}",
        "temperature": meta.serving_temperature,
        "targets": meta.logits_layout,
        "logits_dtype": meta.logits_dtype,
    }
    shown = {name: _shown(value) for name, value in recorded.items()}
    shown["normalize"] = f"{'/'.join(map(_shown, pre.mean))},{'/'.join(map(_shown, pre.std))}"
    if teachers > 1 and meta.teacher_name.startswith("ensemble-"):  # the mode is in the fingerprint; its name says which
        recorded["ensemble"] = shown["ensemble"] = meta.teacher_name.removeprefix("ensemble-").partition("(")[0]
    if meta.layout.randomized:
        recorded["target_seed"] = meta.target_seed
        shown["target_seed"] = str(meta.target_seed)
    policy = meta.augment
    augment: Any = None
    if policy is not None:
        name, params = str(policy["name"]), policy["params"]
        if name in ("random-crop", "random-crop-flip"):
            augment = f"{name}:{params.get('padding')}"
        elif name in ("random-resized-crop", "none"):
            augment = name
        else:
            augment = _FACTORY
        shown["augment"] = name if augment is _FACTORY else augment
    else:
        shown["augment"] = "none"
    recorded.update(views=meta.views_per_id, augment=augment, view_salt=meta.view_salt)
    shown.update(views=str(meta.views_per_id), view_salt=str(meta.view_salt))
    return recorded, shown


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_shown, value))
    return str(value)


def _agrees(name: str, given: Any, recorded: Any) -> bool:
    """Whether a given setting means what the cache records: numbers to 6 digits (the log shows
    them so), dtypes by name, a policy or a normalisation by what it parses to."""
    if name in ("input_scale", "temperature"):
        return math.isclose(float(given), float(recorded), rel_tol=1e-6)
    if name == "input_dtype":
        import numpy as np

        try:
            return np.dtype(given).name == recorded
        except TypeError:
            return False
    if name == "normalize":
        from .contract import parse_normalize

        try:
            mean, std = parse_normalize(given)
        except ValueError as exc:
            raise CacheConflict(f"--normalize: {exc}") from None
        want_mean, want_std = parse_normalize(recorded)
        return all(
            len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b, strict=True))
            for a, b in ((mean, want_mean), (std, want_std))
        )
    if name == "augment":
        from ..offline.cache.views import PolicyError, parse_policy

        if recorded is _FACTORY:
            return False  # compared by the caller, against the record
        try:
            given_policy = None if given in (None, "none") else parse_policy(given).describe()
            recorded_policy = None if recorded in (None, "none") else parse_policy(recorded).describe()
        except PolicyError as exc:
            raise CacheConflict(f"--augment: {exc}") from None
        return given_policy == recorded_policy
    if name == "input_shape":
        return [int(d) for d in given] == list(recorded)
    return given == recorded


def take_from_cache(settings: ServeSettings, meta: CacheMeta, where: str) -> tuple[ServeSettings, list[str]]:
    """``settings`` with every setting the cache records taken from ``meta`` where it was not
    given (on the command line or in the environment), and the options taken, as the log shows
    them (``--input-scale 0.00392157``). A given setting that disagrees raises CacheConflict,
    naming the option and the recorded value; the teacher itself is checked later, by its
    fingerprint. A module:factory policy that the cache records is taken only with
    ``trust_code`` (UntrustedCode without it), or when given again as ``augment``."""
    recorded, shown = _recorded(meta, len(settings.teacher))
    given = settings.model_fields_set
    update: dict[str, Any] = {}
    taken: list[str] = []
    for name, value in recorded.items():
        option = option_name(name)
        if name == "augment" and value is _FACTORY:
            policy = meta.augment or {}
            if name in given and settings.augment is not None:
                from ..offline.cache.views import PolicyError, parse_policy

                try:
                    agrees = parse_policy(settings.augment).describe() == policy
                except PolicyError as exc:
                    raise CacheConflict(f"--augment: {exc}") from None
                if agrees:
                    continue
            else:
                instead = f"give --augment {shown[name]} (code named on the command line is trusted as given)"
                Origin(f"the cache {where}", settings.trust_code).consent("augment policy", shown[name], instead)
                update[name] = shown[name]
                taken.append(f"{option} {shown[name]}")
                continue
        elif name in given:
            if _agrees(name, getattr(settings, name), value):
                if name != "augment":
                    update[name] = value  # exactly the recorded value: the cache's writer compares exactly
                continue
        else:
            update[name] = value
            if not (name in _VIEW_SETTINGS and not meta.has_views):  # a plain cache's 1, none and 0 are the defaults
                taken.append(f"{option} {shown[name]}")
            continue
        raise CacheConflict(
            f"{option} {_shown(getattr(settings, name))} disagrees with the cache {where}, which records {shown[name]} "
            "(omit it to use the cache's)"
        )
    return settings.model_copy(update=update), taken
