"""Decode one sample's media and caption into the tensors the model takes, or say why not.

- Images of any format and mode PIL opens (JPEG, PNG, WebP, GIF, TIFF, BMP; palette, L, LA, RGBA,
  CMYK, 16-bit, float) become uint8 RGB ``(3, S, S)``: EXIF orientation applied, alpha composited
  over white, the shorter side resized to ``S`` and the centre cropped.
- Audio that libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3 with libsndfile >= 1.1) becomes
  float32 mono ``(T,)`` at a target rate: channels averaged, resampled with torchaudio's
  band-limited sinc, then cropped to its start or zero-padded at the end to exactly ``T`` samples,
  so every clip of a batch has the same rate and length. Only the frames that survive the crop are
  decoded.
- Captions are NFKC-normalised with whitespace runs collapsed to one space and the ends stripped.

Media are read from regular files only (no pipes or devices), at most ``max_bytes`` each, with a
suffix from :data:`IMAGE_SUFFIXES` / :data:`AUDIO_SUFFIXES`: the one list of formats every reader
(file sources, shards) and the shard converter share.

Every failure is a :class:`SampleError` with a ``reason`` from :data:`REASONS` and a message that
names the file.
"""

from __future__ import annotations

import io
import math
import os
import stat
import unicodedata
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from PIL import Image, ImageOps, UnidentifiedImageError

# Why a sample was skipped; every SampleError carries one of these.
REASONS = (
    "malformed_row",  # a row the reader could not parse, or with no media path
    "empty_caption",  # no text left after normalisation
    "missing_file",  # the media path does not exist
    "corrupt_image",  # PIL cannot identify or fully decode it (truncated, garbage, bad mode)
    "unreadable_audio",  # libsndfile cannot decode it, or it holds non-finite samples
    "empty_audio",  # decodes to zero samples
    "outside_root",  # a media path that leaves the data root (data.allow_outside_root=false)
    "bad_file",  # not a regular file (pipe, device, folder), or over the size limit
    "unsupported_format",  # a media suffix outside IMAGE_SUFFIXES / AUDIO_SUFFIXES
)

# The supported media formats, by file suffix (lower case, no dot): PIL and libsndfile decode
# these; shards store media under the same suffixes.
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
AUDIO_SUFFIXES = ("wav", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff")
MEDIA_SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES}
MAX_FILE_BYTES = 256 * 2**20  # default size limit of one media file (data.max_file_mb=256)

Source = str | Path | bytes
RESAMPLE_MARGIN = 256  # input frames read past the crop so its last samples resample exactly


class SampleError(Exception):
    """One bad sample: ``reason`` is one of :data:`REASONS`; the message names the file."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _name(src: Source, name: str | None) -> str:
    return name or ("<bytes>" if isinstance(src, bytes) else str(src))


def check_media_file(path: str | Path, modality: str, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Raise :class:`SampleError` unless ``path`` is a regular file of at most ``max_bytes`` with
    a supported ``modality`` suffix (checked before opening: a pipe would block, a device never
    ends)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in MEDIA_SUFFIXES[modality]:
        raise SampleError(
            "unsupported_format",
            f"{path}: {modality} suffix {suffix or '(none)'!r} is not one of "
            f"{', '.join(MEDIA_SUFFIXES[modality])}",
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SampleError("missing_file", f"{path} does not exist") from None
    except OSError as e:
        raise SampleError("bad_file", f"{path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise SampleError("bad_file", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise SampleError(
            "bad_file",
            f"{path} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit (data.max_file_mb)",
        )


def read_media_file(path: str | Path, modality: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a checked media file (see :func:`check_media_file`); at most ``max_bytes``
    are read even if the file grows meanwhile."""
    check_media_file(path, modality, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SampleError("bad_file", f"{path}: {e.strerror}") from e
    if len(data) > max_bytes:
        raise SampleError("bad_file", f"{path} grew over the {max_bytes:,}-byte limit")
    return data


def _open(src: Source, name: str | None, modality: str, max_bytes: int):
    if isinstance(src, bytes):
        return io.BytesIO(src)
    check_media_file(src, modality, max_bytes)
    return src


# ---------------------------------------------------------------- captions
def normalize_caption(text: str) -> str:
    """NFKC, whitespace (and control characters) collapsed to single spaces, ends stripped."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return " ".join(text.split())


# ---------------------------------------------------------------- images
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. 16/32-bit and float greys are scaled to 8 bits, alpha goes on white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0  # float image in [0, 1]
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    src: Source, size: int, name: str | None = None, max_bytes: int = MAX_FILE_BYTES
) -> torch.Tensor:
    """A file path or encoded bytes to uint8 ``(3, size, size)`` (see the module docstring)."""
    fp = _open(src, name, "image", max_bytes)
    try:
        with Image.open(fp) as img:
            w, h = img.size
            if min(w, h) > 2 * size:  # JPEG: decode at 1/2..1/8 scale, shorter side still >= size
                img.draft(None, (-(-w * size // min(w, h)), -(-h * size // min(w, h))))
            img.load()  # full decode now: truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except SampleError:
        raise
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as e:
        raise SampleError("corrupt_image", f"{_name(src, name)}: {e}") from e
    w, h = rgb.size
    if w == 0 or h == 0:
        raise SampleError("corrupt_image", f"{_name(src, name)}: empty image {w}x{h}")
    rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC)  # shorter side, centre crop
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


# ---------------------------------------------------------------- audio
def decode_audio(
    src: Source,
    sample_rate: int,
    num_samples: int,
    name: str | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> torch.Tensor:
    """A file path or encoded bytes to float32 mono ``(num_samples,)`` at ``sample_rate``."""
    fp = _open(src, name, "audio", max_bytes)
    try:
        with sf.SoundFile(fp) as f:
            rate = f.samplerate
            # only what survives the crop, plus a margin for the resampling filter
            need = math.ceil(num_samples * rate / sample_rate) + RESAMPLE_MARGIN
            data = f.read(frames=need, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise SampleError("unreadable_audio", f"{_name(src, name)}: {e}") from e
    if data.shape[0] == 0:
        raise SampleError("empty_audio", f"{_name(src, name)} has no samples")
    if not np.isfinite(data).all():
        raise SampleError("unreadable_audio", f"{_name(src, name)} holds NaN or inf samples")
    wave = torch.from_numpy(data.mean(axis=1))  # (T,) mono
    if rate != sample_rate:
        wave = AF.resample(wave, int(rate), int(sample_rate))
    if wave.shape[0] >= num_samples:
        return wave[:num_samples].contiguous()
    return torch.nn.functional.pad(wave, (0, num_samples - wave.shape[0]))
