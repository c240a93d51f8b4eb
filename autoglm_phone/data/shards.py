"""WebDataset-format tar shards: stream them (split across ranks and workers), and write them.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key (the member name up
to the first dot of its base name, as in WebDataset). A sample holds an image (``.jpg``, ``.jpeg``,
``.png``, ``.webp``; also ``.gif``, ``.bmp``, ``.tif[f]``), audio (``.wav``, ``.flac``, ``.ogg``,
``.mp3``) and its text: ``.txt`` (one caption) or ``.json`` (``{"captions": [...]}``,
``{"caption": ...}`` or ``{"text": ...}``). Each caption becomes one item; the captions of a
sample share its item id.

Reading uses :mod:`tarfile` instead of the ``webdataset`` package: the format needs ~100 lines
here, the skip-and-count and strict rules stay the same as the file-based sources, and the
pinned stack gains no dependency.

Splitting: with ``G = world_size * num_workers`` readers and at least ``G`` shards, reader ``g``
takes shards ``g, g + G, ...``; with fewer shards every reader scans all of them and keeps samples
``g, g + G, ...``. Either way each sample is read by exactly one reader per epoch. Ranks get equal
work only when shards hold equal numbers of samples (the converter's ``--shard-size`` does, but
for the last shard).

Convert any file source to shards (one set per split, with a progress bar)::

    python -m autoglm_phone.data.shards --source manifest --input data/pairs.jsonl \
        --out shards --shard-size 1000
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from autoglm_phone.data.decode import SampleError, decode_audio, decode_image, normalize_caption
from autoglm_phone.data.records import (
    SPLITS,
    DataError,
    Record,
    check_strict,
    format_summary,
    skip_entry,
    split_file,
    stable_id,
    summarize,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
TEXT_EXTS = ("txt", "json")


def list_shards(pattern: str | Path, split: str | None = None, split_names=None) -> list[Path]:
    """Sorted shard files: a glob pattern (``{split}`` filled in), or every ``.tar`` in a folder."""
    path = split_file(pattern, split, split_names) if split else Path(pattern).expanduser()
    found = sorted(path.glob("*.tar")) if path.is_dir() else sorted(map(Path, glob.glob(str(path))))
    if not found:
        raise FileNotFoundError(f"no tar shards match {path}")
    return found


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, members grouped by key in tar order.

    A damaged tar raises :class:`SampleError` (malformed_row) after its readable samples.
    """
    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and files:
                    yield key, files
                    files = {}
                key = k
                files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if files:
            yield key, files
        raise SampleError("malformed_row", f"unreadable tar after sample {key!r}: {e}") from e
    if files:
        yield key, files


def sample_captions(files: dict[str, bytes]) -> list[Any]:
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("malformed_row", f"bad .json ({e})") from e
        if isinstance(meta, dict):
            meta = meta.get("captions", meta.get("caption", meta.get("text")))
        return meta if isinstance(meta, list) else [meta]
    if "txt" in files:
        return [files["txt"].decode("utf-8", errors="replace")]
    return [None]


