"""MLM: BERT-masked caption tokens predicted with the media visible (ALBEF's multimodal MLM).

The masking recipe and the loss are :mod:`autoglm_phone.losses.mlm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from autoglm_phone.losses.mlm import masked_accuracy, mlm_loss
from autoglm_phone.objectives.features import Features, ObjectiveOutput

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


class MLM:
    name = "mlm"

    def __init__(self, mask_prob: float = 0.15) -> None:
        self.mask_prob = mask_prob

    def logits(
        self,
        model: AutoGLMModel,
        batch: dict[str, Any],
        feats: Features,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LM-head logits ``(B, T, V)`` at the masked caption and the labels ``(B, T)``."""
        return model.masked_lm(
            feats.block, batch["input_ids"], batch["attention_mask"], self.mask_prob, generator
        )

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        logits, labels = self.logits(model, batch, feats)
        return ObjectiveOutput(
            mlm_loss(logits, labels),
            {"mlm_acc": masked_accuracy(logits, labels)},
            model.text.aux_loss(),
        )
