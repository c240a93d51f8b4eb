"""LightningDataModule over the data source ``data.name`` picks (``autoglm_phone.data.sources``):
prepares it, trains the tokenizer, batches.

Training batches are dicts keyed by modality (``{"image": ..., "audio": ...}``, Lightning's
``CombinedLoader``); validation/test use one loader per modality. Every modality batch has
``media``, ``sample_rate``, ``input_ids``, ``attention_mask``, ``caption``, ``caption_id``,
``item_id`` (the media's id for the multi-caption protocol; the caption id for synthetic data) and
``skipped`` (bad samples replaced in this batch, see ``autoglm_phone.data.records``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, IterableDataset

from autoglm_phone.app.resume import ResumableLoader, ResumableSampler
from autoglm_phone.app.schema import DataConfig
from autoglm_phone.data.episodes import collate_episodes
from autoglm_phone.data.instructions import DESCRIBE, instructions_for, tokenize_chat
from autoglm_phone.data.records import DataFileError, collate_skipped, stable_id
from autoglm_phone.data.sources import DataSource, open_source
from autoglm_phone.tokenizer import cached_tokenizer, load_tokenizer

SPLITS = ("train", "val", "test")


def caption_id(caption: str) -> int:
    """A stable 63-bit id for a caption, so retrieval keys survive ``all_gather``."""
    return stable_id(caption)


class Collate:
    """Stack one modality's media and tokenize its captions.

    With ``max_chat_len`` set, each item also gets one instruction pair in the chat format
    (``chat_input_ids``, ``chat_attention_mask``, ``chat_loss_mask``, ``prompt``, ``response``):
    item ``i`` asks question ``i mod n`` of its n questions, so every question is asked equally
    often and a resumed run sees the same pairs (no random state). Without ``questions`` (real
    data: no attributes to ask about) every item is a captioning pair: the describe prompt and
    its caption. With ``thinking`` the responses reason first (``instructions_for``).
    """

    def __init__(
        self,
        modality: str,
        tokenizer,
        max_text_len: int,
        image_size: int,
        max_chat_len: int | None = None,
        questions: bool = True,
        thinking: bool = False,
    ) -> None:
        if thinking and not questions:
            raise ValueError(
                "data.thinking needs a source with attributes to reason about (data=synthetic)"
            )
        self.modality, self.tokenizer = modality, tokenizer
        self.max_text_len, self.image_size = max_text_len, image_size
        self.max_chat_len, self.questions, self.thinking = max_chat_len, questions, thinking

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
                pairs = [instructions_for(self.modality, it, self.thinking) for it in items]
                chosen = [p[int(it["index"]) % len(p)] for p, it in zip(pairs, items, strict=True)]
            else:
                chosen = [(DESCRIBE[self.modality], c) for c in captions]
            prompts, responses = [list(x) for x in zip(*chosen, strict=True)]
            chat = tokenize_chat(
                self.tokenizer, prompts, responses, (self.modality,), self.max_chat_len,
                thinking=self.thinking,
            )  # fmt: skip
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
    """Loaders over the source ``data.name`` picks (:func:`~autoglm_phone.data.sources.open_source`)."""

    def __init__(
        self,
        cfg: DataConfig,
        cache_dir: str | Path,
        image_size: int,
        progress: bool = True,
        seed: int = 0,  # of the training order (the run's seed); the data have their own
    ):
        super().__init__()
        self.source: DataSource = open_source(cfg, cache_dir, image_size, progress)
        allowed = self.source.modalities
        if set(cfg.modalities) - set(allowed) or not cfg.modalities:
            raise ValueError(
                f"data.modalities must be a non-empty subset of {list(allowed)} for "
                f"data.name={cfg.name}, got {cfg.modalities}"
            )
        self.cfg, self.cache_dir, self.image_size = cfg, Path(cache_dir), image_size
        self.seed = seed
        self._tokenizer = None

    @property
    def protocol(self) -> str:
        """Retrieval protocol: ``caption`` (correct when the caption text equals; synthetic) or
        ``item`` (correct when it is the query's own media or one of its captions)."""
        return self.source.protocol

    # -- data and tokenizer, made once --------------------------------------------------------
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
        return self.source.train_texts()

    def prepare_data(self) -> None:
        self.source.prepare()
        _ = self.tokenizer

    def dataset(self, modality: str, split: str) -> Dataset:
        return self.source.dataset(modality, split, shuffle=split == "train")

    # -- loaders -------------------------------------------------------------------------------
    def _batch_size(self, dataset: Dataset, modality: str, split: str) -> int:
        """The configured batch size, capped to what one rank holds: training drops the last
        partial batch, so a batch larger than the data would train nothing."""
        wanted = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
        world = self.trainer.world_size if self.trainer else 1
        # shards report their length per rank already
        per_rank = len(dataset) if isinstance(dataset, IterableDataset) else len(dataset) // world
        if per_rank < 1:
            raise DataFileError(
                f"the {split} split of {modality} in {self.cfg.path or self.cfg.name} has "
                f"{len(dataset)} items, fewer than the {world} processes: nothing to run on"
            )
        if wanted > per_rank and split == "train":
            print(
                f"data.batch_size={wanted} is more than the {per_rank} {modality} training items "
                f"per process: using batch size {per_rank}"
            )
            return per_rank
        return wanted

    def _loader(self, modality: str, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(modality, split)
        # training on map-style data: an order seeded per epoch that resumes mid-epoch
        # (autoglm_phone/app/resume.py); shards shuffle inside and restart the epoch on resume
        resumable = shuffle and not isinstance(dataset, IterableDataset)
        return (ResumableLoader if resumable else DataLoader)(
            dataset,
            batch_size=self._batch_size(dataset, modality, split),
            sampler=self._train_sampler(dataset, modality) if resumable else None,
            drop_last=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            collate_fn=self._collate(modality),
        )

    def _collate(self, modality: str):
        if modality == "episode":  # many media per item (autoglm_phone/data/episodes.py)
            return partial(collate_episodes, tokenizer=self.tokenizer, image_size=self.image_size)
        return Collate(
            modality,
            self.tokenizer,
            self.cfg.max_text_len,
            self.image_size,
            self.cfg.max_chat_len if self.cfg.instructions else None,
            questions=self.source.has_questions,
            thinking=self.cfg.thinking and self.cfg.instructions,
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
