"""Long-context episodes from the embedded synthetic data: many media, then one question far back.

An episode is ``num_items`` media items, images and sounds mixed at random, each followed by its
caption, then ONE question about one attribute of one earlier item, whose answer is a single
word::

    <image block> the first item: two large red circles on the left.
    <audio block> the second item: three loud high bell beeps, rising.
    ... (num_items items) ...
    <|user|>\\nWhat colour was the first item?<|assistant|>\\nred<|endoftext|>

Items are named by their ordinal, one word per item, so the question is a look-up of a named
item, not a count over the sequence. The asked item is at least ``min_back`` items before the
question (``items_back >= min_back``) and, with ``ask_within``, among the first ``ask_within``
items: what must be remembered is then bounded while the distance is long (the long-range
recall set-up of the Recurrent Memory Transformer, Bulatov et al. 2022). With
``train_min_items`` the training episodes have between ``train_min_items`` and ``num_items``
items (short ones are easy examples of the same look-up); validation and test ones always have
``num_items``. Media and captions come from :mod:`autoglm_phone.data.synthetic`'s renderers and
grammar (nothing is downloaded); each episode is drawn from its own RNG seeded by ``(seed, split,
index)``, so it is the same whatever the order or the split sizes. Token distances depend on the
tokenizer and are measured where the episode is laid out (:mod:`autoglm_phone.objectives.
episode`). docs/LONG_CONTEXT.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autoglm_phone.data.instructions import format_chat
from autoglm_phone.data.synthetic import (
    AUDIO_ATTRIBUTES,
    COUNT_WORDS,
    IMAGE_ATTRIBUTES,
    SPLIT_IDS,
    audio_caption,
    draw_attributes,
    image_caption,
    parse_caption,
    render_audio,
    render_image,
)

EPISODE_STREAM = 7  # keeps episode seeds apart from synthetic.sample_rng's (seed, modality, ...)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
            "seventeenth", "eighteenth", "nineteenth", "twentieth")  # fmt: skip
CAPTIONS = {"image": image_caption, "audio": audio_caption}
VOCABS = {"image": IMAGE_ATTRIBUTES, "audio": AUDIO_ATTRIBUTES}

# modality -> attribute -> question template ({item} = "second item"); answers are one word
QUESTIONS: dict[str, dict[str, str]] = {
    "image": {
        "count": "How many shapes were in the {item}?",
        "colour": "What colour was the {item}?",
        "shape": "What shape was in the {item}?",
        "size": "Were the shapes small or large in the {item}?",
    },
    "audio": {
        "count": "How many beeps were in the {item}?",
        "pitch": "Was the pitch low, mid or high in the {item}?",
        "timbre": "What timbre did the {item} have?",
        "loudness": "Was the {item} loud or quiet?",
        "contour": "Was the {item} steady, rising or falling?",
    },
}


# captions="short": the one attribute asked per modality, stated right after the item's ordinal
SHORT_ATTRIBUTES = {"image": "colour", "audio": "count"}


@dataclass(frozen=True)
class EpisodeSpec:
    """Sizes of the episode set; media render as in :class:`~autoglm_phone.data.synthetic.
    SyntheticSpec` (``image_size``, ``sample_rate``, ``audio_seconds``)."""

    seed: int = 0
    num_items: int = 16
    min_back: int = 4  # the asked item is at least this many items before the question
    ask_within: int = 0  # > 0: the asked item is among the first ask_within items
    train_min_items: int = 0  # > 0: training episodes have train_min_items..num_items items
    # "full": " the first item: <caption>."; "short": " first red." (key, then its value, as
    # in associative recall), questions only about SHORT_ATTRIBUTES, and the reply opens with
    # the asked key (the cue, " first"), so the answer (" red") is the token that followed it
    captions: str = "full"
    image_size: int = 64
    sample_rate: int = 16000
    audio_seconds: float = 0.5
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 200

    def __post_init__(self) -> None:
        shortest = self.train_min_items or self.num_items
        if not 1 <= self.min_back < shortest <= self.num_items <= len(ORDINALS):
            raise ValueError(
                f"episodes need 1 <= min_back ({self.min_back}) < train_min_items "
                f"({self.train_min_items}, 0: num_items) <= num_items ({self.num_items}) "
                f"<= {len(ORDINALS)}"
            )
        if self.captions not in ("full", "short"):
            raise ValueError(
                f"EpisodeSpec.captions must be 'full' or 'short', got {self.captions!r}"
            )
        if self.ask_within < 0:
            raise ValueError(f"EpisodeSpec.ask_within must be >= 0, got {self.ask_within}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeSpec.{name} must be >= 1, got {getattr(self, name)}")

    def split_size(self, split: str) -> int:
        return int(getattr(self, f"num_{split}"))


def _rngs(spec: EpisodeSpec, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """Two streams per episode: the plan (modalities, attributes, question) and the rendering,
    so the text does not depend on whether the media were rendered."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
    seq = np.random.SeedSequence([spec.seed, EPISODE_STREAM, SPLIT_IDS[split], index])
    return tuple(np.random.default_rng(s) for s in seq.spawn(2))


