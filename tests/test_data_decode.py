"""Decoding real-format files: every image mode to RGB, every audio format to mono at one rate."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from datafixtures import AUDIO_KINDS, IMAGE_KINDS, truncate, write_audio, write_image
from PIL import Image

from autoglm_phone.data.decode import SampleError, decode_audio, decode_image, normalize_caption

RED = (220, 30, 30)


@pytest.mark.parametrize(
    "suffix, fmt, mode", IMAGE_KINDS, ids=[f"{f}-{m}" for _, f, m in IMAGE_KINDS]
)
def test_every_image_mode_decodes_to_rgb(suffix, fmt, mode, tmp_path):
    path = write_image(tmp_path / f"x{suffix}", fmt, mode, RED, size=(40, 24))
    assert Image.open(path).mode.startswith(mode[:2]) or mode == "RGBA"  # really saved that way
    img = decode_image(path, 16)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    centre = img[:, 12, 8].int()  # below the darker top band
    if mode in ("L", "LA", "I;16"):  # grey: luma of the red, equal channels
        luma = round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])
        assert (centre - luma).abs().max() <= 3, centre
    else:
        assert (centre - torch.tensor(RED)).abs().max() <= 40, centre  # lossy formats, CMYK
        assert centre[0] > 150 and centre[1] < 100 and centre[2] < 100
    assert img[:, 0, 8].int().sum() < centre.sum()  # the top band stays darker after the crop


def test_sixteen_bit_scales_and_alpha_goes_on_white(tmp_path):
    grey = np.array([[0, 32896, 65535, 65535]], np.uint16).repeat(4, 0)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png", 4)
    assert out[0, 0].tolist()[:1] == [0] and out[0, 0].max() == 255
    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    la.save(tmp_path / "t.png")
    assert decode_image(tmp_path / "t.png", 8).min() == 255  # composited over white


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8)  # wide, left third red
    a[:, :10] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = decode_image(tmp_path / "r.jpg", 20)  # displayed tall (20 x 30): red on top
    assert img[0, 1, 10] > 150 and img[0, 18, 10] < 100


def test_bad_images_raise_sample_errors_naming_the_file(tmp_path):
    jpg = truncate(write_image(tmp_path / "t.jpg", "JPEG", "RGB", size=(64, 64)), 0.3)
    png = truncate(write_image(tmp_path / "t.png", "PNG", "RGB", size=(64, 64)), 0.5)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not an image")
    for path in (jpg, png, tmp_path / "junk.png"):
        with pytest.raises(SampleError, match=path.name) as e:
            decode_image(path, 16)
        assert e.value.reason == "corrupt_image"
    with pytest.raises(SampleError, match="nope.jpg") as e:
        decode_image(tmp_path / "nope.jpg", 16)
    assert e.value.reason == "missing_file"


@pytest.mark.parametrize(
    "suffix, fmt, subtype, sr, channels",
    AUDIO_KINDS,
    ids=[f"{f}-{sr}-{c}ch" for _, f, _, sr, c in AUDIO_KINDS],
)
def test_every_audio_format_decodes_to_mono_at_the_model_rate(
    suffix, fmt, subtype, sr, channels, tmp_path
):
    path = write_audio(tmp_path / f"a{suffix}", fmt, subtype, sr, channels, hz=440.0, seconds=0.5)
    assert sf.info(path).samplerate == sr and sf.info(path).channels == channels
    wave = decode_audio(path, 16000, 12000)  # 0.75 s: 0.5 s of tone, then zero padding
    assert wave.shape == (12000,) and wave.dtype == torch.float32
    tone = wave[1000:7000].numpy()
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone))))
    peak_hz = np.argmax(spectrum) * 16000 / len(tone)
    assert abs(peak_hz - 440) < 10, peak_hz
    assert 0.3 < np.abs(tone).max() < 0.5  # channels averaged, not summed
    assert wave[9000:].abs().max() < 1e-3  # padded with silence


def test_audio_is_cropped_and_channels_averaged(tmp_path):
    sr = 8000
    left = np.full(sr, 0.5, np.float32)
    sf.write(tmp_path / "s.wav", np.stack([left, -0.5 * left], 1), sr, subtype="FLOAT")
    wave = decode_audio(tmp_path / "s.wav", sr, 100)
    assert wave.shape == (100,) and torch.allclose(wave, torch.full((100,), 0.125))


def test_bad_audio_raises_sample_errors(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "junk.flac").write_bytes(b"fLaC but nothing else")
    cases = {
        "empty.wav": "empty_audio",
        "junk.flac": "unreadable_audio",
        "gone.ogg": "missing_file",
    }
    for name, reason in cases.items():
        with pytest.raises(SampleError, match=name) as e:
            decode_audio(tmp_path / name, 16000, 100)
        assert e.value.reason == reason


def test_decoding_from_bytes_names_the_member():
    with pytest.raises(SampleError, match=r"shard-0\.tar:k\.png"):
        decode_image(b"garbage", 8, name="shard-0.tar:k.png")


def test_captions_are_normalised():
    assert normalize_caption("  Two\tdogs\n\n on  a ﬁeld \u200b") == "Two dogs on a field"
    assert normalize_caption("\u00a0 \r\n") == ""
    assert normalize_caption("Ｆｕｌｌｗｉｄｔｈ") == "Fullwidth"


def test_cropping_before_resampling_matches_resampling_the_whole_clip(tmp_path):
    path = write_audio(tmp_path / "a.flac", "FLAC", "PCM_24", 44100, 2, hz=1234.0, seconds=1.0)
    whole = decode_audio(path, 16000, 16000)
    short = decode_audio(path, 16000, 4000)  # reads ~0.25 s of the file
    assert torch.allclose(short, whole[:4000], atol=1e-4)
