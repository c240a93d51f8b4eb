"""What every objective reads: one tower pass per batch, the contrastive temperature, the
batch's audio sample rate.

Resampling has one owner, the audio tower (:class:`~autoglm_phone.models.towers.AudioTower`):
the data bring every clip of a batch to one rate (``batch["sample_rate"]``, ``data.sample_rate``)
and every caller hands that rate to the tower with :func:`media_kwargs`, which resamples to
``model.audio.sample_rate`` when the two differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel

# CLIP (Radford et al. 2021, Sec. 2.5) clips the learned logit scale at 100 (temperature 0.01)
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def clamped_logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of the cosine similarities, ``exp(min(log_scale, log 100))``: the one
    place the learned temperature is clamped (training, evaluation, ``AutoGLMModel.forward``)."""
    return log_scale.clamp(max=MAX_LOG_LOGIT_SCALE).exp()


def media_kwargs(batch: dict[str, Any]) -> dict[str, int]:
    """The towers' keyword arguments beside the media: the batch's sample rate (0: the media
    have none, as images), which the audio tower resamples from."""
    rate = int(batch["sample_rate"])
    return {"sample_rate": rate} if rate else {}


@dataclass
class Features:
    """One batch through the towers: what the objectives share."""

    media: torch.Tensor  # (B, E) normalised contrastive features of the media
    scale: torch.Tensor  # () clamped logit scale
    text: torch.Tensor | None = None  # (B, E) normalised contrastive features of the captions
    block: torch.Tensor | None = None  # (B, K + 2, C) the decoder's media block
    aux: list[torch.Tensor] = field(default_factory=list)  # MoE terms of the passes so far

    def similarity(self) -> torch.Tensor:
        """ITC logits ``(B, B)``: media rows, caption columns."""
        if self.text is None:
            raise ValueError("the text features were not computed (encode_batch(text=True))")
        return self.scale * self.media @ self.text.T


def encode_batch(
    model: AutoGLMModel, batch: dict[str, Any], *, text: bool = True, block: bool = False
) -> Features:
    """Run the media tower once (and the ITC text tower if ``text``); ``block`` adds the
    decoder's media block from the same tower pass."""
    modality, media = batch["modality"], batch["media"]
    kwargs = media_kwargs(batch)
    if block:
        features, media_block = model.encode_media_tokens(modality, media, **kwargs)
    else:
        features, media_block = model.encode_media(modality, media, **kwargs), None
    out = Features(features, clamped_logit_scale(model.logit_scale), block=media_block)
    if text:
        out.text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        out.aux.append(model.itc_text_tower.aux_loss())
    return out


@dataclass
class ObjectiveOutput:
    """An objective's unweighted loss, its metrics and the MoE terms of the passes it ran."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: torch.Tensor | None = None
