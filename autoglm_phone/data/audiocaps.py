"""AudioCaps- and Clotho-style audio captions: one CSV per split.

- AudioCaps (``train.csv``, ``val.csv``, ``test.csv``): ``audiocap_id, youtube_id, start_time,
  caption``, one caption per line; the val/test clips have five lines each.
- Clotho (``clotho_captions_{development,validation,evaluation}.csv``): ``file_name, caption_1,
  ..., caption_5``, one clip per line.

The audio file is named by the first of the columns ``file_name``, ``audio``, ``youtube_id``
present; a name without a suffix (AudioCaps' YouTube ids) matches a file of that stem with any of
the supported audio suffixes (:data:`~autoglm_phone.data.decode.AUDIO_SUFFIXES`) in the audio
folder. Files resolve against ``audio_dir``
(relative to the CSV) or the CSV's folder. Captions of the same file share its ``item``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from autoglm_phone.data import records as rec  # the readers' shared row helpers
from autoglm_phone.data.decode import AUDIO_SUFFIXES, SampleError
from autoglm_phone.data.manifest import not_utf8
from autoglm_phone.data.records import DataFileError, Record

AUDIO_COLUMNS = ("file_name", "audio", "youtube_id")
_WIDE = re.compile(r"caption_?(\d+)$")


class _Folder:
    """Lazily listed audio folder: a bare stem maps to the file that has it."""

    def __init__(self, base: Path, allow_outside: bool) -> None:
        self.base, self.allow_outside, self._stems = base, allow_outside, None

    def resolve(self, value: str) -> str | None:
        value = value.strip()
        if not value or Path(value).suffix.lower().lstrip(".") in AUDIO_SUFFIXES:
            return rec.media_path(value, self.base, self.allow_outside)
        if self._stems is None:
            found = sorted(self.base.iterdir()) if self.base.is_dir() else []
            self._stems = {}
            for p in found:
                if p.suffix.lower().lstrip(".") in AUDIO_SUFFIXES:
                    self._stems.setdefault(p.stem, p.name)
        name = self._stems.get(value, f"{value}.{AUDIO_SUFFIXES[0]}")
        return rec.media_path(name, self.base, self.allow_outside)


def read_audiocaps(
    path: str | Path, audio_dir: str | None = None, allow_outside: bool = False
) -> list[Record]:
    """Every caption of one split's CSV, in file order (UTF-8, with or without a BOM)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio captions CSV not found: {path}")
    folder = _Folder(rec.media_base(path, audio_dir), allow_outside)
    records: list[Record] = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataFileError(f"{path} is empty: expected a header and one row per clip")
        audio_col = next((c for c in AUDIO_COLUMNS if c in header), None)
        wide = sorted(
            ((int(m.group(1)), c) for c in header if (m := _WIDE.match(c))), key=lambda x: x[0]
        )
        text_cols = [c for _, c in wide] or [c for c in ("caption", "text") if c in header][:1]
        if audio_col is None or not text_cols:
            raise DataFileError(
                f"{path}: needs an audio column ({', '.join(AUDIO_COLUMNS)}) and caption column(s) "
                f"(caption, or caption_1..caption_N); header is {header}"
            )
        start = reader.line_num + 1
        for fields in reader:
            line_no, start = start, reader.line_num + 1
            where = f"line {line_no}"
            if not any(x.strip() for x in fields):
                continue
            why = not_utf8("".join(fields))
            if why is None and len(fields) != len(header):
                why = f"{len(fields)} fields, header has {len(header)}"
            if why is not None:
                records.append(rec.bad_row(path.name, where, why))
                continue
            row = dict(zip(header, fields, strict=True))
            try:
                audio = folder.resolve(row[audio_col])
            except SampleError as e:
                records.append(rec.bad_row(path.name, where, e))
                continue
            if audio is None:
                records.append(rec.bad_row(path.name, where, f"empty {audio_col}"))
                continue
            for col in text_cols:
                label = f"{where}, {col}" if wide else where
                records.append(rec.make_record(path.name, label, row[col], audio=audio))
    return records
