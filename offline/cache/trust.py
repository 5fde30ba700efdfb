"""Consent before code: the one place where a ``module:factory`` spec is imported.

Code named on the command line (``--teacher``, ``--student``, ``--augment``) is trusted as given.
Code named inside a file (a cache's manifest, a ``student.pt``) is data until the user passes
``--trust-code``: without it ``import_factory`` refuses before importing anything, in one line
that names the file, the module and the flag. Built-in names never get here (docs/reliability.md,
section Security)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

TRUST_FLAG = "--trust-code"
TRUST_HELP = (
    "import the code that a file names (a cache's module:factory augment policy, a student.pt's module:factory arch); "
    "without it such a file is refused. Only for files you trust: importing runs their code"
)


class UntrustedCode(Exception):
    """A file names code to import and the user has not passed --trust-code; nothing was imported."""


@dataclass(frozen=True)
class Origin:
    """Where a spec that names code was read: ``where`` None is the command line, trusted as
    given; otherwise a file (``cache c/``, ``run/student.pt``), trusted only with ``trust_code``."""

    where: str | None = None
    trust_code: bool = False

    def consent(self, what: str, spec: str, instead: str | None = None) -> None:
        """Raise UntrustedCode unless code named here may be imported; ``instead``: another way
        the message offers (``give --augment X``)."""
        if self.where is not None and not self.trust_code:
            module = spec.partition(":")[0]
            raise UntrustedCode(
                f"{self.where} names code to import: the {what} {spec} (module {module}); "
                f"pass {TRUST_FLAG} to import it, only if you trust {self.where}" + (f"; or {instead}" if instead else "")
            )


COMMAND_LINE = Origin()


def import_factory(spec: str, *, what: str, origin: Origin, error: type[Exception]) -> Any:
    """The callable that ``spec`` (``module:attr``, the attribute may be dotted) names. Asks
    ``origin`` first, so that an untrusted file imports nothing; a module that cannot be imported,
    or has no such callable, raises ``error`` with one line naming the spec."""
    origin.consent(what, spec)
    module_name, _, attr = spec.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user module can fail in any way on import; say which and why
        raise error(f"{spec}: cannot import {module_name} ({describe_error(exc)})") from None
    for part in attr.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        raise error(f"{spec}: {module_name} has no callable {attr!r}")
    return found


def describe_error(exc: BaseException) -> str:
    """An exception as one short line (torch's messages run over several)."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
