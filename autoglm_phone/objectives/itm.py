"""ITM: matched / not-matched on the fused ``[media block; caption]`` (ALBEF, Li et al. 2021).

One pipeline for training and evaluation: the ITC similarity picks each item's hard negative
caption and each caption's hard negative item (:mod:`autoglm_phone.losses.itm`), the decoder
fuses the ``3B`` pairs and the ITM head scores them. Positives are by item id, as BLIP's image ids:
another caption of the same image or clip is never drawn as its negative (on the embedded data
the item id is the caption id, so equal captions are never each other's negatives either).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autoglm_phone.losses.itm import itm_accuracy, itm_loss, itm_targets, sample_hard_negatives
from autoglm_phone.objectives.features import Batch, Features, Generator, LabelledObjective

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


def match_logits(
    model: AutoGLMModel,
    block: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media_index: torch.Tensor,
    text_index: torch.Tensor,
) -> torch.Tensor:
    """ITM logits ``(M, 2)`` of the pairs ``(block[media_index[m]], caption[text_index[m]])``."""
    hidden, mask = model.fuse(
        block[media_index], input_ids[text_index], attention_mask[text_index]
    )  # (M, K + 2 + T, C)
    return model.itm_logits(hidden, mask)


class ITM(LabelledObjective):
    name = "itm"
    loss_fn = staticmethod(itm_loss)
    accuracy_fn = staticmethod(itm_accuracy)

    def targets(
        self, model: AutoGLMModel, batch: Batch, feats: Features, generator: Generator = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(3B, 2)`` and labels ``(3B,)`` of the positive and hard-negative pairs."""
        sim = feats.similarity()  # (B, B) read without gradient by the sampler
        keys = batch["item_id"]  # (B,)
        neg_text, ok_text = sample_hard_negatives(sim, keys, keys, generator)
        neg_media, ok_media = sample_hard_negatives(sim.T, keys, keys, generator)
        mi, ti, labels = itm_targets(neg_text, neg_media, ok_text, ok_media)  # (3B,) each
        logits = match_logits(
            model, feats.block, batch["input_ids"], batch["attention_mask"], mi, ti
        )
        return logits, labels
