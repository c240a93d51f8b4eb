"""Small real-format data sets built on the fly: images, audio, manifests, COCO JSON, CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

# (suffix, PIL format, mode) cycled over by the fixtures: every mode a decoder must handle.
IMAGE_KINDS = [
    (".png", "PNG", "RGB"),
    (".jpg", "JPEG", "RGB"),
    (".png", "PNG", "P"),
    (".png", "PNG", "LA"),
    (".jpg", "JPEG", "CMYK"),
    (".png", "PNG", "I;16"),
    (".webp", "WEBP", "RGBA"),
    (".gif", "GIF", "P"),
    (".jpg", "JPEG", "L"),
    (".tiff", "TIFF", "RGB"),
]
# (suffix, soundfile format, subtype, sample rate, channels)
AUDIO_KINDS = [
    (".wav", "WAV", "PCM_16", 16000, 1),
    (".flac", "FLAC", "PCM_24", 44100, 2),
    (".ogg", "OGG", "VORBIS", 22050, 1),
    (".mp3", "MP3", "MPEG_LAYER_III", 48000, 2),
    (".wav", "WAV", "FLOAT", 8000, 2),
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_image(path: Path, fmt: str, mode: str, rgb=(220, 30, 30), size=(40, 24)) -> Path:
    """A solid-colour image with a darker band, saved in ``fmt`` and ``mode``."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = rgb
    a[: size[1] // 4] //= 2
    img = Image.fromarray(a, "RGB")
    if mode == "P":
        img = img.quantize(16)
    elif mode == "I;16":
        grey = np.asarray(img.convert("L"), np.uint16) * 257
        img = Image.fromarray(grey)  # uint16 -> I;16
    elif mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def write_audio(path: Path, fmt: str, subtype: str, sr: int, channels: int, hz=440.0, seconds=0.5):
    t = np.arange(int(sr * seconds)) / sr
    wave = 0.4 * np.sin(2 * np.pi * hz * t)
    data = np.stack([wave] * channels, 1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), sr, format=fmt, subtype=subtype)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def caption(i: int) -> str:
    colour = list(COLOURS)[i % 3]
    return f"a {colour} picture number {i}"


def make_manifest(root: Path, n: int = 40, bad: dict[int, str] | None = None, fmt="jsonl") -> Path:
    """``root/pairs.<fmt>``: ``n`` rows (image, audio, text, split) with media in sub-folders.

    ``bad`` maps a row index to a defect: missing_file, corrupt_image, unreadable_audio,
    empty_audio, empty_caption, malformed_row. Rows 0..n-9 are train, then 4 val and 4 test.
    """
    bad = bad or {}
    rows: list[dict | str] = []
    for i in range(n):
        suffix, pil_fmt, mode = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        a_suffix, a_fmt, sub, sr, ch = AUDIO_KINDS[i % len(AUDIO_KINDS)]
        image = f"images/{i:03d}{suffix}"
        audio = f"audio/{i:03d}{a_suffix}"
        write_image(root / image, pil_fmt, mode, list(COLOURS.values())[i % 3])
        write_audio(root / audio, a_fmt, sub, sr, ch, hz=300 + 200 * (i % 3))
        split = "train" if i < n - 8 else ("val" if i < n - 4 else "test")
        row: dict | str = {"image": image, "audio": audio, "text": caption(i), "split": split}
        defect = bad.get(i)
        if defect == "missing_file":
            (root / image).unlink()
            (root / audio).unlink()
        elif defect == "corrupt_image":
            truncate(root / image, 0.3)
            row.pop("audio")
        elif defect == "unreadable_audio":
            (root / audio).write_bytes(b"RIFF not really a wave file at all")
            row.pop("image")
        elif defect == "empty_audio":
            sf.write(root / f"audio/{i:03d}.wav", np.zeros(0, np.float32), 16000)
            row["audio"] = f"audio/{i:03d}.wav"
            row.pop("image")
        elif defect == "empty_caption":
            row["text"] = "   "
        elif defect == "malformed_row":
            row = '{"image": "images/broken.png", "text": '
        rows.append(row)
    path = root / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "audio", "text", "split"])
            for r in rows:
                if isinstance(r, str):
                    w.writerow(["images/broken.png", "oops"])  # too few fields
                else:
                    w.writerow([r.get(k, "") for k in ("image", "audio", "text", "split")])
    return path


