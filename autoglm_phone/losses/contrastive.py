"""Image/audio-text contrastive (ITC, InfoNCE) loss.

We use open_clip's ``ClipLoss``: it all-gathers features across processes (with gradient) so
every rank sees the global batch's negatives, and it is the reference CLIP implementation.
:class:`ItemClipLoss` adds one thing for multi-caption data (COCO, AudioCaps, Clotho): two rows
of the same item (one image, two of its captions) are not each other's negatives. As BLIP
(Li et al. 2022) does with image ids, a pair ``(i, j)``, ``j != i``, whose item ids are equal is
left out of row ``i``'s softmax denominator; with unique ids the loss is ``ClipLoss``'s exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

MAX_LOG_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned temperature: scale <= 100


def clamped_logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of the cosine similarities, ``exp(min(log_scale, log 100))``: the one
    place the learned temperature is clamped (training, evaluation, ``AutoGLMModel.forward``)."""
    return log_scale.clamp(max=MAX_LOG_LOGIT_SCALE).exp()


class ItemClipLoss(ClipLoss):
    """``ClipLoss`` that masks same-item pairs out of the denominators (``item_ids`` ``(B,)``)."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        item_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``ClipLoss.forward`` (same positional arguments), plus ``item_ids`` by keyword."""
        if item_ids is None:
            return super().forward(
                image_features, text_features, logit_scale, logit_bias, output_dict
            )
        per_image, per_text = self.get_logits(
            image_features, text_features, logit_scale, logit_bias
        )  # (R, N) each: R rows (local or global), N gathered columns
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])  # (R,)
        columns = self._gather_ids(item_ids.to(image_features.device))  # (N,)
        rows = columns[labels]  # (R,) the rows' own ids, wherever the rows sit
        same = rows[:, None] == columns[None, :]  # (R, N)
        same[torch.arange(len(labels), device=same.device), labels] = False  # keep the positive
        loss = (
            F.cross_entropy(per_image.masked_fill(same, float("-inf")), labels)
            + F.cross_entropy(per_text.masked_fill(same, float("-inf")), labels)
        ) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def _gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Every rank's item ids in rank order (what ``gather_features`` does to features)."""
        if self.world_size == 1:
            return ids
        parts = [torch.empty_like(ids) for _ in range(self.world_size)]
        dist.all_gather(parts, ids)
        return torch.cat(parts)


def itc_loss(rank: int = 0, world_size: int = 1) -> ItemClipLoss:
    """Symmetric InfoNCE over the global batch; call as ``loss(**model(...))``, adding
    ``item_ids=`` to mask same-item pairs."""
    return ItemClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
