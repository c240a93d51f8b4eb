"""The common record type of every real data source, and the map-style dataset over records.

A :class:`Record` is one (media, caption) pair as its source lists it: where it came from (file and
row, for messages), the media paths, the caption and an ``item`` key shared by every caption of the
same media (the multi-caption retrieval protocol groups on it). A reader that cannot parse a row
still returns a record for it, carrying the :class:`SampleError`, so bad rows are skipped and
counted like bad files.

:class:`RecordDataset` returns the same item dicts as the synthetic set, plus ``item_id`` and
``skipped``. A bad sample either raises :class:`DataError` naming file and row (``strict``) or is
reported in the ``skipped`` list of the item that replaces it: a pseudo-random other index, so a
batch keeps its size. A replacement can repeat a pair within an epoch; evaluation removes those
repeats by (item, caption) before scoring.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from autoglm_phone.data.decode import (
    MAX_FILE_BYTES,
    SampleError,
    decode_audio,
    decode_image,
    normalize_caption,
)

MODALITIES = ("image", "audio")
MAX_REPLACEMENTS = 64  # consecutive bad draws before a dataset gives up


class DataError(RuntimeError):
    """A bad sample in strict mode; the message names the file, the row and the reason."""


class DataFileError(DataError, ValueError):
    """A data file that cannot be used at all (empty, wrong shape or encoding, no usable rows);
    the message names it and what was expected."""


def stable_id(text: str) -> int:
    """A stable 63-bit id for a string (same on every process and run)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Record:
    source: str  # the file the row came from, as the user named it (for messages)
    row: str  # where in that file, e.g. "line 7" or "images[3].sentences[1]"
    image: str | None = None  # absolute path (or a tar member name for shards)
    audio: str | None = None
    caption: str = ""
    item: str = ""  # shared by every caption of the same media
    error: SampleError | None = None  # found while reading the row

    @property
    def where(self) -> str:
        return f"{self.source}, {self.row}"

    def has(self, modality: str) -> bool:
        """Whether this record belongs to ``modality``'s dataset (unparsed rows go to every one)."""
        if self.error is not None and self.image is None and self.audio is None:
            return True
        return getattr(self, modality) is not None


def make_record(
    source: str,
    row: str,
    caption: Any,
    image: str | None = None,
    audio: str | None = None,
    item: str | None = None,
) -> Record:
    """A record with its caption normalised; a missing/empty caption or media becomes its error."""
    error = None
    if image is None and audio is None:
        error = SampleError("malformed_row", "no image or audio path")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        error = error or SampleError(
            "malformed_row", f"caption is {type(caption).__name__}, not text"
        )
        caption = ""
    caption = normalize_caption(caption)
    if not caption:
        error = error or SampleError("empty_caption", "empty caption")
    item = item or image or audio or f"{source}#{row}"
    return Record(source, row, image, audio, caption, item, error)


def bad_row(source: str, row: str, message: str | SampleError) -> Record:
    """A row that cannot be used: ``message`` (a malformed row) or the error found in it."""
    error = message if isinstance(message, SampleError) else SampleError("malformed_row", message)
    return Record(source, row, error=error)


def skip_entry(record: Record, error: SampleError) -> dict[str, str]:
    """What the logs and summaries get for one skipped sample (plain strings: pickles cheaply)."""
    return {
        "source": record.source,
        "row": record.row,
        "file": record.image or record.audio or "",
        "reason": error.reason,
        "message": str(error),
    }


def summarize(entries: Iterable[dict[str, str]]) -> dict[str, Any]:
    """Unique skipped samples (by source and row), counted per reason, sorted for reading."""
    unique = {(e["source"], e["row"]): e for e in entries}
    rows = [unique[k] for k in sorted(unique, key=_row_order)]
    return {
        "total": len(rows),
        "by_reason": dict(sorted(Counter(e["reason"] for e in rows).items())),
        "rows": rows,
    }


def _row_order(key: tuple[str, str]) -> tuple:
    source, row = key
    digits = "".join(c if c.isdigit() else " " for c in row).split()
    return (source, [int(d) for d in digits], row)