def make_coco(root: Path, n_images: int = 24, captions: int = 5) -> Path:
    """Karpathy-style ``dataset_coco.json`` with train/restval/val/test images under ``images/``."""
    images = []
    for i in range(n_images):
        suffix, fmt, mode = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        name = f"COCO_{i:06d}{suffix}"
        folder = "train2014" if i % 2 else "val2014"
        write_image(root / "images" / folder / name, fmt, mode, list(COLOURS.values())[i % 3])
        split = ["train", "restval", "train", "val", "test", "train"][i % 6]
        sentences = [
            {"raw": f"{caption(i)} seen the {k} way", "tokens": []} for k in range(captions)
        ]
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "sentences": sentences,
                "cocoid": i,
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def make_audiocaps(root: Path, clips: dict[str, int] | None = None, captions_eval: int = 5) -> Path:
    """AudioCaps layout: ``{split}.csv`` (``audiocap_id, youtube_id, start_time, caption``) and
    ``audio/<youtube_id>.<ext>``; val/test clips have ``captions_eval`` lines each."""
    clips = clips or {"train": 24, "val": 6, "test": 6}
    k = 0
    root.mkdir(parents=True, exist_ok=True)
    for split, n in clips.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            for _ in range(n):
                suffix, fmt, sub, sr, ch = AUDIO_KINDS[k % len(AUDIO_KINDS)]
                yid = f"yt{k:05d}"
                write_audio(root / "audio" / f"{yid}{suffix}", fmt, sub, sr, ch, hz=200 + 40 * k)
                for c in range(1 if split == "train" else captions_eval):
                    w.writerow([1000 * k + c, yid, 30, f"{caption(k)}, heard the {c} way"])
                k += 1
    return root / "{split}.csv"


def make_coco2017(root: Path, images: dict[str, int] | None = None, captions: int = 5) -> Path:
    """COCO 2017 layout: ``annotations/captions_{train,val}2017.json`` (official format) beside
    the image folders ``train2017/`` and ``val2017/``."""
    images = images or {"train": 12, "val": 4}
    k = 0
    for split, n in images.items():
        entries, anns = [], []
        for _ in range(n):
            name = f"{k:012d}.jpg"
            write_image(root / f"{split}2017" / name, "JPEG", "RGB", list(COLOURS.values())[k % 3])
            entries.append({"id": k, "file_name": name, "height": 24, "width": 40})
            anns += [
                {"id": 100 * k + c, "image_id": k, "caption": f"{caption(k)} the {c} way"}
                for c in range(captions)
            ]
            k += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": entries, "annotations": anns})
        )
    return root / "annotations" / "captions_{split}2017.json"


CLOTHO_SPLITS = {"development": 12, "validation": 3, "evaluation": 3}


def make_clotho(root: Path, clips: dict[str, int] | None = None) -> Path:
    """Clotho layout: ``clotho_captions_<split>.csv`` (``file_name, caption_1..caption_5``) with
    the clips of each split in a folder named after it (``development/``, ...)."""
    k = 0
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (clips or CLOTHO_SPLITS).items():
        with open(root / f"clotho_captions_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", *(f"caption_{c}" for c in range(1, 6))])
            for _ in range(n):
                name = f"clip {k:03d}.wav"  # Clotho's names have spaces
                write_audio(root / split / name, "WAV", "PCM_16", 44100, 1, hz=200 + 40 * k)
                w.writerow([name, *(f"{caption(k)}, heard the {c} way" for c in range(5))])
                k += 1
    return root / "clotho_captions_{split}.csv"


def split_manifest(path: Path) -> Path:
    """One manifest CSV per split (``<folder>/{split}.csv``) from a manifest CSV's split column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "val", "test"):
        with open(path.parent / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "audio", "text"], extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if r["split"] == split)
    return path.parent / "{split}.csv"
