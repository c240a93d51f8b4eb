"""WebDataset-format tar shards, streamed and split across ranks and workers.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key (the member name up
to the first dot of its base name, as in WebDataset). A sample holds an image or audio (the
suffixes of :data:`~autoglm_phone.data.decode.IMAGE_SUFFIXES` and
:data:`~autoglm_phone.data.decode.AUDIO_SUFFIXES`, the same list the file sources accept) and its
text: ``.txt`` (one caption) or ``.json`` (``{"captions": [...]}``,
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

Write them from any file source with :mod:`autoglm_phone.data.convert_shards`.
"""

from __future__ import annotations

import glob
import json
import random
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from autoglm_phone.data.decode import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    SampleError,
    decode_audio,
    decode_image,
    normalize_caption,
)
from autoglm_phone.data.records import (
    DataError,
    Record,
    format_summary,
    skip_entry,
    split_file,
    stable_id,
    summarize,
)

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


COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: they report truncation


def _ends_cleanly(path: Path, offset: int) -> bool:
    """Whether an uncompressed tar has its end-of-archive marker (two zero blocks) at ``offset``.
    tarfile takes a file cut at a header boundary for a complete archive; this tells them apart."""
    with open(path, "rb") as f:
        if f.read(6).startswith(COMPRESSED):
            return True
        f.seek(offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    return len(tail) == 2 * tarfile.BLOCKSIZE and not tail.strip(b"\0")


def _truncated(path: Path, whole: int, key: str | None, why: str) -> SampleError:
    lost = f"the rest of the shard (from sample {key!r}) is lost" if key else "nothing was read"
    return SampleError(
        "malformed_row",
        f"{path.name} is truncated or damaged after sample {whole}: {whole} whole samples read, "
        f"{lost} ({why})",
    )


def iter_samples(
    path: Path, max_bytes: int = MAX_FILE_BYTES
) -> Iterator[tuple[str, dict[str, bytes | SampleError]]]:
    """(key, {ext: bytes}) per sample, members grouped by key in tar order. A member over
    ``max_bytes`` is not read: its value is the :class:`SampleError` that says so.

    A damaged or truncated tar raises :class:`SampleError` (malformed_row) after its whole
    samples, saying how many were read (the samples after the damage cannot be counted); the
    sample being read when the damage came is not yielded.
    """
    key, files, n = None, {}, 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and files:
                    yield key, files
                    files, n = {}, n + 1
                key = k
                if member.size > max_bytes:
                    files[ext] = SampleError(
                        "bad_file",
                        f"{path.name}:{member.name} is {member.size:,} bytes, over the "
                        f"{max_bytes:,}-byte limit (data.max_file_mb)",
                    )
                else:
                    files[ext] = tar.extractfile(member).read()
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _truncated(path, n, key, str(e)) from e
    if not _ends_cleanly(path, end):
        raise _truncated(path, n, key, "no end-of-archive marker")
    if files:
        yield key, files


def checked(files: dict[str, bytes | SampleError]) -> dict[str, bytes]:
    """``files`` with every member read, or the first member's :class:`SampleError`."""
    for value in files.values():
        if isinstance(value, SampleError):
            raise value
    return files  # type: ignore[return-value]


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
    exts = IMAGE_SUFFIXES if modality == "image" else AUDIO_SUFFIXES
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
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        self.shards = [Path(s) for s in shards]
        self.modality, self.strict, self.shuffle, self.seed = modality, strict, shuffle, seed
        self.image_size, self.sample_rate, self.num_samples = image_size, sample_rate, num_samples
        self.buffer, self.max_bytes = buffer, max_bytes
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

    def _decode(self, shard: Path, key: str, files: dict[str, Any]) -> list[dict[str, Any]]:
        files = checked(files)
        img, aud = _ext(files, IMAGE_SUFFIXES), _ext(files, AUDIO_SUFFIXES)
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
            samples = iter_samples(shard, self.max_bytes)
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
