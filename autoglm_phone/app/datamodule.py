"""LightningDataModule over the embedded synthetic data or a real source (``data.name``): builds
or reads it, trains the tokenizer, batches.

Training batches are dicts keyed by modality (``{"image": ..., "audio": ...}``, Lightning's
``CombinedLoader``); validation/test use one loader per modality. Every modality batch has
``media``, ``sample_rate``, ``input_ids``, ``attention_mask``, ``caption``, ``caption_id``,
``item_id`` (the media's id for the multi-caption protocol; the caption id for synthetic data) and
``skipped`` (bad samples replaced in this batch, see ``autoglm_phone.data.records``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset

from autoglm_phone.app.resume import ResumableLoader, ResumableSampler
from autoglm_phone.app.schema import DataConfig
from autoglm_phone.data.instructions import DESCRIBE, instructions_for, tokenize_chat
from autoglm_phone.data.records import collate_skipped
from autoglm_phone.data.sources import RealData
from autoglm_phone.data.synthetic import SyntheticDataset, SyntheticSpec, build_synthetic
from autoglm_phone.tokenizer import cached_tokenizer, load_tokenizer

SPLITS = ("train", "val", "test")
DATA_NAMES = ("synthetic", "manifest", "coco", "audiocaps", "webdataset")


def caption_id(caption: str) -> int:
    """A stable 63-bit id for a caption, so retrieval keys survive ``all_gather``."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little") >> 1


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


