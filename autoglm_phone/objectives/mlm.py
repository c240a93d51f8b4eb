"""MLM: BERT-masked caption tokens predicted with the media visible (ALBEF's multimodal MLM).

The masking recipe and the loss are :mod:`autoglm_phone.losses.mlm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autoglm_phone.losses.mlm import masked_accuracy, mlm_loss
from autoglm_phone.objectives.features import Batch, Features, Generator, LabelledObjective

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


class MLM(LabelledObjective):
    name = "mlm"
    loss_fn = staticmethod(mlm_loss)
    accuracy_fn = staticmethod(masked_accuracy)

    def __init__(self, mask_prob: float = 0.15) -> None:
        self.mask_prob = mask_prob

    def targets(
        self, model: AutoGLMModel, batch: Batch, feats: Features, generator: Generator = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LM-head logits ``(B, T, V)`` at the masked caption and the labels ``(B, T)``."""
        return model.masked_lm(
            feats.block, batch["input_ids"], batch["attention_mask"], self.mask_prob, generator
        )
