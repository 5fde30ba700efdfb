"""The service's settings: one pydantic model. Every option of ``teacher-serve`` can also be set
through an environment variable named ``TEACHER_SERVE_<OPTION>`` (``--max-batch`` is
``TEACHER_SERVE_MAX_BATCH``); a command-line option wins over the environment. List options
(``--teacher``, ``--weights``, ``--input-shape``) take comma-separated values in the
environment: ``TEACHER_SERVE_TEACHER=a.pt2,b.pt2``; ``--input-shape`` takes them on the command
line too (``3,32,32`` or ``3 32 32``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..offline.cache.layout import parse_targets

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


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    teacher: Annotated[list[str], NoDecode] = Field(min_length=1, description="teacher SPEC; several make an ensemble")
    cache: Path = Field(description="cache directory (created if missing)")
    weights: Annotated[list[str], NoDecode] = Field(default_factory=list, description="weights for the SPECs that need them, in order")
    ensemble: Literal["geometric", "arithmetic"] = "geometric"
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False, description="serving temperature T")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch: int = Field(256, ge=1, le=65536, description="samples per teacher forward pass")
    max_delay_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    ack: Literal["durable", "buffered"] = "durable"
    api_key_env: str | None = Field(None, description="environment variable holding the bearer token")
    model_name: str = Field("teacher", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    input_shape: Annotated[list[Annotated[int, Field(ge=1)]], NoDecode] | None = Field(
        None, min_length=1, description="the shape of one sample: 3,32,32 or 3 32 32"
    )
    input_dtype: str | None = None
    normalize: str | None = Field(None, description="MEAN,STD (per channel: m1/m2/m3,s1/s2/s3)")
    input_scale: float | None = Field(None, gt=0)
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
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    _split_lists = field_validator("teacher", "weights", mode="before")(_split)
    _split_shape = field_validator("input_shape", mode="before")(_shape)

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
