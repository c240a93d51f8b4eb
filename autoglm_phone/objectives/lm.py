"""Prefix LM: next-token loss on the response of ``[media block; prompt; response]`` chats
(GLM's prefix attention; SimVLM's PrefixLM). The loss is :mod:`autoglm_phone.losses.lm`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from autoglm_phone.losses.lm import prefix_lm_loss
from autoglm_phone.objectives.features import Features, ObjectiveOutput

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel

CHAT_KEYS = ("input_ids", "attention_mask", "loss_mask")  # of tokenize_chat, ``chat_`` in batches


class PrefixLM:
    name = "lm"

    def score(
        self, model: AutoGLMModel, block: torch.Tensor, chat: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and accuracy over the response tokens of ``chat`` (``tokenize_chat``)."""
        logits, target, scored = model.prefix_lm(
            [block], chat["input_ids"], chat["attention_mask"], chat["loss_mask"]
        )  # (B, P, V)
        return prefix_lm_loss(logits, target, scored)

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        if "chat_input_ids" not in batch:
            raise ValueError("objective.lm_weight > 0 needs data.instructions=true")
        chat = {k: batch[f"chat_{k}"] for k in CHAT_KEYS}
        loss, accuracy = self.score(model, feats.block, chat)
        return ObjectiveOutput(loss, {"lm_acc": accuracy}, model.text.aux_loss())
