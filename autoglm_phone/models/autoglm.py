"""AutoGLMModel: vision and audio towers, the GLM decoder as text tower, and a shared space.

``forward`` returns a dict whose keys are the contrastive loss's arguments (open_clip style),
so the training glue is one line: ``loss(**model(batch))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.models.adapters import LowRankProjection
from autoglm_phone.models.glm import AttentionMode, GLMDecoder
from autoglm_phone.models.towers import AudioTower, VisionTower

MODALITIES = ("image", "audio")


class AutoGLMModel(nn.Module):
    def __init__(self, cfg: MultiModalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.audio = AudioTower(cfg.audio)
        self.text = GLMDecoder(cfg.text)
        r, e = cfg.proj_rank, cfg.embed_dim
        self.vision_proj = LowRankProjection(self.vision.embed_dim, e, r)
        self.audio_proj = LowRankProjection(self.audio.embed_dim, e, r)
        self.text_proj = LowRankProjection(self.text.embed_dim, e, r)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.vision_proj(self.vision(images).pooled)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_audio(
        self, wave: torch.Tensor, sample_rate: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        z = self.audio_proj(self.audio(wave, sample_rate).pooled)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        hidden = self.text.forward_features(
            input_ids, attention_mask, mode=AttentionMode.BIDIRECTIONAL
        )  # (B, T, C)
        z = self.text_proj(self.text.forward_head(hidden, attention_mask, self.cfg.text_pool))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_media(self, modality: str, media: torch.Tensor, **kwargs) -> torch.Tensor:
        if modality == "image":
            return self.encode_image(media, **kwargs)
        if modality == "audio":
            return self.encode_audio(media, **kwargs)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def forward(
        self,
        modality: str,
        media: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Features for a contrastive loss: ``image_features`` are the media side (any modality)."""
        return {
            "image_features": self.encode_media(modality, media),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp(),
        }
