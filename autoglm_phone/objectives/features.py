"""What every objective reads: one tower pass per batch, the contrastive temperature, the
batch's audio sample rate.

Resampling has one owner, the audio tower (:class:`~autoglm_phone.models.towers.AudioTower`):
the data bring every clip of a batch to one rate (``batch["sample_rate"]``, ``data.sample_rate``)
and every caller hands that rate to the tower with :func:`media_kwargs`, which resamples to
``model.audio.sample_rate`` when the two differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from autoglm_phone.losses.contrastive import clamped_logit_scale

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel

Batch = dict[str, Any]  # a collated batch (autoglm_phone/app/datamodule.py lists its keys)
Generator = torch.Generator | None  # seeded draws (evaluation), or the global RNG

# CLIP (Radford et al. 2021, Sec. 2.5) clips the learned logit scale at 100 (temperature 0.01)


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


class LabelledObjective:
    """An objective that ends in class logits with ``-100`` where a position has no label (ITM,
    MLM): subclasses give :meth:`targets` and their loss and accuracy functions."""

    name: str
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def targets(
        self, model: AutoGLMModel, batch: Batch, feats: Features, generator: Generator = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        logits, labels = self.targets(model, batch, feats)
        return ObjectiveOutput(
            self.loss_fn(logits, labels),
            {f"{self.name}_acc": self.accuracy_fn(logits, labels)},
            model.text.aux_loss(),  # the decoder pass that made the logits
        )
