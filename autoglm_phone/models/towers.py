"""Encoder towers with one contract.

Every tower takes raw media and exposes ``embed_dim``, ``forward_features(x) -> (B, N, D)`` tokens
and ``forward_head(tokens) -> (B, D)`` pooled, and ``forward(x) -> TowerOutput`` with both — the
timm method names — so tests and adapters loop over towers without special cases.

The audio front end reproduces torchaudio's ``MelSpectrogram`` and ``resample`` (parity-tested)
and also runs on a live stream, chunk by chunk, with the same output (docs/AUDIO.md). For export
it also has a form without complex numbers, :meth:`LogMel.dft_logmel` (docs/EXPORT.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
import torchaudio
from einops import rearrange
from timm.layers import HybridEmbed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer_hybrid import ConvStem
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
        if cfg.stem == "conv":
            kwargs.update(embed_layer=conv_stem(cfg.patch_size), patch_size=1)
        if cfg.pretrained_path:
            kwargs["pretrained_cfg_overlay"] = dict(
                file=cfg.pretrained_path, hf_hub_id=None, url=None
            )
        self.vit = timm.create_model(cfg.name, pretrained=bool(cfg.pretrained_path), **kwargs)
        self.embed_dim = self.vit.embed_dim
        data_cfg = timm.data.resolve_data_config({}, model=self.vit)
        self.register_buffer(
            "mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False
        )

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


def conv_stem(stride: int) -> Callable[..., nn.Module]:
    """A timm ``embed_layer`` that patchifies by convolution: ``log2(stride)`` 3x3 stride-2
    convolutions (BN + ReLU between them) widening 24 -> 48 -> ... channels, then HybridEmbed's
    1x1 projection to the ViT width (Xiao et al. 2021). Trained from scratch on the embedded
    images it learns every attribute faster than the linear 16x16 patchify and lifts ITC
    retrieval several-fold (docs/LOG.md, ``bench/vision_stem.py``)."""
    depth = int(math.log2(stride))
    channels = tuple(min(192, 24 * 2**i) for i in range(depth))
    return functools.partial(
        HybridEmbed, backbone=ConvStem(depth=depth, channels=channels, stride=(2,) * depth)
    )


def check_wave(wave: torch.Tensor) -> torch.Tensor:
    """Validate a mono batch ``(B, samples)`` of floating-point samples; return it as float32."""
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor, got {type(wave).__name__}")
    if wave.dim() != 2:
        raise ValueError(
            f"audio must be (batch, samples) mono, got shape {tuple(wave.shape)}; "
            "mix or pick channels first"
        )
    if not wave.is_floating_point():
        raise TypeError(
            f"audio must be floating-point samples in [-1, 1], got {wave.dtype}; "
            "convert 16-bit PCM with wave.float() / 32768"
        )
    if wave.shape[1] == 0:
        raise ValueError(f"audio is empty: shape {tuple(wave.shape)}")
    return wave.float()


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    return int(sample_rate)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig_freq: int, new_freq: int) -> tuple[torch.Tensor, int, int, int]:
    """torchaudio's windowed-sinc kernel ``(new, 1, 2 * width + orig)`` for the reduced rates."""
    rs = torchaudio.transforms.Resample(orig_freq, new_freq, dtype=torch.float64)
    g = math.gcd(orig_freq, new_freq)
    return rs.kernel, rs.width, orig_freq // g, new_freq // g


def _polyphase(padded: torch.Tensor, kernel: torch.Tensor, orig: int) -> torch.Tensor:
    """Block ``i`` of ``new`` outputs reads ``padded[:, i * orig : i * orig + kernel_len]``.

    Runs in float64: a float32 matmul rounds differently for different numbers of blocks, which
    would make a stream of small chunks differ from the offline pass in the last bits.
    """
    windows = padded.double().unfold(-1, kernel.shape[-1], orig)  # (B, blocks, kernel_len)
    out = windows @ kernel.to(windows.device)[:, 0].T  # (B, blocks, new)
    return rearrange(out, "b n p -> b (n p)").to(padded.dtype)  # (B, blocks * new), time order


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """``torchaudio.functional.resample`` with its defaults (Hann-windowed sinc, width 6).

    Same padding, kernel and output length as torchaudio, with the kernel built and applied in
    float64 (torchaudio's float32 forms are ~1e-6 off that), run by :func:`_polyphase` so that
    :class:`StreamingResample` shares the arithmetic. ``wave`` is ``(B, n)`` float.
    """
    if orig_freq == new_freq:
        return wave
    kernel, width, orig, new = _sinc_kernel(orig_freq, new_freq)
    out = _polyphase(F.pad(wave, (width, width + orig)), kernel, orig)
    return out[:, : math.ceil(new * wave.shape[1] / orig)]


