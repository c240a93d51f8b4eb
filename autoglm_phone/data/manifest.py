"""JSONL or CSV manifests: one (image and/or audio, text) pair per row.

Columns (JSONL keys or CSV header): ``image``, ``audio``, ``text`` (or ``caption``); any may be
empty on a row, but a row needs some media and a caption to be used. Optional: ``split``
(train/val/test, when one file holds every split) and ``id`` (an item key; rows sharing it, or
sharing their media path, are captions of the same item). Relative media paths resolve against
``image_dir``/``audio_dir`` when given (themselves relative to the manifest) or else against the
manifest's folder. Rows are named by their 1-based line in the file (the CSV header is line 1).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from autoglm_phone.data import records as rec  # the readers' shared row helpers
from autoglm_phone.data.decode import SampleError
from autoglm_phone.data.records import SPLITS, DataFileError, Record

TEXT_KEYS = ("text", "caption")
MEDIA_KEYS = ("image", "audio")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def not_utf8(text: str) -> str | None:
    """Why ``text`` (read with ``errors="surrogateescape"``) is not UTF-8, or None if it is."""
    bad = [c for c in text if "\udc80" <= c <= "\udcff"]
    return f"not UTF-8 (byte 0x{ord(bad[0]) - 0xDC00:02x})" if bad else None


def _jsonl_rows(path: Path, f) -> list[tuple[int, dict[str, Any] | str]]:
    out: list[tuple[int, dict[str, Any] | str]] = []
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        if not out and line.lstrip().startswith("["):
            raise DataFileError(
                f"{path} holds a JSON array; a manifest is JSON Lines: one object per line "
                "(convert it with: jq -c '.[]' in.json > out.jsonl)"
            )
        if why := not_utf8(line):
            out.append((line_no, why))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((line_no, f"not JSON ({e.msg})"))
            continue
        out.append((line_no, row if isinstance(row, dict) else "not a JSON object"))
    return out


def _csv_rows(path: Path, f) -> list[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header = [h.strip() for h in next(reader, [])]
    if header and not any(k in header for k in TEXT_KEYS):
        raise DataFileError(
            f"{path}: no caption column; the header needs one of {', '.join(TEXT_KEYS)} "
            f"(and {' and/or '.join(MEDIA_KEYS)}), got {header}"
        )
    if header and not any(k in header for k in MEDIA_KEYS):
        raise DataFileError(
            f"{path}: no media column; the header needs {' and/or '.join(MEDIA_KEYS)}, got {header}"
        )
    out: list[tuple[int, dict[str, Any] | str]] = []
    start = reader.line_num + 1
    for fields in reader:
        line_no, start = start, reader.line_num + 1
        if not any(x.strip() for x in fields):
            continue
        if why := not_utf8("".join(fields)):
            out.append((line_no, why))
        elif len(fields) != len(header):
            out.append((line_no, f"{len(fields)} fields, header has {len(header)}"))
        else:
            out.append((line_no, dict(zip(header, fields, strict=True))))
    return out


def _rows(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """(line, row dict) per row, or (line, why it is malformed). UTF-8, with or without the BOM
    spreadsheet programs write; other bytes make their row malformed."""
    suffix = path.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, ".csv", ".tsv"):
        raise DataFileError(f"{path}: a manifest is .jsonl or .csv (or .tsv), not {path.suffix!r}")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        rows = _jsonl_rows(path, f) if suffix in JSONL_SUFFIXES else _csv_rows(path, f)
    if not rows:
        raise DataFileError(
            f"{path} is empty: expected one row per (media, caption) pair "
            f"({', '.join(MEDIA_KEYS)}, {TEXT_KEYS[0]} and optionally split, id)"
        )
    return rows


def read_manifest(
    path: str | Path,
    split: str | None = None,
    image_dir: str | None = None,
    audio_dir: str | None = None,
    allow_outside: bool = False,
) -> list[Record]:
    """Records of ``split`` (needs a ``split`` column), or every row when ``split`` is None.

    Rows whose split cannot be read (unparsable, or not train/val/test) are returned with the
    train split, carrying their error, so training reports them. Media paths that leave their
    folder are refused unless ``allow_outside`` (see :func:`~autoglm_phone.data.records.media_path`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    images, audios = rec.media_base(path, image_dir), rec.media_base(path, audio_dir)
    rows = _rows(path)
    if split is not None and not any(isinstance(r, dict) and "split" in r for _, r in rows):
        raise DataFileError(
            f"{path} has no split column: add one (train/val/test) or give one file per split "
            "with {split} in the path"
        )
    records = []
    for line_no, row in rows:
        where = f"line {line_no}"
        if isinstance(row, str) or (split is not None and row.get("split") not in SPLITS):
            if split in (None, "train"):
                why = row if isinstance(row, str) else f"split is {row.get('split')!r}"
                records.append(rec.bad_row(path.name, where, why))
            continue
        if split is not None and row["split"] != split:
            continue
        try:
            image = rec.media_path(row.get("image"), images, allow_outside)
            audio = rec.media_path(row.get("audio"), audios, allow_outside)
        except SampleError as e:
            records.append(rec.bad_row(path.name, where, e))
            continue
        text = next((row[k] for k in TEXT_KEYS if row.get(k) not in (None, "")), None)
        item = row.get("id")
        item = f"{path.name}#{item}" if item not in (None, "") else None
        records.append(rec.make_record(path.name, where, text, image, audio, item))
    return records
