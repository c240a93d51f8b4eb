"""Media from request bodies: base64 ``data:`` images and ``input_audio`` clips, checked and decoded.

Images: PNG, JPEG or WebP in a ``data:`` URI, at most :attr:`MediaLimits.max_image_pixels`
(checked from the header before the pixels are decoded), then the training path's
:func:`~autoglm_phone.data.decode.decode_image` (EXIF, alpha, shorter side to the model's size,
centre crop). Audio: WAV, FLAC, OGG or MP3 (libsndfile), at most
:attr:`MediaLimits.max_audio_seconds`, then :func:`~autoglm_phone.data.decode.decode_audio`
(mono, resampled, cropped or padded to the model's clip). ``http(s)`` URLs are refused: the server
never fetches anything. Every refusal is a 400 :class:`~autoglm_phone.serve.errors.APIError`
naming the request field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import soundfile as sf
import torch
from PIL import Image, UnidentifiedImageError

from autoglm_phone.data.decode import SampleError, decode_audio, decode_image
from autoglm_phone.serve.errors import invalid

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}  # PIL's name -> MIME subtype
AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}  # request -> libsndfile
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.I)


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 30.0
    max_media: int = 8  # images + audio clips per request


@dataclass(frozen=True)
class MediaSpec:
    """What the model takes: square images of ``image_size`` px, clips of ``num_samples`` at
    ``sample_rate``."""

    image_size: int
    sample_rate: int
    num_samples: int


def b64decode(text: str, param: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("not valid base64", param, "invalid_base64") from None
    if not data:
        raise invalid("empty media data", param, "invalid_base64")
    return data


def image_bytes(url: str, param: str) -> bytes:
    """The encoded bytes of an ``image_url``: a base64 ``data:`` URI only."""
    if re.match(r"https?://", url, re.I):
        raise invalid(
            "image URLs are not fetched by this server; send the image as a base64 data: URI",
            param,
            "url_not_allowed",
        )
    m = _DATA_URI.match(url)
    if m is None:
        raise invalid("expected a data:image/...;base64, URI", param, "invalid_image_url")
    return b64decode(url[m.end() :], param)


def load_image(url: str, spec: MediaSpec, limits: MediaLimits, param: str) -> torch.Tensor:
    """uint8 ``(3, S, S)`` from an ``image_url``."""
    data = image_bytes(url, param)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (w, h) = img.format, img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise invalid("the data is not a PNG, JPEG or WebP image", param, "invalid_image") from None
    if fmt not in IMAGE_FORMATS:
        raise invalid(
            f"unsupported image format {fmt}; expected PNG, JPEG or WebP", param, "invalid_image"
        )
    if w * h > limits.max_image_pixels:
        raise invalid(
            f"the image is {w}x{h} = {w * h:,} pixels, over the {limits.max_image_pixels:,} limit",
            param,
            "image_too_large",
        )
    try:
        return decode_image(data, spec.image_size, name="image")
    except SampleError:
        raise invalid("the image data is corrupt", param, "invalid_image") from None


def load_audio(
    data_b64: str, fmt: str, spec: MediaSpec, limits: MediaLimits, param: str
) -> torch.Tensor:
    """float32 mono ``(num_samples,)`` from ``input_audio`` ``data`` + ``format``."""
    if fmt not in AUDIO_FORMATS:
        raise invalid(
            f"unsupported audio format {fmt!r}; expected one of {', '.join(AUDIO_FORMATS)}",
            f"{param}.format",
            "invalid_audio_format",
        )
    data = b64decode(data_b64, f"{param}.data")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError):
        raise invalid(f"the data is not {fmt} audio", f"{param}.data", "invalid_audio") from None
    if info.format != AUDIO_FORMATS[fmt]:
        raise invalid(
            f"format is {fmt!r} but the data is {info.format.lower()}",
            f"{param}.format",
            "invalid_audio",
        )
    if info.duration > limits.max_audio_seconds:
        raise invalid(
            f"the clip is {info.duration:.1f} s, over the {limits.max_audio_seconds:g} s limit",
            f"{param}.data",
            "audio_too_long",
        )
    try:
        return decode_audio(data, spec.sample_rate, spec.num_samples, name="audio")
    except SampleError:
        raise invalid(f"the {fmt} data is corrupt", f"{param}.data", "invalid_audio") from None
