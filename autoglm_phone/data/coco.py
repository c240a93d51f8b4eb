"""COCO-style image captions: Karpathy split files, or the official captions JSON.

- Karpathy (``dataset_coco.json``, also Flickr8k/30k): ``{"images": [{"filepath", "filename",
  "split", "sentences": [{"raw": ...}, ...]}, ...]}``; ``split`` is train, restval, val or test
  and ``restval`` counts as train (Karpathy & Fei-Fei, CVPR 2015). One file holds every split.
- Official (``captions_train2017.json``): ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``; one file per split, so ``{split}`` goes in the path.

Every caption is one record; the captions of an image share its ``item`` (the image path), which
is what the multi-caption retrieval protocol groups on. Images resolve against ``image_dir``
(relative to the JSON) or the JSON's folder, joined with ``filepath`` when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoglm_phone.data import records as rec  # the readers' shared row helpers
from autoglm_phone.data.decode import SampleError
from autoglm_phone.data.records import DataFileError, Record

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _karpathy(
    images: list[Any], name: str, base: Path, split: str | None, allow_outside: bool
) -> list[Record]:
    wanted = None if split is None else KARPATHY_SPLITS[split]
    records: list[Record] = []
    for i, img in enumerate(images):
        where = f"images[{i}]"
        img_split = img.get("split") if isinstance(img, dict) else None
        if not isinstance(img, dict):
            if split in (None, "train"):
                records.append(rec.bad_row(name, where, "not a JSON object"))
            continue
        if wanted is not None and img_split not in wanted:
            if split == "train" and img_split not in sum(KARPATHY_SPLITS.values(), ()):
                records.append(rec.bad_row(name, where, f"split is {img_split!r}"))
            continue
        fname = img.get("filename") or img.get("file_name")
        if not isinstance(fname, str) or not fname:
            records.append(rec.bad_row(name, where, "no filename"))
            continue
        try:
            path = rec.media_path(str(Path(img.get("filepath") or "") / fname), base, allow_outside)
        except SampleError as e:
            records.append(rec.bad_row(name, where, e))
            continue
        sentences = img.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            records.append(rec.make_record(name, where, "", image=path))
            continue
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else s
            records.append(rec.make_record(name, f"{where}.sentences[{j}]", raw, image=path))
    return records


def _official(data: dict[str, Any], name: str, base: Path, allow_outside: bool) -> list[Record]:
    files: dict[Any, str | SampleError] = {}
    for img in data.get("images", []):
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            try:
                files[img.get("id")] = rec.media_path(img["file_name"], base, allow_outside)
            except SampleError as e:
                files[img.get("id")] = e
    records: list[Record] = []
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            records.append(rec.bad_row(name, where, "image_id not among the images"))
            continue
        if isinstance(files[ann["image_id"]], SampleError):
            records.append(rec.bad_row(name, where, files[ann["image_id"]]))
            continue
        records.append(
            rec.make_record(name, where, ann.get("caption"), image=files[ann["image_id"]])
        )
    return records


def read_coco(
    path: str | Path,
    split: str | None = None,
    image_dir: str | None = None,
    allow_outside: bool = False,
) -> list[Record]:
    """Records of ``split`` (Karpathy format; all images when None), or every caption of an
    official-format file (its split is the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}: not JSON at line {e.lineno}, column {e.colno} ({e.msg})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFileError(f"{path}: expected a COCO captions JSON with an 'images' list")
    base = rec.media_base(path, image_dir)
    if isinstance(data.get("annotations"), list):
        return _official(data, path.name, base, allow_outside)
    return _karpathy(data["images"], path.name, base, split, allow_outside)
