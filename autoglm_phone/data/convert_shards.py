"""Convert a file source (manifest, COCO, AudioCaps/Clotho) into WebDataset-format tar shards.

One set of shards per split (``<out>/<split>-000000.tar``, ...), with a progress bar::

    python -m autoglm_phone.data.convert_shards --source manifest --input data/pairs.jsonl \
        --out shards --shard-size 1000

The converter reads the source like training does (:func:`autoglm_phone.data.sources.read_split`):
media paths that leave the data root are refused unless ``--allow-outside-root``, and only
regular files of a supported format up to ``--max-file-mb`` are copied. The reader of the shards
is :mod:`autoglm_phone.data.shards`; this module only writes them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from autoglm_phone.data.decode import MAX_FILE_BYTES, SampleError, read_media_file
from autoglm_phone.data.records import (
    SPLITS,
    DataError,
    Record,
    check_strict,
    format_summary,
    skip_entry,
    summarize,
)
from autoglm_phone.data.sources import FILE_READERS, read_split


def _media(record: Record, max_bytes: int) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of the record's image and audio, checked (raises :class:`SampleError`)."""
    out = []
    for modality in ("image", "audio"):
        path = getattr(record, modality)
        if path is not None:
            ext = Path(path).suffix.lower().lstrip(".")
            out.append((ext, read_media_file(path, modality, max_bytes)))
    return out


def write_shards(
    records: Sequence[Record],
    out_dir: str | Path,
    prefix: str,
    shard_size: int,
    strict: bool = False,
    progress: bool = True,
    max_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Write ``records`` as ``out_dir/<prefix>-000000.tar``, ... (``shard_size`` samples each).

    Records sharing media form one sample whose ``.json`` lists their captions. Media bytes are
    copied as they are (decoding errors surface when training reads the shards); rows that
    cannot be read, missing, irregular or oversized files and unsupported formats are skipped and
    summarised, or raise in ``strict`` mode. Returns ``{"shards": [...], "samples": n,
    "skipped": summary}``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if strict:
        check_strict(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[Record]] = {}
    skipped: list[dict[str, str]] = []
    for r in records:
        if r.error is not None:
            skipped.append(skip_entry(r, r.error))
        else:
            groups.setdefault((r.item, r.image, r.audio), []).append(r)
    shards: list[str] = []
    tar = None
    n = 0
    try:
        for rs in tqdm(
            groups.values(), desc=f"shards {prefix}", unit="sample", disable=not progress
        ):
            first = rs[0]
            try:
                media = _media(first, max_bytes)
            except SampleError as e:
                if strict:
                    raise DataError(f"bad sample at {first.where}: {e}") from e
                skipped += [skip_entry(r, e) for r in rs]
                continue
            if n % shard_size == 0:
                if tar is not None:
                    tar.close()
                shards.append(str(out_dir / f"{prefix}-{len(shards):06d}.tar"))
                tar = tarfile.open(shards[-1] + ".tmp", "w")
            meta = {
                "captions": [r.caption for r in rs],
                "source": first.source,
                "rows": [r.row for r in rs],
            }
            key = f"{n:08d}"
            for ext, data in [*media, ("json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            n += 1
    finally:
        if tar is not None:
            tar.close()
    for s in shards:
        os.replace(s + ".tmp", s)
    return {"shards": shards, "samples": n, "skipped": summarize(skipped)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_phone.data.convert_shards",
        description="Convert a manifest, COCO or AudioCaps/Clotho source into tar shards "
        "(<out>/<split>-000000.tar, ...).",
    )
    p.add_argument("--source", required=True, choices=sorted(FILE_READERS))
    p.add_argument("--input", required=True, help="the source file; {split} for one file per split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--image-dir", default=None, help="image folder, relative to the input file")
    p.add_argument("--audio-dir", default=None, help="audio folder, relative to the input file")
    p.add_argument(
        "--split-names",
        nargs="*",
        default=[],
        metavar="SPLIT=NAME",
        help="file names of the splits for {split}, e.g. train=development",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="copy media whose paths leave the input's folder (or --image-dir/--audio-dir)",
    )
    p.add_argument(
        "--max-file-mb", type=float, default=MAX_FILE_BYTES / 2**20, help="largest media file"
    )
    args = p.parse_args(argv)
    names = dict(kv.split("=", 1) for kv in args.split_names)
    for split in args.splits:
        records = read_split(
            args.source,
            args.input,
            split,
            args.image_dir,
            args.audio_dir,
            names,
            allow_outside=args.allow_outside_root,
        )
        result = write_shards(
            records,
            args.out,
            split,
            args.shard_size,
            strict=args.strict,
            max_bytes=int(args.max_file_mb * 2**20),
        )
        print(f"{split}: {result['samples']} samples in {len(result['shards'])} shards")
        print(format_summary(result["skipped"], f"{split}"))


if __name__ == "__main__":
    main()
