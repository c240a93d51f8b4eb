"""Every data source behind one interface, chosen by name (``data.name``) from :data:`SOURCES`.

A :class:`DataSource` gives one modality's dataset of a split, the training captions (for the
tokenizer) and the facts the app asks about it: the retrieval protocol eval uses, whether its
items carry attributes to ask instruction questions about, whether generated captions can be
graded, whether bad samples are skipped and counted. The sources:

- ``synthetic``: the embedded procedural set (:mod:`autoglm_phone.data.synthetic`);
- ``episodes``: long-context episodes made from it (:mod:`autoglm_phone.data.episodes`), one
  "modality" ``episode`` whose items each hold many media;
- ``manifest``, ``coco``, ``audiocaps``: annotation files read into :class:`Record` lists
  (:data:`FILE_READERS`), decoded on access;
- ``webdataset``: tar shards, streamed (:mod:`autoglm_phone.data.shards`).

A source is built from a config object with the attributes of the app's ``DataConfig``
(:func:`open_source`); the library does not import the app's schema.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import ConcatDataset, Dataset

from autoglm_phone.data.audiocaps import read_audiocaps
from autoglm_phone.data.coco import read_coco
from autoglm_phone.data.decode import MAX_FILE_BYTES, SampleError, normalize_caption
from autoglm_phone.data.episodes import EpisodeDataset, EpisodeSpec, episode_texts
from autoglm_phone.data.manifest import read_manifest
from autoglm_phone.data.records import (
    DataFileError,
    Record,
    RecordDataset,
    fill_split,
    split_file,
)
from autoglm_phone.data.shards import (
    ShardDataset,
    checked,
    iter_samples,
    list_shards,
    sample_captions,
)
from autoglm_phone.data.synthetic import SyntheticDataset, SyntheticSpec, build_synthetic


def _coco(file: Path, split: str | None, image_dir, audio_dir, allow_outside: bool):
    return read_coco(file, split, image_dir, allow_outside)


def _audiocaps(file: Path, split: str | None, image_dir, audio_dir, allow_outside: bool):
    if split is not None:
        raise DataFileError(f"audiocaps has one CSV per split: put {{split}} in the path ({file})")
    return read_audiocaps(file, audio_dir, allow_outside)


# name -> reader(file, split or None when the file is the split, image_dir, audio_dir, allow)
FILE_READERS: dict[str, Callable[..., list[Record]]] = {
    "manifest": read_manifest,
    "coco": _coco,
    "audiocaps": _audiocaps,
}


def read_split(
    source: str,
    path: str | Path,
    split: str,
    image_dir: str | None = None,
    audio_dir: str | None = None,
    split_names: dict[str, str] | None = None,
    allow_outside: bool = False,
) -> list[Record]:
    """Records of ``split``. With ``{split}`` in ``path`` each split is its own file (named by
    ``split_names`` when given, e.g. Clotho's ``development``); otherwise one file holds every
    split (a manifest's ``split`` column, a Karpathy JSON's ``split`` field). ``{split}`` in
    ``image_dir``/``audio_dir`` is filled the same way (COCO 2017's ``train2017``/``val2017``)."""
    if source not in FILE_READERS:
        raise ValueError(f"unknown file source {source!r}; expected one of {sorted(FILE_READERS)}")
    per_file = "{split}" in str(path)
    image_dir, audio_dir = (
        fill_split(d, split, split_names) if d else d for d in (image_dir, audio_dir)
    )
    file = split_file(path, split, split_names)
    return FILE_READERS[source](
        file, None if per_file else split, image_dir, audio_dir, allow_outside
    )


class DataSource(ABC):
    """What training and evaluation need from a data source (one per ``data.name``)."""

    protocol: ClassVar[str] = "item"  # eval.py's retrieval protocol (autoglm_phone/app/evaluate.py)
    has_questions: ClassVar[bool] = False  # items carry attributes for instruction questions
    captioning_gradable: ClassVar[bool] = False  # generated captions parse back to attributes
    reports_skips: ClassVar[bool] = True  # bad samples are skipped and counted
    modalities: ClassVar[tuple[str, ...]] = ("image", "audio")  # what data.modalities may name

    def prepare(self) -> None:
        """Make the data ready (build, download); called once before the first dataset."""
        return None

    @abstractmethod
    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        """One modality's items of ``split`` (shuffle: for streamed sources, shuffle inside)."""

    @abstractmethod
    def train_texts(self) -> list[str]:
        """The training captions (the tokenizer is trained on them)."""


class ModalityView(Dataset):
    """One modality of an audio-visual scene dataset, captioned with that modality's caption."""

    def __init__(self, dataset: Dataset, modality: str) -> None:
        self.dataset, self.modality = dataset, modality

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["caption"] = item[f"{self.modality}_caption"]
        return item


class SyntheticSource(DataSource):
    """The embedded procedural data, built once into ``cache_dir``; AV scenes add one
    (media, that modality's caption) pair per scene to each modality when ``use_av``."""

    protocol = "caption"  # captions repeat: a retrieved caption is right when its text equals
    has_questions = True
    captioning_gradable = True
    reports_skips = False

    def __init__(
        self, spec: SyntheticSpec, cache_dir: str | Path, use_av: bool, progress: bool = True
    ) -> None:
        self.spec, self.cache_dir, self.use_av, self.progress = (
            spec,
            Path(cache_dir),
            use_av,
            progress,
        )
        self._folder: Path | None = None

    @classmethod
    def from_config(cls, cfg: Any, cache_dir: str | Path, image_size: int, progress: bool = True):
        fields = SyntheticSpec.__dataclass_fields__
        spec = SyntheticSpec(**{k: getattr(cfg, k) for k in fields})
        return cls(spec, cache_dir, cfg.use_av, progress)

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = build_synthetic(self.spec, self.cache_dir, progress=self.progress)
        return self._folder

    def prepare(self) -> None:
        _ = self.folder

    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        parts: list[Dataset] = [SyntheticDataset(self.folder, modality, split)]
        if self.use_av and self.spec.split_size("av", split) > 0:
            parts.append(ModalityView(SyntheticDataset(self.folder, "av", split), modality))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def train_texts(self) -> list[str]:
        return [
            r["caption"]
            for modality in ("image", "audio", "av")
            for r in SyntheticDataset(self.folder, modality, "train").records
        ]


class EpisodeSource(DataSource):
    """Long-context episodes (:mod:`autoglm_phone.data.episodes`), generated on access."""

    protocol = "caption"
    reports_skips = False
    modalities = ("episode",)

    def __init__(self, spec: EpisodeSpec) -> None:
        self.spec = spec

    @classmethod
    def from_config(cls, cfg: Any, cache_dir: str | Path, image_size: int, progress: bool = True):
        names = ("seed", "num_items", "min_back", "ask_within", "train_min_items", "captions",
                 "image_size", "sample_rate", "audio_seconds")  # fmt: skip
        sizes = ("num_train", "num_val", "num_test")
        return cls(EpisodeSpec(**{k: getattr(cfg, k) for k in names + sizes}))

    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        if modality not in self.modalities:
            raise ValueError(
                f"data.name=episodes has only data.modalities=[episode], not {modality!r}"
            )
        return EpisodeDataset(self.spec, split)

    def train_texts(self) -> list[str]:
        return episode_texts(self.spec, "train")


class RealSource(DataSource):
    """A source of the user's files: ``path`` is a manifest, COCO JSON, audio captions CSV or
    shard glob, with ``{split}`` where each split has its own file. Images decode to
    ``image_size``; audio to mono at ``sample_rate``, cropped or zero-padded to ``num_samples``.
    Media paths stay inside their folder unless ``allow_outside``; files over ``max_bytes`` and
    anything but regular files are skipped."""

    name: ClassVar[str] = "real"  # data.name, for messages

    def __init__(
        self,
        path: str,
        image_size: int,
        sample_rate: int,
        num_samples: int,
        image_dir: str | None = None,
        audio_dir: str | None = None,
        split_names: dict[str, str] | None = None,
        strict: bool = False,
        seed: int = 0,
        allow_outside: bool = False,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        if not path:
            raise ValueError(f"data.path is required for data.name={self.name}")
        self.path = str(path)
        self.image_size, self.sample_rate, self.num_samples = image_size, sample_rate, num_samples
        self.image_dir, self.audio_dir = image_dir, audio_dir
        self.split_names, self.strict, self.seed = dict(split_names or {}), strict, seed
        self.allow_outside, self.max_bytes = allow_outside, max_bytes

    @classmethod
    def from_config(
        cls, cfg: Any, cache_dir: str | Path, image_size: int, progress: bool = True, **kw: Any
    ):
        names = cfg.split_names if isinstance(cfg.split_names, dict) else vars(cfg.split_names)
        return cls(
            path=cfg.path,
            image_size=image_size,
            sample_rate=cfg.sample_rate,
            num_samples=int(round(cfg.sample_rate * cfg.audio_seconds)),
            image_dir=cfg.image_dir,
            audio_dir=cfg.audio_dir,
            split_names=names,
            strict=cfg.strict,
            seed=cfg.seed,
            allow_outside=cfg.allow_outside_root,
            max_bytes=int(cfg.max_file_mb * 2**20),
            **kw,
        )

    def _media_args(self, modality: str) -> tuple:
        return (modality, self.image_size, self.sample_rate, self.num_samples, self.strict)

    def _no_rows(self, modality: str, split: str, rows: int) -> DataFileError:
        return DataFileError(
            f"no usable {modality} rows in the {split} split of {self.path} "
            f"({rows} rows, all bad or none); check data.modalities and the paths"
        )


class FileSource(RealSource):
    """Annotation files read by one of :data:`FILE_READERS` (``reader``), decoded on access."""

    def __init__(self, *args: Any, reader: str, **kw: Any) -> None:
        self.name = reader
        super().__init__(*args, **kw)
        self._records: dict[str, list[Record]] = {}

    def records(self, split: str) -> list[Record]:
        if split not in self._records:
            self._records[split] = read_split(
                self.name,
                self.path,
                split,
                self.image_dir,
                self.audio_dir,
                self.split_names,
                self.allow_outside,
            )
        return self._records[split]

    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        ds = RecordDataset(self.records(split), *self._media_args(modality), self.max_bytes)
        if not any(r.error is None for r in ds.records):
            raise self._no_rows(modality, split, len(ds))
        return ds

    def train_texts(self) -> list[str]:
        return [r.caption for r in self.records("train") if r.error is None]


class ShardSource(RealSource):
    """WebDataset-format tar shards (``path``: a glob with ``{split}``), streamed."""

    name = "webdataset"

    def shards(self, split: str) -> list[Path]:
        if "{split}" not in self.path:
            raise ValueError(
                f"shards need {{split}} in data.path, e.g. shards/{{split}}-*.tar: {self.path}"
            )
        return list_shards(self.path, split, self.split_names)

    def dataset(self, modality: str, split: str, shuffle: bool = False) -> Dataset:
        ds = ShardDataset(
            self.shards(split),
            *self._media_args(modality),
            shuffle=shuffle,
            seed=self.seed,
            max_bytes=self.max_bytes,
        )
        if len(ds) == 0:
            raise self._no_rows(modality, split, 0)
        return ds

    def train_texts(self) -> list[str]:
        texts = []
        for shard in self.shards("train"):
            try:
                for _, files in iter_samples(shard, self.max_bytes):
                    try:
                        captions = sample_captions(checked(files))
                    except SampleError:
                        continue
                    texts += [normalize_caption(t) for t in captions if isinstance(t, str)]
            except SampleError:
                continue
        return [t for t in texts if t]


# data.name -> factory(cfg, cache_dir, image_size, progress) of its source
SOURCES: dict[str, Callable[..., DataSource]] = {
    "synthetic": SyntheticSource.from_config,
    "episodes": EpisodeSource.from_config,
    **{name: partial(FileSource.from_config, reader=name) for name in FILE_READERS},
    "webdataset": ShardSource.from_config,
}


def open_source(
    cfg: Any, cache_dir: str | Path, image_size: int, progress: bool = True
) -> DataSource:
    """The source ``cfg.name`` names, built from ``cfg`` (the app's ``DataConfig``)."""
    if cfg.name not in SOURCES:
        raise ValueError(f"unknown data.name {cfg.name!r}; available: {', '.join(SOURCES)}")
    return SOURCES[cfg.name](cfg, cache_dir, image_size, progress)
