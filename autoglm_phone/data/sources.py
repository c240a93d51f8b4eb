"""One entry point over the real sources: records of a split by source name, and datasets."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from autoglm_phone.data.audiocaps import read_audiocaps
from autoglm_phone.data.coco import read_coco
from autoglm_phone.data.decode import SampleError, normalize_caption
from autoglm_phone.data.manifest import read_manifest
from autoglm_phone.data.records import Record, RecordDataset, split_file
from autoglm_phone.data.shards import ShardDataset, iter_samples, list_shards, sample_captions

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


class RealData:
    """Datasets and training captions of one real source (a file source or tar shards).

    ``path`` is the user's path: a manifest, COCO JSON, audio captions CSV or shard glob, with
    ``{split}`` where each split has its own file. Images decode to ``image_size``; audio to mono
    at ``sample_rate``, cropped or zero-padded to ``num_samples``.
    """

    def __init__(
        self,
        name: str,
        path: str,
        image_size: int,
        sample_rate: int,
        num_samples: int,
        image_dir: str | None = None,
        audio_dir: str | None = None,
        split_names: dict[str, str] | None = None,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        if name not in (*SOURCES, "webdataset"):
            raise ValueError(f"unknown source {name!r}; expected one of {(*SOURCES, 'webdataset')}")
        if not path:
            raise ValueError(f"data.path is required for data.name={name}")
        self.name, self.path = name, str(path)
        self.image_size, self.sample_rate, self.num_samples = image_size, sample_rate, num_samples
        self.image_dir, self.audio_dir = image_dir, audio_dir
        self.split_names, self.strict, self.seed = dict(split_names or {}), strict, seed
        self._records: dict[str, list[Record]] = {}

    def records(self, split: str) -> list[Record]:
        if split not in self._records:
            self._records[split] = read_split(
                self.name, self.path, split, self.image_dir, self.audio_dir, self.split_names
            )
        return self._records[split]

    def shards(self, split: str) -> list[Path]:
        if "{split}" not in self.path:
            raise ValueError(
                f"shards need {{split}} in data.path, e.g. shards/{{split}}-*.tar: {self.path}"
            )
        return list_shards(self.path, split, self.split_names)

    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        """One modality's items of ``split`` (shards: an IterableDataset, shuffled if asked)."""
        args = (modality, self.image_size, self.sample_rate, self.num_samples, self.strict)
        if self.name == "webdataset":
            ds = ShardDataset(self.shards(split), *args, shuffle=shuffle, seed=self.seed)
            usable = len(ds) > 0
        else:
            ds = RecordDataset(self.records(split), *args)
            usable = any(r.error is None for r in ds.records)
        if not usable:
            raise ValueError(
                f"no usable {modality} rows in the {split} split of {self.path} "
                f"({len(ds)} rows, all bad or none); check data.modalities and the paths"
            )
        return ds

    def training_captions(self) -> list[str]:
        if self.name != "webdataset":
            return [r.caption for r in self.records("train") if r.error is None]
        texts = []
        for shard in self.shards("train"):
            try:
                for _, files in iter_samples(shard):
                    try:
                        texts += [
                            normalize_caption(t)
                            for t in sample_captions(files)
                            if isinstance(t, str)
                        ]
                    except SampleError:
                        continue
            except SampleError:
                continue
        return [t for t in texts if t]
