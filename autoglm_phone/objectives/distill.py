"""Distillation: the student's in-batch similarity distributions follow a frozen teacher's.

Temperature-scaled KL (Hinton et al. 2015; scaled by ``T^2``) from the teacher's to the
student's softmax over the ``(B, B)`` ITC logits, media->text and text->media, averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from autoglm_phone.objectives.features import Features, ObjectiveOutput, encode_batch

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean(KL(teacher || student))`` over rows and columns of ``(B, B)`` logits."""
    t = temperature
    kl = 0.0
    for s, q in ((student, teacher), (student.T, teacher.T)):
        kl = kl + F.kl_div(
            F.log_softmax(s / t, dim=-1),
            F.log_softmax(q / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
    return kl / 2 * t * t


class Distill:
    name = "distill"

    def __init__(self, temperature: float, teacher: AutoGLMModel | None = None) -> None:
        self.temperature = temperature
        self.teacher = teacher  # frozen, eval mode; a plain attribute (no state of its own)

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        if self.teacher is None:
            raise ValueError("objective.distill.weight > 0 needs a teacher (distill.teacher_ckpt)")
        with torch.no_grad():
            target = encode_batch(self.teacher, batch).similarity()  # (B, B)
        return ObjectiveOutput(similarity_kl(feats.similarity(), target, self.temperature))
