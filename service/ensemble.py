"""How a teacher's members' logits become the one logit vector per sample that the cache stores.

offline-distill later turns a stored vector ``v`` into soft targets ``softmax(v / T)`` at a
temperature T of its own choosing. A ``Combiner`` owns the combination, the teacher fingerprint
it implies, and its temperature rule, which the cache records (``CacheMeta.temperature_rule``):

* ``SingleMember``: the member's raw logits ``z``. Rule "any".
* ``GeometricMean`` (the default ensemble): the mean of the members' logits, ``v = (1/M) Σ z_i``.
  Then ``softmax(v / T) ∝ Π softmax(z_i / T) ** (1/M)`` for EVERY T: the normalised geometric
  mean of the members' soft targets, at whatever temperature the student is trained. The stored
  values do not depend on the serving temperature, so neither does the fingerprint. Rule "any".
* ``ArithmeticMean``: ``v = T_s · log((1/M) Σ softmax(z_i / T_s))`` with T_s the serving
  temperature, computed stably as ``logsumexp_i(log_softmax(z_i / T_s)) - log M``. Then
  ``softmax(v / T_s)`` is exactly the mean of the members' probabilities (Hinton et al.'s ensemble
  average), but only at T = T_s: at any other T it is that mixture sharpened or flattened, not
  the mixture of the members' distributions at T. A mean of probabilities has no logit vector
  that is right at every temperature, so the serving temperature is part of what is stored: it
  enters the fingerprint, and the student should be distilled at T = T_s. Rule "serving": the
  service refuses other temperatures, and the trainer warns.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

ENSEMBLE_MODES = ("geometric", "arithmetic")


class Combiner(ABC):
    """The members' logits → the stored logits, with the fingerprint and temperature rule that go with it."""

    ensemble: ClassVar[str | None]  # the --ensemble mode, None for a single member
    temperature_rule: ClassVar[str]  # "any" or "serving", as CacheMeta.temperature_rule

    @abstractmethod
    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """One ``[B, C]`` tensor per member, in any float dtype → float32 ``[B, C]``."""

    def fingerprint(self, member_fingerprints: Sequence[str]) -> str:
        """Order-independent: the same members in another order are the same teacher."""
        digest = hashlib.sha256(f"ensemble-{self.ensemble}".encode())
        digest.update(self._fingerprint_salt())
        for fingerprint in sorted(member_fingerprints):
            digest.update(fingerprint.encode())
        return digest.hexdigest()

    def _fingerprint_salt(self) -> bytes:
        """What the stored values depend on besides the members."""
        return b""

    def name(self, member_names: Sequence[str]) -> str:
        return f"ensemble-{self.ensemble}({','.join(member_names)})"


class SingleMember(Combiner):
    ensemble = None
    temperature_rule = "any"

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        (only,) = logits
        return only.float()

    def fingerprint(self, member_fingerprints: Sequence[str]) -> str:
        (only,) = member_fingerprints
        return only

    def name(self, member_names: Sequence[str]) -> str:
        (only,) = member_names
        return only


class GeometricMean(Combiner):
    ensemble = "geometric"
    temperature_rule = "any"

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([z.float() for z in logits]).mean(dim=0)  # float32 whatever the autocast dtype


class ArithmeticMean(Combiner):
    ensemble = "arithmetic"
    temperature_rule = "serving"

    def __init__(self, serving_temperature: float) -> None:
        self.serving_temperature = float(serving_temperature)

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        t = self.serving_temperature
        log_probs = torch.log_softmax(torch.stack([z.float() for z in logits]) / t, dim=-1)  # [M, B, C]
        return t * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))

    def _fingerprint_salt(self) -> bytes:
        return f"temperature={self.serving_temperature!r}".encode()


def combiner_for(members: int, ensemble: str, serving_temperature: float) -> Combiner:
    """The combiner for ``members`` models under the ``--ensemble`` mode (ignored for one)."""
    if members == 1:
        return SingleMember()
    if ensemble == "geometric":
        return GeometricMean()
    if ensemble == "arithmetic":
        return ArithmeticMean(serving_temperature)
    raise ValueError(f"ensemble {ensemble!r}: expected one of {', '.join(ENSEMBLE_MODES)}")