def count_items(path: Path, modality: str) -> int:
    """Items (captions) of ``modality``'s samples in one shard, reading only tar headers and
    the small text members; unreadable parts count as nothing."""
    exts = IMAGE_EXTS if modality == "image" else AUDIO_EXTS
    samples: dict[str, tuple[bool, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                has, n = samples.get(key, (False, 1))
                if ext == "json":
                    try:
                        n = len(sample_captions({"json": tar.extractfile(member).read()}))
                    except SampleError:
                        n = 0
                samples[key] = (has or ext in exts, n)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return sum(n for has, n in samples.values() if has)


def _ext(files: dict[str, bytes], exts: Sequence[str]) -> str | None:
    return next((e for e in exts if e in files), None)


def _slot() -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks and DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class ShardDataset(IterableDataset):
    """One modality's items streamed from tar shards, split across ranks and workers.

    ``shuffle`` permutes the shard order each epoch (same on every reader) and shuffles items in a
    buffer of ``buffer`` per reader. Bad samples are skipped and reported in the ``skipped`` list
    of a neighbouring item (the previous one kept back for that), or raise in ``strict`` mode.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        modality: str,
        image_size: int,
        sample_rate: int,
        num_samples: int,
        strict: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        buffer: int = 512,
    ) -> None:
        self.shards = [Path(s) for s in shards]
        self.modality, self.strict, self.shuffle, self.seed = modality, strict, shuffle, seed
        self.image_size, self.sample_rate, self.num_samples = image_size, sample_rate, num_samples
        self.buffer = buffer
        self.epoch = 0  # advanced per pass; persistent workers keep their copy's count
        self._count: int | None = None

    def __len__(self) -> int:
        """Items this rank yields per epoch, about (bad samples, uneven shards): Lightning needs a
        length to plan the LR schedule. Counted once from the tar headers and text members."""
        if self._count is None:
            self._count = sum(count_items(s, self.modality) for s in self.shards)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        return self._count // world

    def _assigned(self, slot: int, slots: int) -> tuple[list[Path], int, int]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        if len(shards) >= slots:
            return shards[slot::slots], 0, 1
        return shards, slot, slots

    def _decode(self, shard: Path, key: str, files: dict[str, bytes]) -> list[dict[str, Any]]:
        img, aud = _ext(files, IMAGE_EXTS), _ext(files, AUDIO_EXTS)
        member = f"{shard.name}:{key}.{img if self.modality == 'image' else aud}"
        if img is None and aud is None:
            raise SampleError("malformed_row", "no image or audio member")
        if (img if self.modality == "image" else aud) is None:
            return []  # the other modality's sample
        if self.modality == "image":
            media = {"image": decode_image(files[img], self.image_size, name=member)}
        else:
            media = {"audio": decode_audio(files[aud], self.sample_rate, self.num_samples, member)}
        items = []
        for i, text in enumerate(sample_captions(files)):
            if not isinstance(text, str) or not normalize_caption(text):
                raise SampleError("empty_caption", f"caption {i} is empty or not text")
            items.append(
                {
                    **media,
                    "caption": normalize_caption(text),
                    "item_id": stable_id(f"{shard.name}/{key}"),
                    "sample_rate": self.sample_rate,
                }
            )
        return items

    def _raw(self) -> Iterator[dict[str, Any]]:
        """Items of this reader, and ``{"skip": entry}`` markers for bad samples."""
        slot, slots = _slot()
        shards, keep, every = self._assigned(slot, slots)
        n = 0
        for shard in shards:
            samples = iter_samples(shard)
            while True:
                try:
                    key, files = next(samples)
                except StopIteration:
                    break
                except SampleError as e:  # damaged tar: report once, by the first reader
                    if every == 1 or keep == 0:
                        yield from self._bad(Record(shard.name, "tar", shard.name), e)
                    break
                n += 1
                if (n - 1) % every != keep:
                    continue
                try:
                    yield from self._decode(shard, key, files)
                except SampleError as e:
                    yield from self._bad(Record(shard.name, key, f"{shard.name}:{key}"), e)

    def _bad(self, record: Record, error: SampleError) -> Iterator[dict[str, Any]]:
        if self.strict:
            raise DataError(f"bad sample at {record.where}: {error}") from error
        yield {"skip": skip_entry(record, error)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(hash((self.seed, self.epoch, *_slot())))
        self.epoch += 1
        buffer: list[dict[str, Any]] = []
        held: dict[str, Any] | None = None  # last item out, kept back to carry later skips
        pending: list[dict[str, str]] = []
        for x in self._raw():
            if "skip" in x:
                (held["skipped"] if held is not None else pending).append(x["skip"])
                continue
            x["skipped"], pending = pending, []
            buffer.append(x)
            if len(buffer) < (self.buffer if self.shuffle else 1):
                continue
            out = buffer.pop(rng.randrange(len(buffer)))
            if held is not None:
                yield held
            held = out
        if self.shuffle:
            rng.shuffle(buffer)
        for out in buffer:
            if held is not None:
                yield held
            held = out
        if held is not None:
            held["skipped"] += pending
            yield held
        elif pending:  # every sample of this reader was bad: no item can carry the report
            print(
                format_summary(summarize(pending), "a reader with only bad samples"),
                file=sys.stderr,
            )


# ---------------------------------------------------------------- writing
def _read(path: str | None) -> tuple[str, bytes] | None:
    if path is None:
        return None
    ext = Path(path).suffix.lower().lstrip(".")
    return ext, Path(path).read_bytes()


def write_shards(
    records: Sequence[Record],
    out_dir: str | Path,
    prefix: str,
    shard_size: int,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``records`` as ``out_dir/<prefix>-000000.tar``, ... (``shard_size`` samples each).

    Records sharing media form one sample whose ``.json`` lists their captions. Media bytes are
    copied as they are (decoding errors surface when training reads the shards); rows that
    cannot be read and missing files are skipped and summarised, or raise in ``strict`` mode.
    Returns ``{"shards": [...], "samples": n, "skipped": summary}``.
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
                media = [m for m in (_read(first.image), _read(first.audio)) if m is not None]
            except OSError as e:
                err = SampleError("missing_file", f"{first.image or first.audio}: {e.strerror}")
                if strict:
                    raise DataError(f"bad sample at {first.where}: {err}") from e
                skipped += [skip_entry(r, err) for r in rs]
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
    from autoglm_phone.data.sources import SOURCES, read_split

    p = argparse.ArgumentParser(
        prog="python -m autoglm_phone.data.shards",
        description="Convert a manifest, COCO or AudioCaps/Clotho source into tar shards "
        "(<out>/<split>-000000.tar, ...).",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
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
    args = p.parse_args(argv)
    names = dict(kv.split("=", 1) for kv in args.split_names)
    for split in args.splits:
        records = read_split(args.source, args.input, split, args.image_dir, args.audio_dir, names)
        result = write_shards(records, args.out, split, args.shard_size, strict=args.strict)
        print(f"{split}: {result['samples']} samples in {len(result['shards'])} shards")
        print(format_summary(result["skipped"], f"{split}"))


if __name__ == "__main__":
    main()