class Collate:
    """Stack one modality's media and tokenize its captions.

    With ``max_chat_len`` set, each item also gets one instruction pair in the chat format
    (``chat_input_ids``, ``chat_attention_mask``, ``chat_loss_mask``, ``prompt``, ``response``):
    item ``i`` asks question ``i mod n`` of its n questions, so every question is asked equally
    often and a resumed run sees the same pairs (no random state). Without ``questions`` (real
    data: no attributes to ask about) every item is a captioning pair: the describe prompt and
    its caption.
    """

    def __init__(
        self,
        modality: str,
        tokenizer,
        max_text_len: int,
        image_size: int,
        max_chat_len: int | None = None,
        questions: bool = True,
    ) -> None:
        self.modality, self.tokenizer = modality, tokenizer
        self.max_text_len, self.image_size = max_text_len, image_size
        self.max_chat_len, self.questions = max_chat_len, questions

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [it["caption"] for it in items]
        tok = self.tokenizer(
            captions,
            padding=True,
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        batch = {
            "modality": self.modality,
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"].bool(),
            "caption": captions,
            "caption_id": torch.tensor([caption_id(c) for c in captions]),
            "skipped": collate_skipped(items),
        }
        batch["item_id"] = torch.tensor(
            [
                it.get("item_id", i)
                for it, i in zip(items, batch["caption_id"].tolist(), strict=True)
            ]
        )
        if self.max_chat_len:
            if self.questions:
                pairs = [instructions_for(self.modality, it) for it in items]
                chosen = [p[int(it["index"]) % len(p)] for p, it in zip(pairs, items, strict=True)]
            else:
                chosen = [(DESCRIBE[self.modality], c) for c in captions]
            prompts, responses = [list(x) for x in zip(*chosen, strict=True)]
            chat = tokenize_chat(
                self.tokenizer, prompts, responses, (self.modality,), self.max_chat_len
            )
            batch.update({f"chat_{k}": v for k, v in chat.items()})
            batch.update(prompt=prompts, response=responses)
        if self.modality == "image":
            media = torch.stack([it["image"] for it in items])  # (B, 3, H, W) uint8
            if media.shape[-1] != self.image_size or media.shape[-2] != self.image_size:
                media = F.interpolate(
                    media.float() / 255.0, size=(self.image_size, self.image_size), mode="bilinear"
                )
            batch["media"] = media
            batch["sample_rate"] = 0
        else:
            batch["media"] = torch.stack([it["audio"] for it in items])  # (B, T) float
            batch["sample_rate"] = int(items[0]["sample_rate"])
        return batch


class MultiModalDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DataConfig,
        cache_dir: str | Path,
        image_size: int,
        progress: bool = True,
        seed: int = 0,  # of the training order (the run's seed); the data have their own
    ):
        super().__init__()
        if cfg.name not in DATA_NAMES:
            raise ValueError(f"unknown data.name {cfg.name!r}; available: {', '.join(DATA_NAMES)}")
        unknown = set(cfg.modalities) - {"image", "audio"}
        if unknown or not cfg.modalities:
            raise ValueError(
                f"data.modalities must be a non-empty subset of [image, audio], got {cfg.modalities}"
            )
        self.cfg, self.cache_dir, self.image_size, self.progress = (
            cfg,
            Path(cache_dir),
            image_size,
            progress,
        )
        self.spec = SyntheticSpec(
            seed=cfg.seed,
            image_size=cfg.image_size,
            sample_rate=cfg.sample_rate,
            audio_seconds=cfg.audio_seconds,
            num_train=cfg.num_train,
            num_val=cfg.num_val,
            num_test=cfg.num_test,
            num_av_train=cfg.num_av_train,
            num_av_val=cfg.num_av_val,
            num_av_test=cfg.num_av_test,
        )
        self.seed = seed
        self._folder: Path | None = None
        self._tokenizer = None
        self.real: RealData | None = None
        if cfg.name != "synthetic":
            self.real = RealData(
                cfg.name,
                cfg.path,
                image_size,
                cfg.sample_rate,
                int(round(cfg.sample_rate * cfg.audio_seconds)),
                cfg.image_dir,
                cfg.audio_dir,
                cfg.split_names,
                cfg.strict,
                cfg.seed,
            )

    @property
    def protocol(self) -> str:
        """Retrieval protocol: ``caption`` (correct when the caption text equals; synthetic) or
        ``item`` (correct when it is the query's own media or one of its captions)."""
        return "caption" if self.real is None else "item"

    # -- data and tokenizer, made once --------------------------------------------------------
    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = build_synthetic(self.spec, self.cache_dir, progress=self.progress)
        return self._folder

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.cfg.tokenizer_path:
                self._tokenizer = load_tokenizer(self.cfg.tokenizer_path)
            else:
                texts = self.training_captions()
                self._tokenizer = cached_tokenizer(texts, self.cache_dir, self.cfg.vocab_size)
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def training_captions(self) -> list[str]:
        if self.real is not None:
            return self.real.training_captions()
        texts: list[str] = []
        for modality in ("image", "audio", "av"):
            texts += [
                r["caption"] for r in SyntheticDataset(self.folder, modality, "train").records
            ]
        return texts

    def prepare_data(self) -> None:
        _ = self.tokenizer if self.real is not None else (self.folder, self.tokenizer)

    def dataset(self, modality: str, split: str) -> Dataset:
        if self.real is not None:
            return self.real.dataset(modality, split, shuffle=split == "train")
        parts: list[Dataset] = [SyntheticDataset(self.folder, modality, split)]
        if self.cfg.use_av and self.spec.split_size("av", split) > 0:
            parts.append(ModalityView(SyntheticDataset(self.folder, "av", split), modality))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, modality: str, split: str, shuffle: bool) -> DataLoader:
        batch_size = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
        dataset = self.dataset(modality, split)
        # training on map-style data: an order seeded per epoch that resumes mid-epoch
        # (autoglm_phone/app/resume.py); shards shuffle inside and restart the epoch on resume
        resumable = shuffle and not isinstance(dataset, IterableDataset)
        return (ResumableLoader if resumable else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=self._train_sampler(dataset, modality) if resumable else None,
            drop_last=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            collate_fn=Collate(
                modality,
                self.tokenizer,
                self.cfg.max_text_len,
                self.image_size,
                self.cfg.max_chat_len if self.cfg.instructions else None,
                questions=self.cfg.name == "synthetic",
            ),
        )

    def _train_sampler(self, dataset: Dataset, modality: str) -> ResumableSampler:
        trainer = self.trainer  # None outside a Trainer: one process
        return ResumableSampler(
            dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.seed + self.cfg.modalities.index(modality),
            drop_last=True,
        )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {m: self._loader(m, "train", shuffle=True) for m in self.cfg.modalities}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(m, "val", shuffle=False) for m in self.cfg.modalities]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(m, "test", shuffle=False) for m in self.cfg.modalities]