def answer_word(attribute: str, value: Any) -> str:
    return COUNT_WORDS[int(value) - 1] if attribute == "count" else str(value)


def plan_episode(spec: EpisodeSpec, split: str, index: int) -> dict[str, Any]:
    """The episode's text and facts, without media: ``items`` (``modality``, ``attributes``,
    ``text``), ``question``, ``cue`` (text that opens the reply, in the prompt: ``""`` or the
    asked key), ``answer`` (the word), ``answer_text`` (the reply after the cue, as tokenized),
    ``asked`` (the item's position), ``attribute``, ``items_back`` (items from the asked one to
    the question: 1 is the last item) and ``num_choices`` (how many answers the attribute has:
    chance is ``1 / num_choices``)."""
    plan, _ = _rngs(spec, split, index)
    n = spec.num_items
    if split == "train" and spec.train_min_items:
        n = int(plan.integers(spec.train_min_items, spec.num_items + 1))
    items = []
    for k in range(n):
        modality = ("image", "audio")[int(plan.integers(2))]
        attributes = draw_attributes(plan, VOCABS[modality])
        name = f"{ORDINALS[k]} item"
        text = f" the {name}: {CAPTIONS[modality](attributes)}."
        if spec.captions == "short":
            key = SHORT_ATTRIBUTES[modality]
            text = f" {ORDINALS[k]} {answer_word(key, attributes[key])}."
        items.append({"modality": modality, "attributes": attributes, "name": name, "text": text})
    last = n - spec.min_back + 1  # items from here on are too close to the question
    asked = int(plan.integers(min(last, spec.ask_within) if spec.ask_within else last))
    item = items[asked]
    attribute = sorted(QUESTIONS[item["modality"]])[
        int(plan.integers(len(QUESTIONS[item["modality"]])))
    ]
    answer = answer_word(attribute, item["attributes"][attribute])
    cue, answer_text = "", answer
    if spec.captions == "short":  # the reply opens with the key: the answer is what followed it
        attribute = SHORT_ATTRIBUTES[item["modality"]]
        answer = answer_word(attribute, item["attributes"][attribute])
        cue, answer_text = f" {ORDINALS[asked]}", f" {answer}"
    return {
        "index": index,
        "items": items,
        "question": QUESTIONS[item["modality"]][attribute].format(item=item["name"]),
        "cue": cue,
        "answer": answer,
        "answer_text": answer_text,
        "asked": asked,
        "attribute": attribute,
        "items_back": n - asked,
        "num_choices": len(VOCABS[item["modality"]][attribute]),
    }


def parse_item_text(text: str) -> dict[str, str]:
    """The answer word of every attribute an item's text states (inverts :func:`plan_episode`'s
    item text, e.g. to check an answer against the caption it must come from)."""
    if ": " not in text:  # captions="short": "<ordinal> <value>."
        value = text.strip().removesuffix(".").split()[-1]
        key = "count" if value in COUNT_WORDS else "colour"
        return {key: value}
    caption = text.strip().removesuffix(".").partition(": ")[2]
    modality = "audio" if " beep" in caption else "image"
    return {k: answer_word(k, v) for k, v in parse_caption(modality, caption).items()}


def generate_episode(spec: EpisodeSpec, split: str, index: int) -> dict[str, Any]:
    """:func:`plan_episode` plus each item's media: ``image`` uint8 ``(H, W, 3)`` or ``audio``
    int16 ``(T,)``."""
    episode = plan_episode(spec, split, index)
    _, render = _rngs(spec, split, index)
    for item in episode["items"]:
        if item["modality"] == "image":
            item["image"] = render_image(item["attributes"], render, spec.image_size)
        else:
            item["audio"] = render_audio(
                item["attributes"], render, spec.sample_rate, spec.audio_seconds
            )
    return episode


