"""Helpers for the container tests: read the Dockerfile's instructions, find a container engine,
and build the image with the local base where the machine has one (no registry needed)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# Built by ../shared/container/setup.sh: Debian bookworm with Python 3.11 and no torch.
LOCAL_BASE = "localhost/kd-base:bookworm"
IMAGE = "localhost/kdcache-teacher:test"
CONTAINER_UID = 10001


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def last(keyword: str, path: Path = DOCKERFILE) -> str:
    found = [arguments for name, arguments in instructions(path) if name == keyword]
    assert found, f"{path.name}: no {keyword} instruction"
    return found[-1]


def env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The image's ENV values (KEY=VALUE form), later ones winning."""
    values: dict[str, str] = {}
    for name, arguments in instructions(path):
        if name == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"{path.name}: ENV {item!r} is not KEY=VALUE"
                values[key] = value
    return values


def exec_form(arguments: str, what: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), f"Dockerfile: {what} is not exec form"
    return command


def cmd(path: Path = DOCKERFILE) -> list[str]:
    return exec_form(last("CMD", path), "CMD")


def healthcheck(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (``{"start-period": "300s", ...}``) and its exec-form command."""
    arguments = last("HEALTHCHECK", path)
    options, _, command = arguments.partition("CMD ")
    parsed = dict(option.removeprefix("--").split("=", 1) for option in options.split())
    return parsed, exec_form(command, "HEALTHCHECK CMD")


def seconds(duration: str) -> float:
    """``"300s"``, ``"5m"``, ``"1m30s"`` as seconds (the forms Docker takes)."""
    total, number = 0.0, ""
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[char]
            number = ""
    assert not number, f"duration {duration!r} has no unit"
    return total


def engine() -> str | None:
    """podman, else docker, from PATH."""
    return shutil.which("podman") or shutil.which("docker")


def is_podman(binary: str) -> bool:
    return Path(binary).name == "podman"


def image_exists(binary: str, image: str) -> bool:
    return subprocess.run([binary, "image", "inspect", image], capture_output=True).returncode == 0


def pip_find_links() -> Path | None:
    """The machine's local wheel folder (pip's find-links), where the CPU torch wheel lies."""
    value = os.environ.get("PIP_FIND_LINKS")
    if not value:
        asked = subprocess.run(["pip", "config", "get", "global.find-links"], capture_output=True, text=True)
        value = asked.stdout.strip() if asked.returncode == 0 else ""
    folder = Path(value.split()[0]) if value.split() else None
    return folder if folder and folder.is_dir() else None


def build_command(binary: str, tag: str = IMAGE) -> list[str]:
    """The build of the Dockerfile: on the local base (no torch) when the machine has it, with
    this venv's torch version installed from the machine's wheel folder; else the default base."""
    command = [binary, "build", "--network", "host", "-t", tag]
    if is_podman(binary):
        command += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
    if image_exists(binary, LOCAL_BASE):
        import torch

        command += ["--build-arg", f"BASE={LOCAL_BASE}", "--build-arg", f"TORCH=torch=={torch.__version__}"]
        wheels = pip_find_links()
        # docker build has no -v: there the wheel must come from an index instead.
        if wheels is not None and is_podman(binary):
            command += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels"]
    return [*command, str(ROOT)]
