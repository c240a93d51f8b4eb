"""Tests for the procedurally generated default dataset (autoglm_phone.data.synthetic)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm_phone.data import synthetic as syn
from autoglm_phone.data.synthetic import (
    SyntheticDataset,
    SyntheticSpec,
    build_synthetic,
    load_split,
    num_distinct_captions,
    parse_caption,
)

SMALL = {
    "num_train": 40,
    "num_val": 8,
    "num_test": 8,
    "num_av_train": 8,
    "num_av_val": 8,
    "num_av_test": 8,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic(SyntheticSpec(**SMALL), tmp_path_factory.mktemp("cache"), progress=False)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- analysis helpers
def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _analyse_image(image: np.ndarray) -> dict:
    pixels = image.astype(np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    strength = distance.max()  # distance of a fully covered object pixel
    mask = distance > 0.5 * strength
    core = distance > 0.8 * strength
    objects = [c for c in _components(mask) if len(c) >= 4]
    ys, xs = np.nonzero(mask)
    size = image.shape[0]
    return {
        "count": len(objects),
        "areas": [len(c) for c in objects],
        "colour": pixels[core].mean(axis=0),
        "centroid": ((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size),
    }


def _nearest(value: np.ndarray, table: dict) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(value - np.asarray(table[k]))))


def _beep_count(audio: np.ndarray, sample_rate: int) -> int:
    """Onsets of a 10 ms peak envelope, with hysteresis (on above 50 %, re-armed below 15 %)."""
    frame = int(0.01 * sample_rate)
    x = np.abs(audio.astype(np.float64))
    envelope = x[: len(x) // frame * frame].reshape(-1, frame).max(axis=1)
    envelope /= envelope.max()
    onsets, armed = 0, True
    for value in envelope:
        if armed and value > 0.5:
            onsets, armed = onsets + 1, False
        elif value < 0.15:
            armed = True
    return onsets


def _dominant_hz(audio: np.ndarray, sample_rate: int, n_fft: int | None = None) -> float:
    n = n_fft or len(audio)
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64) * np.hanning(len(audio)), n))
    return float(np.fft.rfftfreq(n, 1.0 / sample_rate)[np.argmax(spectrum)])


def _sweep_ratio(audio: np.ndarray, sample_rate: int) -> float:
    """Dominant frequency of the last third of the first beep over that of its first third."""
    x = audio.astype(np.float64)
    frame = int(0.01 * sample_rate)
    envelope = np.abs(x[: len(x) // frame * frame]).reshape(-1, frame).max(axis=1)
    above = envelope > 0.2 * envelope.max()
    start = int(np.argmax(above))
    end = start + int(np.argmax(~above[start:]))
    a, b = start * frame, end * frame
    third = (b - a) // 3
    return _dominant_hz(x[b - third : b], sample_rate, 16384) / _dominant_hz(
        x[a : a + third], sample_rate, 16384
    )


def _image_sets(folder: Path) -> list[tuple[np.ndarray, dict]]:
    pairs = []
    for modality, split in itertools.product(("image", "av"), syn.SPLITS):
        data = load_split(folder, modality, split)
        for image, record in zip(data["images"], data["records"], strict=True):
            attrs = record["attributes"]["image"] if modality == "av" else record["attributes"]
            pairs.append((np.asarray(image), attrs))
    return pairs


def _audio_sets(folder: Path) -> tuple[list[tuple[np.ndarray, dict]], int]:
    pairs = []
    for modality, split in itertools.product(("audio", "av"), syn.SPLITS):
        data = load_split(folder, modality, split)
        for audio, record in zip(data["audio"], data["records"], strict=True):
            attrs = record["attributes"]["audio"] if modality == "av" else record["attributes"]
            pairs.append((np.asarray(audio), attrs))
    return pairs, data["sample_rate"]


# ---------------------------------------------------------------- determinism and caching
def test_same_seed_same_bytes_different_seed_differs(built: Path, tmp_path: Path) -> None:
    again = build_synthetic(SyntheticSpec(**SMALL), tmp_path / "a", progress=False)
    assert again != built
    hashes = _file_hashes(built)
    assert hashes == _file_hashes(again)
    manifest = json.loads((built / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v for k, v in hashes.items() if k != "manifest.json"
    }
    assert len(manifest["files"]) == 3 * 3 + 3 * 2 * 2  # jsonl per set, arrays per modality

    other = build_synthetic(SyntheticSpec(seed=1, **SMALL), tmp_path / "b", progress=False)
    other_hashes = _file_hashes(other)
    for name in hashes:
        assert other_hashes[name] != hashes[name], name


def test_samples_do_not_depend_on_split_sizes(built: Path, tmp_path: Path) -> None:
    sizes = {**SMALL, "num_train": 60, "num_av_train": 11}
    bigger = build_synthetic(SyntheticSpec(**sizes), tmp_path, progress=False)
    for modality, n in (("image", 40), ("audio", 40), ("av", 8)):
        small, big = load_split(built, modality, "train"), load_split(bigger, modality, "train")
        assert len(big["records"]) > n
        assert small["records"] == big["records"][:n]
        for key in ("images", "audio"):
            if key in small:
                np.testing.assert_array_equal(small[key], big[key][:n])
    np.testing.assert_array_equal(
        load_split(built, "image", "val")["images"], load_split(bigger, "image", "val")["images"]
    )


def test_complete_folder_is_reused(built: Path) -> None:
    marker = built / "marker.txt"
    marker.write_text("x")
    try:
        assert build_synthetic(SyntheticSpec(**SMALL), built.parent, progress=False) == built
        assert marker.exists()
    finally:
        marker.unlink()


def test_leftovers_of_a_killed_build_do_not_count_as_complete(built: Path, tmp_path: Path) -> None:
    spec = SyntheticSpec(**SMALL)
    final = syn.dataset_dir(spec, tmp_path)
    # A temporary folder from a killed build, even with a manifest copied into it ...
    leftover = tmp_path / f".{final.name}.tmp-999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "manifest.json").write_text((built / "manifest.json").read_text())
    # ... and a final-named folder without a manifest.
    final.mkdir()
    (final / "image_train.jsonl").write_text("half written\n")
    assert not syn.is_complete(final)

    out = build_synthetic(spec, tmp_path, progress=False)
    assert out == final and syn.is_complete(out)
    assert _file_hashes(out) == _file_hashes(built)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p != leftover]


# ---------------------------------------------------------------- captions and grammar
def test_num_distinct_captions_matches_enumerated_grammar() -> None:
    image = {
        syn.image_caption(dict(zip(syn.IMAGE_ATTRIBUTES, values, strict=True)))
        for values in itertools.product(*syn.IMAGE_ATTRIBUTES.values())
    }
    audio = {
        syn.audio_caption(dict(zip(syn.AUDIO_ATTRIBUTES, values, strict=True)))
        for values in itertools.product(*syn.AUDIO_ATTRIBUTES.values())
    }
    assert num_distinct_captions("image") == len(image) == 720
    assert num_distinct_captions("audio") == len(audio) == 216
    assert num_distinct_captions("av") == 720 * 216
    assert "two small red circles on the left" in image
    assert "one large blue square in the center" in image
    assert "three large green stars at the top" in image
    assert "one small yellow triangle at the bottom" in image
    assert "two quiet low buzzy beeps, rising" in audio
    assert "one loud high pure beep, steady" in audio
    for caption in ("two small red circle on the left", "one loud high pure beeps, steady"):
        with pytest.raises(ValueError):
            parse_caption("image" if "beep" not in caption else "audio", caption)


def test_captions_parse_back_to_attributes(built: Path) -> None:
    for modality, split in itertools.product(syn.MODALITIES, syn.SPLITS):
        for record in load_split(built, modality, split)["records"]:
            assert parse_caption(modality, record["caption"]) == record["attributes"]
            if modality == "av":
                attrs = record["attributes"]
                assert parse_caption("image", record["image_caption"]) == attrs["image"]
                assert parse_caption("audio", record["audio_caption"]) == attrs["audio"]
                assert (
                    record["caption"] == f"{record['image_caption']} with {record['audio_caption']}"
                )


# ---------------------------------------------------------------- the signals show the attributes
def test_images_show_their_attributes(built: Path) -> None:
    pairs = _image_sets(built)
    areas: dict[tuple[str, str], list[int]] = {}
    for image, attrs in pairs:
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        found = _analyse_image(image)
        assert found["count"] == attrs["count"], attrs
        assert _nearest(found["colour"], syn.COLOUR_RGB) == attrs["colour"], attrs
        assert _nearest(np.array(found["centroid"]), syn.POSITION_ANCHORS) == attrs["position"]
        areas.setdefault((attrs["shape"], attrs["size"]), []).extend(found["areas"])
    compared = 0
    for shape in syn.SHAPES:
        if (shape, "small") in areas and (shape, "large") in areas:
            assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape
            compared += 1
    assert compared >= 2


def test_audio_shows_its_attributes(built: Path) -> None:
    pairs, sample_rate = _audio_sets(built)
    peaks: dict[str, list[float]] = {"quiet": [], "loud": []}
    for audio, attrs in pairs:
        assert audio.dtype == np.int16 and audio.shape == (sample_rate,)
        assert _beep_count(audio, sample_rate) == attrs["count"], attrs
        peaks[attrs["loudness"]].append(np.abs(audio.astype(np.float64)).max() / 32767)
        lo, hi = syn.PITCH_RANGES_HZ[attrs["pitch"]]
        if attrs["contour"] == "steady" and attrs["timbre"] in ("pure", "buzzy", "bell"):
            lo, hi = lo * 0.98, hi * 1.02
        else:
            widen = syn.CONTOUR_SWEEP * (1 + syn.VIBRATO_DEPTH)
            lo, hi = lo / widen, hi * widen
        assert lo <= _dominant_hz(audio, sample_rate) <= hi, attrs
        ratio = _sweep_ratio(audio, sample_rate)
        if attrs["contour"] == "rising":
            assert ratio > 1.08, attrs
        elif attrs["contour"] == "falling":
            assert ratio < 1 / 1.08, attrs
        else:
            assert abs(ratio - 1) < (0.12 if attrs["timbre"] == "warbly" else 0.03), attrs
    assert peaks["quiet"] and peaks["loud"]
    assert max(peaks["quiet"]) < min(peaks["loud"])
    assert 0.09 < min(peaks["quiet"]) and max(peaks["quiet"]) < 0.22
    assert 0.58 < min(peaks["loud"]) and max(peaks["loud"]) < 0.92


# ---------------------------------------------------------------- errors and torch view
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train", 0),
        ("num_av_test", -1),
        ("image_size", 16),
        ("sample_rate", 0),
        ("audio_seconds", 0.0),
        ("seed", -1),
    ],
)
def test_bad_spec_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**{field: value})


def test_load_split_rejects_bad_names(built: Path) -> None:
    with pytest.raises(ValueError, match="validation"):
        load_split(built, "image", "validation")
    with pytest.raises(ValueError, match="video"):
        load_split(built, "video", "train")


@pytest.mark.parametrize("modality", syn.MODALITIES)
def test_dataset_items(built: Path, modality: str) -> None:
    dataset = SyntheticDataset(built, modality, "val")
    assert len(dataset) == 8
    item = dataset[3]
    assert item["index"] == 3 and isinstance(item["caption"], str)
    assert item["sample_rate"] == 16000
    if modality in ("image", "av"):
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    else:
        assert "image" not in item
    if modality in ("audio", "av"):
        audio = item["audio"]
        assert audio.dtype == torch.float32 and audio.shape == (16000,)
        assert audio.abs().max() <= 1.0 and audio.abs().max() > 0.05
    else:
        assert "audio" not in item
    if modality == "av":
        assert item["caption"] == f"{item['image_caption']} with {item['audio_caption']}"
