"""Hard evaluation suites on the embedded data, beside its (saturated) test split.

Each suite is generated in memory from the synthetic renderers, every sample from its own RNG
seeded by ``(seed, suite, index)`` (an entropy no train/val/test sample uses), so the suites are
deterministic and leave the train/val/test data untouched:

- ``distractors`` (image, audio): single-object scenes and single sounds; for each attribute the
  gallery is the answer's caption with that attribute set to each of its values (the answer plus
  hard distractors differing from it in exactly that attribute). Chance: ``1 / #values``.
- ``compositional`` (image): two-object scenes, ``"a red circle left of a blue square"``. Every
  training scene holds one kind of object (one colour, one shape), so these colour-shape
  combinations within a scene never occur in training. Retrieval among the suite's captions,
  plus two-way tests against the caption with the objects swapped (``relation``: "a blue square
  left of a red circle") and with their colours swapped (``binding``: "a blue circle left of a
  red square"); chance 50%.
- ``snr`` (audio): the distractor clips with white noise at each of ``SNRS_DB``.
- ``overlap`` (audio): each clip mixed with a different clip ``OVERLAP_GAIN_DB`` quieter; the
  caption of the louder one is the answer.

The default training split (5000 + 1000 scenes) holds every one of the 720 single-object image
and 216 audio attribute combinations (:func:`training_combinations`), so no held-out
single-object combination exists without changing it: the compositional suite composes objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoglm_phone.data.synthetic import (
    AUDIO_ATTRIBUTES,
    BACKGROUND_RGB,
    COLOUR_JITTER,
    COLOUR_RGB,
    COLOURS,
    IMAGE_ATTRIBUTES,
    SHAPES,
    SyntheticSpec,
    audio_caption,
    draw_attributes,
    draw_scene,
    image_caption,
    render_audio,
    render_image,
    sample_rng,
)

SUITES = ("distractors", "compositional", "snr", "overlap")
SUITE_IDS = {name: 1000 + i for i, name in enumerate(SUITES)}  # never a modality id (0..2)
SNRS_DB = (20.0, 10.0, 5.0, 0.0, -5.0, -10.0)
OVERLAP_GAIN_DB = -6.0
RELATIONS = ("left of", "above")  # one canonical word order per scene (never "right of")
TWO_OBJECT_RADIUS = (0.08, 0.10)  # the "large" size class


def headroom_rng(seed: int, suite: str, *index: int) -> np.random.Generator:
    if suite not in SUITE_IDS:
        raise ValueError(f"unknown headroom suite {suite!r}; expected one of {SUITES}")
    return np.random.default_rng(np.random.SeedSequence([seed, SUITE_IDS[suite], *index]))


def caption_for(modality: str, attributes: Mapping[str, Any]) -> str:
    return (image_caption if modality == "image" else audio_caption)(attributes)


def attributes_of(modality: str) -> dict[str, tuple]:
    if modality not in ("image", "audio"):
        raise ValueError(f"headroom suites cover image and audio, not {modality!r}")
    return IMAGE_ATTRIBUTES if modality == "image" else AUDIO_ATTRIBUTES


def combination(attributes: Mapping[str, Any]) -> tuple:
    return tuple(attributes[k] for k in sorted(attributes))


def training_combinations(spec: SyntheticSpec, modality: str) -> set[tuple]:
    """The attribute combinations of ``modality`` the training split holds (its own set plus the
    av scenes' part), drawn exactly as :func:`generate_sample` draws them, without rendering."""
    vocab = attributes_of(modality)
    seen = set()
    for index in range(spec.split_size(modality, "train")):
        seen.add(
            combination(draw_attributes(sample_rng(spec.seed, modality, "train", index), vocab))
        )
    for index in range(spec.split_size("av", "train")):
        rng = sample_rng(spec.seed, "av", "train", index)
        attrs = draw_attributes(rng, IMAGE_ATTRIBUTES)  # an av scene draws its image part first
        if modality == "audio":
            render_image(attrs, rng, spec.image_size)  # then renders it, then draws the sound
            attrs = draw_attributes(rng, vocab)
        seen.add(combination(attrs))
    return seen


def hard_distractors(modality: str, attributes: Mapping[str, Any], name: str) -> list[str]:
    """The captions of ``attributes`` with ``name`` set to each of its values (vocabulary order);
    every one but the answer differs from it in exactly that attribute."""
    values = attributes_of(modality)[name]
    return [caption_for(modality, {**attributes, name: value}) for value in values]


# ---------------------------------------------------------------- single objects and sounds
def distractor_sample(spec: SyntheticSpec, modality: str, index: int) -> dict[str, Any]:
    """``attributes``, ``caption`` and the ``image`` (uint8 (H, W, 3)) or ``audio`` (float (T,))."""
    rng = headroom_rng(spec.seed, "distractors", index, modality == "audio")
    attrs = draw_attributes(rng, attributes_of(modality))
    out = {"attributes": attrs, "caption": caption_for(modality, attrs)}
    if modality == "image":
        out["image"] = render_image(attrs, rng, spec.image_size)
    else:
        out["audio"] = _float(render_audio(attrs, rng, spec.sample_rate, spec.audio_seconds))
    return out


def _float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def add_noise(clip: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``clip`` plus white noise whose power is the clip's mean power over ``10^(snr/10)``."""
    power = float(np.mean(clip.astype(np.float64) ** 2))
    noise = rng.normal(0.0, math.sqrt(power / 10 ** (snr_db / 10)), size=clip.shape)
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)


def snr_sample(spec: SyntheticSpec, index: int, snr_db: float) -> dict[str, Any]:
    """The audio distractor sample ``index`` with noise at ``snr_db`` (its own seeded noise)."""
    clean = distractor_sample(spec, "audio", index)
    rng = headroom_rng(spec.seed, "snr", index, int(round((snr_db + 1000.0) * 100)))
    return {**clean, "audio": add_noise(clean["audio"], snr_db, rng), "snr_db": snr_db}


def overlap_sample(spec: SyntheticSpec, index: int) -> dict[str, Any]:
    """The audio distractor sample ``index`` plus a sound with other attributes, quieter by
    ``OVERLAP_GAIN_DB``; the answer stays the louder sound's caption."""
    target = distractor_sample(spec, "audio", index)
    rng = headroom_rng(spec.seed, "overlap", index)
    while True:
        attrs = draw_attributes(rng, AUDIO_ATTRIBUTES)
        if attrs != target["attributes"]:
            break
    other = _float(render_audio(attrs, rng, spec.sample_rate, spec.audio_seconds))
    gain = 10 ** (OVERLAP_GAIN_DB / 20)
    mix = np.clip(target["audio"] + gain * other, -1.0, 1.0).astype(np.float32)
    return {**target, "audio": mix, "interferer": audio_caption(attrs)}


# ---------------------------------------------------------------- two-object scenes
def relation_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """``"a red circle left of a blue square"`` from ``(colour, shape)`` pairs."""
    return f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"


def compositional_sample(spec: SyntheticSpec, index: int) -> dict[str, Any]:
    """Two objects of different colours and different shapes, side by side (``left of``) or
    stacked (``above``), with the caption and its two hard negatives: ``swapped`` (the objects'
    order swapped) and ``rebound`` (their colours swapped)."""
    rng = headroom_rng(spec.seed, "compositional", index)
    colours = rng.choice(len(COLOURS), size=2, replace=False)
    shapes = rng.choice(len(SHAPES), size=2, replace=False)
    first = (COLOURS[colours[0]], SHAPES[shapes[0]])
    second = (COLOURS[colours[1]], SHAPES[shapes[1]])
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]

    tint = rng.integers(-10, 11, size=3)
    background = tuple(int(c) for c in np.clip(np.array(BACKGROUND_RGB) + tint, 0, 255))
    along = rng.uniform(0.25, 0.32)  # distance of each object from the centre along the axis
    across = rng.uniform(0.35, 0.65)  # where the pair sits on the other axis
    objects = []
    for (colour, shape), sign in ((first, -1), (second, 1)):
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(c) for c in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
        radius = rng.uniform(*TWO_OBJECT_RADIUS)
        main = 0.5 + sign * along + rng.uniform(-0.02, 0.02)
        centre = (main, across) if relation == "left of" else (across, main)
        objects.append((shape, rgb, centre, radius, np.deg2rad(rng.uniform(-12.0, 12.0))))
    image = draw_scene(objects, background, rng, spec.image_size)
    return {
        "image": image,
        "caption": relation_caption(first, relation, second),
        "swapped": relation_caption(second, relation, first),
        "rebound": relation_caption((second[0], first[1]), relation, (first[0], second[1])),
        "objects": [first, second],
        "relation": relation,
    }


