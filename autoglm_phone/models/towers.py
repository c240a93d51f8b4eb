"""Encoder towers with one contract.

Every tower takes raw media and exposes ``embed_dim``, ``forward_features(x) -> (B, N, D)`` tokens
and ``forward_head(tokens) -> (B, D)`` pooled, and ``forward(x) -> TowerOutput`` with both — the
timm method names — so tests and adapters loop over towers without special cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torchaudio
from einops import rearrange
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from autoglm_phone.config import AudioConfig, VisionConfig


@dataclass
class TowerOutput:
    tokens: torch.Tensor  # (B, N, D)
    pooled: torch.Tensor  # (B, D)


class VisionTower(nn.Module):
    """A timm ViT (ViT-tiny by default) over images in [0, 1]; normalisation is part of the model.

    Weights come only from ``cfg.pretrained_path`` (a local file): timm's own loader resamples
    position and patch embeddings when ``img_size`` / ``patch_size`` differ from the checkpoint.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kwargs = dict(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            drop_path_rate=cfg.drop_path_rate,
        )
        if cfg.depth is not None:
            kwargs["depth"] = cfg.depth
        if cfg.pretrained_path:
            kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_path, hf_hub_id=None, url=None)
        self.vit = timm.create_model(cfg.name, pretrained=bool(cfg.pretrained_path), **kwargs)
        self.embed_dim = self.vit.embed_dim
        data_cfg = timm.data.resolve_data_config({}, model=self.vit)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] (float) or uint8 -> all tokens ``(B, 1 + N, D)``."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.vit.forward_features((images - self.mean) / self.std)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(tokens, pre_logits=True)  # (B, D)

    def forward(self, images: torch.Tensor) -> TowerOutput:
        tokens = self.forward_features(images)
        n_prefix = self.vit.num_prefix_tokens
        return TowerOutput(tokens=tokens[:, n_prefix:], pooled=self.forward_head(tokens))


class LogMel(nn.Module):
    """Waveform -> log-mel ``(B, n_mels, frames)``, resampling inputs at other sample rates."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.sample_rate = cfg.sample_rate
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            power=2.0,
        )

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"audio must be (batch, samples) mono, got shape {tuple(wave.shape)}")
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = torchaudio.functional.resample(wave, sample_rate, self.sample_rate)
        return torch.log(self.mel(wave.float()) + 1e-6)  # (B, n_mels, frames)


def sinusoidal_positions(n: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sin/cos position table ``(n, dim)``: length-free, so any clip length works."""
    pos = torch.arange(n, device=device, dtype=torch.float)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class AudioTower(nn.Module):
    """Log-mel front end, 4x conv subsampling (as in Conformer/Whisper), timm transformer blocks."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.frontend = LogMel(cfg)
        self.subsample = nn.Sequential(
            nn.Conv2d(1, cfg.conv_channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(cfg.conv_channels, cfg.conv_channels, 3, stride=2, padding=1),
            nn.GELU(),
        )
        freq_out = math.ceil(math.ceil(cfg.n_mels / 2) / 2)
        self.proj = nn.Linear(cfg.conv_channels * freq_out, cfg.embed_dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.Sequential(
            *(TimmBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, drop_path=d) for d in dpr)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.input_norm = nn.BatchNorm1d(cfg.n_mels, affine=False)  # running log-mel statistics

    def forward_features(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Mono waveform ``(B, samples)`` -> tokens ``(B, frames / 4, D)``."""
        mel = self.input_norm(self.frontend(wave, sample_rate))  # (B, M, F)
        x = self.subsample(mel[:, None])  # (B, C, M / 4, F / 4)
        x = self.proj(rearrange(x, "b c m f -> b f (c m)"))  # (B, F / 4, D)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(1)  # (B, D)

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> TowerOutput:
        tokens = self.forward_features(wave, sample_rate)
        return TowerOutput(tokens=tokens, pooled=self.forward_head(tokens))