def episode_texts(spec: EpisodeSpec, split: str = "train") -> list[str]:
    """Every text of a split's episodes (captions, questions, answers): the tokenizer's corpus."""
    out = []
    for i in range(spec.split_size(split)):
        ep = plan_episode(spec, split, i)
        out += [it["text"] for it in ep["items"]] + [ep["question"], ep["answer"]]
    return out


def chance(num_choices: int) -> float:
    """Accuracy of a uniform guess among the attribute's answers (the values are uniform)."""
    return 1.0 / num_choices if num_choices > 0 else math.nan


class EpisodeDataset(torch.utils.data.Dataset):
    """Episodes of one split, generated on access (about 1 ms per item); media as the
    synthetic dataset gives them: images uint8 ``(3, H, W)``, audio float ``(T,)`` in [-1, 1)."""

    def __init__(self, spec: EpisodeSpec, split: str) -> None:
        self.spec, self.split = spec, split
        self.size = spec.split_size(split)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"episode {index} of a {self.split} split of {self.size}")
        episode = generate_episode(self.spec, self.split, index)
        for item in episode["items"]:
            if "image" in item:
                item["image"] = torch.from_numpy(
                    np.ascontiguousarray(item["image"].transpose(2, 0, 1))
                )
            else:
                item["audio"] = torch.from_numpy(item["audio"].astype(np.float32) / 32768.0)
        episode["sample_rate"] = self.spec.sample_rate
        return episode


def collate_episodes(
    episodes: list[dict[str, Any]], tokenizer: Any, image_size: int | None = None
) -> dict[str, Any]:
    """A batch of :class:`EpisodeDataset` items for :func:`autoglm_phone.objectives.episode.
    layout_episodes`: every image of the batch in one tensor, every clip in another, and per
    episode its token pieces, so each tower runs once per batch.

    Keys: ``modality`` (``"episode"``), ``media`` (``{"image": (M, 3, H, W) uint8 or float,
    "audio": (M, T)}``, present modalities only), ``sample_rate``, ``head_ids`` (the tokenizer's
    ``[gMASK]<sop>``), ``items`` (per episode ``(modality, row in media[modality], caption
    ids)``), ``question_ids`` (the chat turn up to ``<|assistant|>\\n``, then the cue),
    ``answer_ids`` (``answer_text`` + end of text), and the facts ``question``, ``answer``,
    ``caption`` (= ``answer``, one per episode), ``attribute``, ``asked``, ``items_back``,
    ``num_choices`` (tensors ``(B,)``).
    ``image_size`` resizes images (bilinear) when it differs from the rendered size."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer needs an end-of-text token to close the answers")
    media: dict[str, list[torch.Tensor]] = {"image": [], "audio": []}
    items = []
    for ep in episodes:
        row = []
        for it in ep["items"]:
            m = it["modality"]
            row.append((m, len(media[m]), it["text"]))
            media[m].append(it[m])
        items.append(row)
    texts = [t for row in items for _, _, t in row]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    items = [[(m, r, next(ids)) for m, r, _ in row] for row in items]
    head = tokenizer("")["input_ids"]  # [gMASK]<sop>, as every tokenized sequence starts
    prompts = [format_chat(ep["question"], media=()) + ep["cue"] for ep in episodes]
    answers = [ep["answer_text"] + tokenizer.eos_token for ep in episodes]
    stacked = {m: torch.stack(v) for m, v in media.items() if v}
    images = stacked.get("image")
    if images is not None and image_size and images.shape[-1] != image_size:
        stacked["image"] = torch.nn.functional.interpolate(
            images.float() / 255.0, size=(image_size, image_size), mode="bilinear"
        )
    return {
        "modality": "episode",
        "media": stacked,
        "sample_rate": int(episodes[0]["sample_rate"]),
        "head_ids": [list(head)] * len(episodes),
        "items": items,
        "question_ids": tokenizer(prompts, add_special_tokens=False)["input_ids"],
        "answer_ids": tokenizer(answers, add_special_tokens=False)["input_ids"],
        "question": [ep["question"] for ep in episodes],
        "answer": [ep["answer"] for ep in episodes],
        "caption": [ep["answer"] for ep in episodes],
        "attribute": [ep["attribute"] for ep in episodes],
        **{
            k: torch.tensor([ep[k] for ep in episodes])
            for k in ("index", "asked", "items_back", "num_choices")
        },
    }
