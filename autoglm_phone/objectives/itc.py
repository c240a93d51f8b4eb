"""ITC: the contrastive objective (CLIP's symmetric InfoNCE over the global batch).

The loss is :class:`autoglm_phone.losses.contrastive.ItemClipLoss`, open_clip's ``ClipLoss`` with
same-item pairs masked (``batch["item_id"]``: other captions of the same image are not
negatives), so multi-process gathering is open_clip's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoglm_phone.losses.contrastive import itc_loss
from autoglm_phone.objectives.features import Features, ObjectiveOutput

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


class ITC:
    name = "itc"

    def __init__(self, rank: int = 0, world_size: int = 1, mask_same_item: bool = True) -> None:
        self.loss = itc_loss(rank=rank, world_size=world_size)
        self.mask_same_item = mask_same_item

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        items = batch["item_id"] if self.mask_same_item else None  # None: CLIP's plain loss
        return ObjectiveOutput(self.loss(feats.media, feats.text, feats.scale, item_ids=items))
