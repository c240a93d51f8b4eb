"""Typed objective settings: which losses a run trains and how.

Checkpoints keep these as plain dicts (``dataclasses.asdict``), so they load with
``torch.load(..., weights_only=True)``; :meth:`ObjectiveConfig.from_dict` rebuilds them, refusing
unknown keys by name (a misspelt weight must not become a silent 0), and fills keys that older
checkpoints lack with their defaults. The Hydra schema (``app/schema.py``) is this dataclass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from autoglm_phone.config import from_dict

NAMES = ("itc", "itm", "mlm", "lm", "episode", "distill")  # every objective, in the order they run


def _check(owner: str, name: str, value: float, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    if not (low <= value <= high):
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}], got {value}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained checkpoint (``teacher_ckpt``) into this model."""

    teacher_ckpt: str | None = None
    temperature: float = 2.0  # softens both similarity distributions; the KL is scaled by T^2
    weight: float = 0.0  # loss += weight * KL(teacher || student); 0: no distillation

    def __post_init__(self) -> None:
        _check("objective.distill", "weight", self.weight, 0.0)
        _check("objective.distill", "temperature", self.temperature, 1e-6)


@dataclass
class ObjectiveConfig:
    """Per modality: ``loss = sum_k weight_k * loss_k`` (+ the MoE balancing terms)."""

    itc_weight: float = 1.0  # contrastive, open_clip's ClipLoss
    # other captions of the same item are not ITC negatives (BLIP's image ids); false: CLIP's
    # plain in-batch negatives (an ablation, bench/itc_item_mask.py)
    itc_mask_same_item: bool = True
    itm_weight: float = 0.0  # matching with ITC hard negatives (ALBEF)
    mlm_weight: float = 0.0  # masked caption tokens with the media visible (BERT 80/10/10)
    mlm_prob: float = 0.15
    lm_weight: float = 0.0  # prefix LM on instruction responses (needs data.instructions=true)
    # prefix LM on the answers of long-context episodes (needs data=episodes; objectives/episode.py)
    episode_weight: float = 0.0
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        for name in ("itc_weight", "itm_weight", "mlm_weight", "lm_weight", "episode_weight"):
            _check("objective", name, getattr(self, name), 0.0)
        _check("objective", "mlm_prob", self.mlm_prob, 1e-6, 1.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ObjectiveConfig:
        """From a checkpoint's or Hydra's plain dict; an unknown key is an error naming it."""
        try:
            return from_dict(cls, dict(data or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"objective settings {dict(data or {})}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def weights(self) -> dict[str, float]:
        """``{name: weight}`` for every objective in :data:`NAMES` (0: switched off)."""
        w = {name: float(getattr(self, f"{name}_weight")) for name in NAMES[:-1]}
        return {**w, "distill": float(self.distill.weight)}

    def active(self, name: str) -> bool:
        return self.weights[name] > 0

    @property
    def needs_text(self) -> bool:
        """Whether a step needs the contrastive text features (ITC, ITM's sampler, distillation)."""
        return any(self.active(n) for n in ("itc", "itm", "distill"))

    @property
    def needs_block(self) -> bool:
        """Whether a step needs the decoder's media block (the objectives that fuse)."""
        return any(self.active(n) for n in ("itm", "mlm", "lm"))