def format_summary(summary: dict[str, Any], title: str, max_rows: int = 50) -> str:
    if not summary["total"]:
        return f"{title}: no samples skipped"
    counts = ", ".join(f"{k}={v}" for k, v in summary["by_reason"].items())
    lines = [f"{title}: skipped {summary['total']} samples ({counts})"]
    for e in summary["rows"][:max_rows]:
        lines.append(f"  {e['source']}, {e['row']}: {e['message']}")
    if summary["total"] > max_rows:
        lines.append(f"  ... and {summary['total'] - max_rows} more")
    return "\n".join(lines)


def check_strict(records: Sequence[Record]) -> None:
    """Strict mode at load time: the first unparsable row stops the run."""
    for r in records:
        if r.error is not None:
            raise DataError(f"bad sample at {r.where}: {r.error}")


class RecordDataset(Dataset):
    """One modality's (media, caption) pairs over a list of records, decoded on access."""

    def __init__(
        self,
        records: Sequence[Record],
        modality: str,
        image_size: int,
        sample_rate: int,
        num_samples: int,
        strict: bool = False,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        self.records = [r for r in records if r.has(modality)]
        self.modality, self.strict, self.max_bytes = modality, strict, max_bytes
        self.image_size, self.sample_rate, self.num_samples = image_size, sample_rate, num_samples
        if strict:
            check_strict(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: Record) -> dict[str, Any]:
        """Decode one record (raises :class:`SampleError`)."""
        if record.error is not None:
            raise record.error
        item: dict[str, Any] = {
            "caption": record.caption,
            "item_id": stable_id(record.item),
            "sample_rate": self.sample_rate,
        }
        if self.modality == "image":
            item["image"] = decode_image(record.image, self.image_size, max_bytes=self.max_bytes)
        else:
            item["audio"] = decode_audio(
                record.audio, self.sample_rate, self.num_samples, max_bytes=self.max_bytes
            )
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[dict[str, str]] = []
        for attempt in range(MAX_REPLACEMENTS):
            record = self.records[index]
            try:
                item = self.load(record)
            except SampleError as e:
                if self.strict:
                    raise DataError(f"bad sample at {record.where}: {e}") from e
                skipped.append(skip_entry(record, e))
                index = stable_id(f"{index}/{attempt}") % len(self.records)
                continue
            item["skipped"] = skipped
            return item
        raise DataError(
            f"{MAX_REPLACEMENTS} bad samples in a row (last: {skipped[-1]['source']}, "
            f"{skipped[-1]['row']}: {skipped[-1]['message']}); is the data readable at all?"
        )


def collate_skipped(items: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [e for it in items for e in it.get("skipped", ())]


# ---------------------------------------------------------------- helpers for readers
SPLITS = ("train", "val", "test")


def fill_split(text: str, split: str, split_names: dict[str, str] | None = None) -> str:
    """``text`` with ``{split}`` replaced by the split's name (``split_names[split]`` if given)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return text.replace("{split}", (split_names or {}).get(split, split))


def split_file(path: str | Path, split: str, split_names: dict[str, str] | None = None) -> Path:
    """``path`` with ``{split}`` filled in (see :func:`fill_split`), made absolute."""
    return Path(fill_split(str(path), split, split_names)).expanduser().resolve()


def _absolute(path: Path) -> Path:
    """Absolute and ``..``-free without resolving symlinks: a linked media folder inside the data
    root stays inside it."""
    return Path(os.path.normpath(path.expanduser().absolute()))


def media_path(value: Any, base: Path, allow_outside: bool = False) -> str | None:
    """A row's media value as an absolute path (relative ones against ``base``); None if absent.

    A path that leaves ``base`` (``../..``, or absolute elsewhere) raises a :class:`SampleError`
    unless ``allow_outside``; symlinks inside ``base`` are the user's and are followed.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise SampleError("malformed_row", f"media path is {type(value).__name__}, not text")
    path = _absolute(base / Path(value.strip()).expanduser())
    if not allow_outside and not path.is_relative_to(_absolute(base)):
        raise SampleError(
            "outside_root",
            f"{value.strip()} leaves the data root {_absolute(base)} "
            "(data.allow_outside_root=true to allow)",
        )
    return str(path)


def media_base(annotation_file: Path, folder: str | None) -> Path:
    """Where relative media paths start: ``folder`` (itself relative to the file) or its folder."""
    base = annotation_file.parent / Path(folder).expanduser() if folder else annotation_file.parent
    return _absolute(base)
