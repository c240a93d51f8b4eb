"""AudioCaps- and Clotho-style audio captions: one CSV per split.

- AudioCaps (``train.csv``, ``val.csv``, ``test.csv``): ``audiocap_id, youtube_id, start_time,
  caption``, one caption per line; the val/test clips have five lines each.
- Clotho (``clotho_captions_{development,validation,evaluation}.csv``): ``file_name, caption_1,
  ..., caption_5``, one clip per line.

The audio file is named by the first of the columns ``file_name``, ``audio``, ``youtube_id``
present; a name without a suffix (AudioCaps' YouTube ids) matches a file of that stem with any of
the suffixes in :data:`AUDIO_SUFFIXES` in the audio folder. Files resolve against ``audio_dir``
(relative to the CSV) or the CSV's folder. Captions of the same file share its ``item``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from autoglm_phone.data.records import Record, bad_row, make_record, media_base, media_path

AUDIO_COLUMNS = ("file_name", "audio", "youtube_id")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
_WIDE = re.compile(r"caption_?(\d+)$")


class _Folder:
    """Lazily listed audio folder: a bare stem maps to the file that has it."""

    def __init__(self, base: Path) -> None:
        self.base, self._stems = base, None

    def resolve(self, value: str) -> str | None:
        value = value.strip()
        if not value or Path(value).suffix.lower() in AUDIO_SUFFIXES:
            return media_path(value, self.base)
        if self._stems is None:
            found = sorted(self.base.iterdir()) if self.base.is_dir() else []
            self._stems = {}
            for p in found:
                if p.suffix.lower() in AUDIO_SUFFIXES:
                    self._stems.setdefault(p.stem, p.name)
        return media_path(self._stems.get(value, value + AUDIO_SUFFIXES[0]), self.base)


def read_audiocaps(path: str | Path, audio_dir: str | None = None) -> list[Record]:
    """Every caption of one split's CSV, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio captions CSV not found: {path}")
    folder = _Folder(media_base(path, audio_dir))
    records: list[Record] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        audio_col = next((c for c in AUDIO_COLUMNS if c in header), None)
        wide = sorted(
            ((int(m.group(1)), c) for c in header if (m := _WIDE.match(c))), key=lambda x: x[0]
        )
        text_cols = [c for _, c in wide] or [c for c in ("caption", "text") if c in header][:1]
        if audio_col is None or not text_cols:
            raise ValueError(
                f"{path}: needs an audio column ({', '.join(AUDIO_COLUMNS)}) and caption column(s) "
                f"(caption, or caption_1..caption_N); header is {header}"
            )
        start = reader.line_num + 1
        for fields in reader:
            line_no, start = start, reader.line_num + 1
            where = f"line {line_no}"
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                records.append(
                    bad_row(path.name, where, f"{len(fields)} fields, header has {len(header)}")
                )
                continue
            row = dict(zip(header, fields, strict=True))
            audio = folder.resolve(row[audio_col])
            if audio is None:
                records.append(bad_row(path.name, where, f"empty {audio_col}"))
                continue
            for col in text_cols:
                label = f"{where}, {col}" if wide else where
                records.append(make_record(path.name, label, row[col], audio=audio))
    return records