def suite_samples(spec: SyntheticSpec, suite: str, size: int, **kw) -> list[dict[str, Any]]:
    """``size`` samples of ``suite`` (``modality`` for distractors, ``snr_db`` for snr)."""
    make = {
        "distractors": lambda i: distractor_sample(spec, kw["modality"], i),
        "compositional": lambda i: compositional_sample(spec, i),
        "snr": lambda i: snr_sample(spec, i, kw["snr_db"]),
        "overlap": lambda i: overlap_sample(spec, i),
    }[suite]
    return [make(i) for i in range(size)]


@dataclass(frozen=True)
class AttributeChoice:
    """Accuracy of picking one attribute's value among its hard distractors, and the confusion
    counts ``confusion[true][predicted]`` over the attribute's values."""

    values: tuple
    confusion: list[list[int]]

    @property
    def accuracy(self) -> float:
        total = sum(map(sum, self.confusion))
        return 100.0 * sum(self.confusion[i][i] for i in range(len(self.values))) / max(1, total)

    @property
    def chance(self) -> float:
        return 100.0 / len(self.values)

    def most_confused(self) -> tuple[Any, Any, float] | None:
        """``(true, predicted, % of true)`` of the largest off-diagonal cell, None if none."""
        best = None
        for i, row in enumerate(self.confusion):
            for j, n in enumerate(row):
                if i != j and n and (best is None or n / sum(row) > best[2] / 100):
                    best = (self.values[i], self.values[j], 100.0 * n / sum(row))
        return best


def attribute_choice(values: tuple, truth: list[int], predicted: list[int]) -> AttributeChoice:
    confusion = [[0] * len(values) for _ in values]
    for t, p in zip(truth, predicted, strict=True):
        confusion[t][p] += 1
    return AttributeChoice(tuple(values), confusion)
