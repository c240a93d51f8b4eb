"""One entry point over the file-based readers: the records of a split, by source name."""

from __future__ import annotations

from pathlib import Path

from autoglm_phone.data.audiocaps import read_audiocaps
from autoglm_phone.data.coco import read_coco
from autoglm_phone.data.manifest import read_manifest
from autoglm_phone.data.records import Record, split_file

SOURCES = ("manifest", "coco", "audiocaps")


def read_split(
    source: str,
    path: str | Path,
    split: str,
    image_dir: str | None = None,
    audio_dir: str | None = None,
    split_names: dict[str, str] | None = None,
) -> list[Record]:
    """Records of ``split``. With ``{split}`` in ``path`` each split is its own file (named by
    ``split_names`` when given, e.g. Clotho's ``development``); otherwise one file holds every
    split (a manifest's ``split`` column, a Karpathy JSON's ``split`` field)."""
    per_file = "{split}" in str(path)
    file = split_file(path, split, split_names)
    if source == "manifest":
        return read_manifest(file, None if per_file else split, image_dir, audio_dir)
    if source == "coco":
        return read_coco(file, None if per_file else split, image_dir)
    if source == "audiocaps":
        if not per_file:
            raise ValueError(f"audiocaps has one CSV per split: put {{split}} in the path ({path})")
        return read_audiocaps(file, audio_dir)
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