class StreamingResample:
    """:func:`resample` fed in chunks, with the unread input carried between chunks.

    The offline resampler zero-pads ``width`` samples on the left and ``width + orig`` on the
    right; output block ``i`` needs padded input ``[i * orig, i * orig + 2 * width + orig)``.
    ``push`` emits every block whose input has arrived; ``flush`` appends the right zeros, emits
    the rest and trims to torchaudio's ``ceil(new * n / orig)`` samples, then resets. Latency:
    ``width + orig`` input samples (1 ms at 8 -> 16 kHz, 10 ms at 44.1 -> 16 kHz).
    """

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        self.orig_freq, self.new_freq = _check_rate(orig_freq), _check_rate(new_freq)
        self.kernel, self.width, self.orig, self.new = _sinc_kernel(self.orig_freq, self.new_freq)
        self.reset()

    def reset(self) -> None:
        self._buf: torch.Tensor | None = None  # (B, k) padded input from the next block's start
        self._n_in = 0
        self._n_out = 0

    def _emit(self) -> torch.Tensor:
        k = self.kernel.shape[-1]
        blocks = max(0, (self._buf.shape[1] - k) // self.orig + 1)
        out = _polyphase(self._buf[:, : (blocks - 1) * self.orig + k], self.kernel, self.orig)
        self._buf = self._buf[:, blocks * self.orig :]
        return out[:, : blocks * self.new]  # (B, blocks * new)

    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """Chunk ``(B, n)`` at ``orig_freq`` -> the new samples ``(B, m)`` at ``new_freq``."""
        chunk = check_wave(chunk)
        if self._buf is None:
            self._buf = chunk.new_zeros(chunk.shape[0], self.width)  # torchaudio's left zeros
        elif chunk.shape[0] != self._buf.shape[0]:
            raise ValueError(
                f"batch size changed mid-stream: {self._buf.shape[0]} -> {chunk.shape[0]}"
            )
        self._n_in += chunk.shape[1]
        self._buf = torch.cat([self._buf, chunk], dim=1)
        if self._buf.shape[1] < self.kernel.shape[-1]:
            return chunk.new_zeros(chunk.shape[0], 0)
        out = self._emit()
        self._n_out += out.shape[1]
        return out

    def flush(self) -> torch.Tensor:
        """The remaining samples ``(B, m)``; the stream is then reset for the next signal."""
        if self._buf is None:
            raise ValueError("flush() before any push(): nothing to resample")
        self._buf = F.pad(self._buf, (0, self.width + self.orig))  # torchaudio's right zeros
        total = math.ceil(self.new * self._n_in / self.orig)
        out = self._emit()[:, : total - self._n_out]
        self.reset()
        return out


class LogMel(nn.Module):
    """Waveform -> log-mel ``(B, n_mels, frames)``, resampling inputs at other sample rates.

    Follows torchaudio's ``MelSpectrogram`` defaults exactly (``self.mel`` holds its Hann window
    and HTK filterbank and is the parity reference): power spectrum of centred frames, i.e.
    ``center=True`` with reflect padding of ``n_fft // 2`` samples at both ends, so frame ``t``
    covers samples ``[t * hop - n_fft // 2, t * hop - n_fft // 2 + n_fft)`` and a clip of ``n``
    samples gives ``1 + (n + 2 * (n_fft // 2) - n_fft) // hop`` frames. The spectrum is computed
    from explicit frames by :meth:`frames_to_logmel`, which :class:`StreamingLogMel` shares, so a
    stream equals the offline result frame for frame.
    """

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.sample_rate = cfg.sample_rate
        self.n_fft, self.hop_length, self.n_mels = cfg.n_fft, cfg.hop_length, cfg.n_mels
        self.pad = cfg.n_fft // 2
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            power=2.0,
        )

        # (2 * (n_fft // 2 + 1), n_fft): the real DFT's cos rows, then its -sin rows
        self.register_buffer("dft", dft_basis(cfg.n_fft), persistent=False)

    def frames_to_logmel(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(B, F, n_fft)`` -> log-mel ``(B, n_mels, F)``."""
        window = self.mel.spectrogram.window
        power = torch.fft.rfft(frames * window).abs().pow(2)  # (B, F, n_fft // 2 + 1)
        mel = power @ self.mel.mel_scale.fb  # (B, F, n_mels)
        return rearrange(torch.log(mel + 1e-6), "b f m -> b m f")

    def dft_logmel(self, wave: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` at the model's rate as real arithmetic only, for export: each centred
        frame times the window-weighted real DFT basis (a ``linear``, i.e. a strided conv1d)
        gives its real and imaginary parts (ExecuTorch lowers no complex ``abs``; XNNPACK
        delegates the ``linear``, not a 400-wide ``conv1d``). Float32 rounding differs from
        ``rfft``'s: ~1e-5 on noise-like clips; both are ~1e-3 from float64 on a pure tone, where
        bands sit near the 1e-6 floor (docs/AUDIO.md). Eager keeps ``rfft``, 1.4-1.7x faster."""
        kernel = self.dft * self.mel.spectrogram.window  # (2K, n_fft)
        padded = F.pad(wave[:, None], (self.pad, self.pad), mode="reflect")[:, 0]  # (B, n + 2p)
        frames = padded.unfold(-1, self.n_fft, self.hop_length)  # (B, F, n_fft)
        real, imag = F.linear(frames, kernel.to(frames.dtype)).chunk(2, dim=-1)  # (B, F, K) each
        mel = (real.square() + imag.square()) @ self.mel.mel_scale.fb  # (B, F, n_mels)
        return rearrange(torch.log(mel + 1e-6), "b f m -> b m f")  # (B, n_mels, F)

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        wave = check_wave(wave)
        if sample_rate is not None:
            wave = resample(wave, _check_rate(sample_rate), self.sample_rate)
        if wave.shape[1] <= self.pad:
            raise ValueError(
                f"audio too short: {wave.shape[1]} samples at {self.sample_rate} Hz; centred "
                f"frames need more than n_fft // 2 = {self.pad}"
            )
        padded = F.pad(wave[:, None], (self.pad, self.pad), mode="reflect")[:, 0]  # (B, n + 2p)
        frames = padded.unfold(-1, self.n_fft, self.hop_length)  # (B, F, n_fft), a view
        return self.frames_to_logmel(frames)

    def stream(self, sample_rate: int | None = None) -> StreamingLogMel:
        """A chunked front end equal to this one on the whole signal (see :class:`StreamingLogMel`)."""
        return StreamingLogMel(self, sample_rate)


def dft_basis(n_fft: int) -> torch.Tensor:
    """The real DFT as a matrix ``(2 * (n_fft // 2 + 1), n_fft)``: ``cos(2 pi k n / N)`` rows,
    then ``-sin`` rows, so ``basis @ frame`` is ``rfft(frame)``'s real and imaginary parts.
    Built in float64 with ``k n`` reduced mod ``N`` (exact angles), then rounded once."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * torch.remainder(k * n, n_fft) / n_fft  # (K, N)
    return torch.cat([angle.cos(), -angle.sin()]).float()


class StreamingLogMel:
    """:class:`LogMel` fed in chunks: ``push(chunk (B, n)) -> (B, n_mels, f)`` new frames.

    Concatenating every ``push`` and the final ``flush`` gives ``LogMel`` on the whole signal.
    Centred framing is kept: the left reflection needs samples ``1 .. n_fft // 2``, so nothing
    comes out before ``n_fft // 2 + 1`` samples have arrived; after that frame ``t`` is emitted as
    soon as its last sample has arrived (``n_fft - n_fft // 2`` samples past its centre, 12.5 ms
    at the defaults). Only the right edge waits for ``flush()``, which reflects the last samples
    exactly as offline padding does, returns the remaining frames and resets the stream. Inputs
    at another ``sample_rate`` pass through a :class:`StreamingResample` first.
    """

    def __init__(self, logmel: LogMel, sample_rate: int | None = None) -> None:
        if logmel.hop_length > logmel.n_fft:
            raise ValueError("streaming needs hop_length <= n_fft (frames that cover the signal)")
        self.logmel = logmel
        rate = logmel.sample_rate if sample_rate is None else _check_rate(sample_rate)
        self.resampler = (
            None if rate == logmel.sample_rate else StreamingResample(rate, logmel.sample_rate)
        )
        self.reset()

    def reset(self) -> None:
        if self.resampler is not None:
            self.resampler.reset()
        self._batch: int | None = None
        self._head: torch.Tensor | None = None  # (B, k) samples before the left edge is known
        self._buf: torch.Tensor | None = None  # (B, k) padded signal from the next frame's start
        self._tail: torch.Tensor | None = None  # (B, <= pad + 1) last samples, for the right edge

    def _frames(self, like: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.logmel.n_fft, self.logmel.hop_length
        count = max(0, (self._buf.shape[1] - n_fft) // hop + 1)
        if count == 0:
            return like.new_zeros(like.shape[0], self.logmel.n_mels, 0)
        frames = self._buf[:, : (count - 1) * hop + n_fft].unfold(-1, n_fft, hop)  # (B, f, n_fft)
        self._buf = self._buf[:, count * hop :]
        return self.logmel.frames_to_logmel(frames)  # (B, n_mels, f)

    def _feed(self, x: torch.Tensor) -> torch.Tensor:
        """Append model-rate samples ``(B, k)``; return the frames they complete."""
        pad = self.logmel.pad
        self._tail = x if self._tail is None else torch.cat([self._tail, x], dim=1)
        self._tail = self._tail[:, -(pad + 1) :]
        if self._buf is None:
            self._head = x if self._head is None else torch.cat([self._head, x], dim=1)
            if self._head.shape[1] <= pad:
                return x.new_zeros(x.shape[0], self.logmel.n_mels, 0)
            left = self._head[:, 1 : pad + 1].flip(-1)  # reflect: x[pad], ..., x[1]
            self._buf, self._head = torch.cat([left, self._head], dim=1), None
        else:
            self._buf = torch.cat([self._buf, x], dim=1)
        return self._frames(x)

    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """Mono chunk ``(B, n)``, any ``n >= 1`` -> the frames it completes ``(B, n_mels, f)``."""
        chunk = check_wave(chunk)
        if self._batch is None:
            self._batch = chunk.shape[0]
        elif chunk.shape[0] != self._batch:
            raise ValueError(f"batch size changed mid-stream: {self._batch} -> {chunk.shape[0]}")
        if self.resampler is not None:
            chunk = self.resampler.push(chunk)
        return self._feed(chunk)

    def flush(self) -> torch.Tensor:
        """The remaining frames ``(B, n_mels, f)``, right edge reflected; then resets the stream."""
        if self._batch is None:
            raise ValueError("flush() before any push(): the stream is empty")
        frames = []
        if self.resampler is not None:
            frames.append(self._feed(self.resampler.flush()))
        if self._buf is None:
            n = 0 if self._head is None else self._head.shape[1]
            self.reset()
            raise ValueError(
                f"audio too short: {n} samples at {self.logmel.sample_rate} Hz; centred "
                f"frames need more than n_fft // 2 = {self.logmel.pad}"
            )
        right = self._tail[:, :-1].flip(-1)  # reflect: x[n - 2], ..., x[n - 1 - pad]
        self._buf = torch.cat([self._buf, right], dim=1)
        frames.append(self._frames(right))
        self.reset()
        return torch.cat(frames, dim=-1)


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
        if torch.get_default_device().type == "meta":
            # torchaudio computes the mel filterbank eagerly, which meta tensors cannot: build
            # the (small) front end for real, then drop its storage; the blocks stay on meta.
            with torch.device("cpu"):
                self.frontend = LogMel(cfg)
            self.frontend.to("meta")
        else:
            self.frontend = LogMel(cfg)
        self.subsample = nn.Sequential(
            nn.Conv2d(1, cfg.conv_channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(cfg.conv_channels, cfg.conv_channels, 3, stride=2, padding=1),
            nn.GELU(),
        )
        freq_out = math.ceil(math.ceil(cfg.n_mels / 2) / 2)
        self.proj = nn.Linear(cfg.conv_channels * freq_out, cfg.embed_dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *(
                TimmBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, drop_path=d)
                for d in dpr
            )
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.input_norm = nn.BatchNorm1d(cfg.n_mels, affine=False)  # running log-mel statistics

    def forward_features(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Mono waveform ``(B, samples)`` -> tokens ``(B, frames / 4, D)``."""
        return self.forward_mel(self.frontend(wave, sample_rate))

    def forward_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, n_mels, frames)``, e.g. collected from ``frontend.stream()`` -> tokens."""
        mel = self.input_norm(mel)  # (B, M, F)
        x = self.subsample(mel[:, None])  # (B, C, M / 4, F / 4)
        x = self.proj(rearrange(x, "b c m f -> b f (c m)"))  # (B, F / 4, D)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(1)  # (B, D)

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> TowerOutput:
        tokens = self.forward_features(wave, sample_rate)
        return TowerOutput(tokens=tokens, pooled=self.forward_head(tokens))
