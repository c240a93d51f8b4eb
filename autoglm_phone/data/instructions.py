"""Instruction (prompt, response) pairs from the synthetic data's attributes, in GLM's chat format.

Each question asks for one attribute of the caption grammar (docs/DATA.md) or for the caption
itself, and its answer is the grammar's own word for it, so :func:`parse_answer` reads the
attribute back and the pairs double as an attribute-accuracy test of generated answers. The
prompt's wording never depends on the attributes (no "is it a circle?"), so it gives nothing
away.

The chat layout follows GLM-4 / GLM-4V (Zeng et al. 2024, "ChatGLM: A Family of Large Language
Models from GLM-130B to GLM-4 All Tools")::

    [gMASK]<sop><|user|>\\n<|image|>How many shapes are there?<|assistant|>\\nthree<|endoftext|>

``[gMASK]<sop>`` come from the tokenizer (:mod:`autoglm_phone.tokenizer` adds them to every
sequence), so :func:`format_chat` leaves them out. ``<|image|>`` / ``<|audio|>`` are one-token
placeholders marking which media the turn refers to; the media tokens themselves are the block
:meth:`AutoGLMModel.build_prefix` puts in front of the text. Only the response and the closing
end-of-text token are trained on (:func:`tokenize_chat`'s ``loss_mask``); the end-of-text token
is what ``generate`` stops on.

:func:`format_conversation` lays out several turns (``<|system|>``, ``<|user|>``,
``<|assistant|>``) the same way, as a server receives them. With ``thinking`` the answer opens
with ``<think>`` (GLM-4.5's reasoning marker): the model writes its reasoning, ``</think>``, then
the answer, and :func:`split_reasoning` takes the two apart. ``instructions_for(...,
thinking=True)`` gives the pairs that teach it: the reasoning lists what the sample shows and
sounds like (its captions), then the answer follows (``experiment=caption_sft_thinking``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from autoglm_phone.data.synthetic import (
    AUDIO_ATTRIBUTES,
    COUNT_WORDS,
    IMAGE_ATTRIBUTES,
    POSITION_PHRASES,
    audio_caption,
    av_caption,
    image_caption,
    parse_caption,
)

USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# GLM-4.5 / GLM-Z1 mark the reasoning before an answer with these (plain text to our tokenizer)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MEDIA_PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>"}
MODALITY_MEDIA = {"image": ("image",), "audio": ("audio",), "av": ("image", "audio")}

# (prompt, attribute): None asks for the whole caption of that part
IMAGE_QUESTIONS: tuple[tuple[str, str | None], ...] = (
    ("Describe the image.", None),
    ("How many shapes are there?", "count"),
    ("Are the shapes small or large?", "size"),
    ("What colour are the shapes?", "colour"),
    ("What shape are they?", "shape"),
    ("Where are the shapes?", "position"),
)
AUDIO_QUESTIONS: tuple[tuple[str, str | None], ...] = (
    ("What is the sound?", None),
    ("How many beeps?", "count"),
    ("Is the sound loud or quiet?", "loudness"),
    ("Is the pitch low, mid or high?", "pitch"),
    ("What timbre do the beeps have?", "timbre"),
    ("Is the pitch steady, rising or falling?", "contour"),
)
QUESTIONS = {"image": IMAGE_QUESTIONS, "audio": AUDIO_QUESTIONS}
DESCRIBE = {m: next(q for q, attr in qs if attr is None) for m, qs in QUESTIONS.items()}
SCENE_PROMPT = "Describe the scene."  # av only: the full av caption


def _answer(attribute: str | None, attributes: Mapping[str, Any], part: str) -> str:
    if attribute is None:
        return image_caption(attributes) if part == "image" else audio_caption(attributes)
    value = attributes[attribute]
    if attribute == "count":
        return COUNT_WORDS[int(value) - 1]
    if attribute == "position":
        return POSITION_PHRASES[value]
    return str(value)


def _parts(modality: str, record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{"image": attrs}``, ``{"audio": attrs}`` or both, from the attributes or the caption."""
    if modality not in MODALITY_MEDIA:
        raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(MODALITY_MEDIA)}")
    attributes = record.get("attributes") or parse_caption(modality, record["caption"])
    if modality == "av":
        return {part: attributes[part] for part in MODALITY_MEDIA["av"]}
    return {modality: attributes}


def instructions_for(
    modality: str, record: Mapping[str, Any], thinking: bool = False
) -> list[tuple[str, str]]:
    """Every (prompt, response) pair for one sample, in a fixed order.

    ``record`` is a jsonl record (``caption`` and ``attributes``) or a ``SyntheticDataset`` item
    (``caption`` only: the attributes are parsed from it). ``av`` samples get the image and the
    audio questions plus :data:`SCENE_PROMPT`. With ``thinking`` each response is
    :func:`reasoning_for` the sample, :data:`THINK_CLOSE`, then the answer (the prompt side is
    ``format_chat(..., thinking=True)``, which opens the reasoning).
    """
    parts = _parts(modality, record)
    pairs = []
    if modality == "av":
        pairs.append((SCENE_PROMPT, av_caption(parts["image"], parts["audio"])))
    for part, attributes in parts.items():
        pairs += [(q, _answer(attr, attributes, part)) for q, attr in QUESTIONS[part]]
    if thinking:
        reasoning = reasoning_for(modality, record)
        pairs = [(q, with_reasoning(reasoning, a)) for q, a in pairs]
    return pairs


def reasoning_for(modality: str, record: Mapping[str, Any]) -> str:
    """What a thinking answer reasons first: what the model sees and hears, whatever the
    question (``I see three small red circles on the left. I hear ...``), so the answer can be
    read off it."""
    said = {"image": ("I see", image_caption), "audio": ("I hear", audio_caption)}
    return " ".join(
        f"{said[part][0]} {said[part][1](attributes)}."
        for part, attributes in _parts(modality, record).items()
    )


def with_reasoning(reasoning: str, answer: str) -> str:
    """A thinking response: the reasoning, :data:`THINK_CLOSE`, the answer on a new line (the
    prompt already opened :data:`THINK_OPEN`)."""
    return f"{reasoning}{THINK_CLOSE}\n{answer}"


def _parse_value(part: str, attribute: str, response: str) -> dict[str, Any]:
    if attribute == "count":
        words: Sequence[str] = COUNT_WORDS
    elif attribute == "position":
        words = tuple(POSITION_PHRASES.values())
    else:
        words = (IMAGE_ATTRIBUTES if part == "image" else AUDIO_ATTRIBUTES)[attribute]
    if response not in words:
        raise ValueError(f"not a {part} {attribute}: {response!r}")
    if attribute == "count":
        return {"count": COUNT_WORDS.index(response) + 1}
    if attribute == "position":
        return {"position": next(k for k, v in POSITION_PHRASES.items() if v == response)}
    return {attribute: response}


def parse_answer(modality: str, prompt: str, response: str) -> dict[str, Any]:
    """The attributes a response states, nested like the records' (``av``: by part).

    Inverts :func:`instructions_for`; raises ValueError for an unknown prompt or an answer
    outside the grammar, so a generated answer can be scored attribute by attribute.
    """
    if modality == "av" and prompt == SCENE_PROMPT:
        return parse_caption("av", response)
    for part in MODALITY_MEDIA.get(modality, ()):
        for question, attribute in QUESTIONS[part]:
            if question == prompt:
                stated = (
                    parse_caption(part, response)
                    if attribute is None
                    else _parse_value(part, attribute, response)
                )
                return {part: stated} if modality == "av" else stated
    raise ValueError(f"unknown prompt for {modality!r}: {prompt!r}")


def format_chat(
    prompt: str,
    response: str | None = None,
    media: Sequence[str] = ("image",),
    eos: str = "",
    thinking: bool = False,
) -> str:
    """One user turn and, if given, the assistant's ``response`` followed by ``eos``.

    Without a response the text ends after ``<|assistant|>\\n``: the prompt a server sends to
    ``generate``. ``media`` names the placeholders to put before the prompt (``()`` for none).
    ``thinking`` opens the answer with :data:`THINK_OPEN`, so the model writes its reasoning,
    :data:`THINK_CLOSE`, then the answer (:func:`split_reasoning` takes them apart).
    """
    return format_conversation([("user", prompt, tuple(media))], response, eos, thinking)


def format_conversation(
    turns: Sequence[tuple[str, str, Sequence[str]]],
    response: str | None = None,
    eos: str = "",
    thinking: bool = False,
) -> str:
    """Several turns in GLM-4's chat format: ``(role, text, media)`` with role ``system``,
    ``user`` or ``assistant`` (media on user turns only), then ``<|assistant|>\\n`` to answer.

    A single user turn is exactly :func:`format_chat`'s text."""
    parts = []
    for role, text, media in turns:
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role {role!r}; expected one of {tuple(ROLE_TOKENS)}")
        unknown = [m for m in media if m not in MEDIA_PLACEHOLDERS]
        if unknown:
            raise ValueError(
                f"unknown media {unknown}; expected some of {tuple(MEDIA_PLACEHOLDERS)}"
            )
        if media and role != "user":
            raise ValueError(f"media belong to user turns, not {role!r}")
        placeholders = "".join(MEDIA_PLACEHOLDERS[m] for m in media)
        parts.append(f"{ROLE_TOKENS[role]}\n{placeholders}{text}")
    text = "".join(parts) + f"{ASSISTANT}\n" + (THINK_OPEN if thinking else "")
    return text if response is None else text + response + eos


def split_reasoning(text: str, thinking: bool, final: bool = True) -> tuple[str, str]:
    """``(reasoning, answer)`` of generated ``text``.

    The reasoning runs from the start (``thinking``: the prompt opened it) or from a leading
    :data:`THINK_OPEN` the model wrote, up to :data:`THINK_CLOSE`; without a close (the length
    limit cut it short) everything is reasoning. While ``text`` is still growing
    (``final=False``) a tail that may be the start of a tag is held back, so the parts of a
    longer text always extend those of a shorter one (streamed deltas add up to the final split).
    """
    if thinking:
        start = 0
    elif text.startswith(THINK_OPEN):
        start = len(THINK_OPEN)
    elif not final and THINK_OPEN.startswith(text):
        return "", ""  # may still become <think>
    else:
        return "", text
    end = text.find(THINK_CLOSE, start)
    if end >= 0:
        return text[start:end], text[end + len(THINK_CLOSE) :].lstrip("\n")
    reasoning = text[start:]
    if not final:
        for k in range(len(THINK_CLOSE) - 1, 0, -1):
            if reasoning.endswith(THINK_CLOSE[:k]):
                return reasoning[:-k], ""
    return reasoning, ""


def tokenize_chat(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    media: Sequence[str] = ("image",),
    max_length: int | None = None,
    thinking: bool = False,
) -> dict[str, torch.Tensor]:
    """A right-padded chat batch from a Hugging Face tokenizer.

    Prompt part (with the tokenizer's ``[gMASK]<sop>``) and response + ``eos_token`` are
    tokenized apart and concatenated, so the prompt's ids are exactly what a server gets for
    ``format_chat(prompt)``. Returns ``input_ids`` ``(B, T)`` int64, ``attention_mask`` and
    ``loss_mask`` ``(B, T)`` bool (True on the response tokens and the closing eos only). Rows
    longer than ``max_length`` are cut on the right. ``thinking`` ends the prompts with
    :data:`THINK_OPEN` (the responses then hold reasoning, see :func:`instructions_for`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if tokenizer.eos_token is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an eos and a pad token")
    heads = tokenizer([format_chat(p, media=media, thinking=thinking) for p in prompts])
    heads = heads["input_ids"]
    answers = [r + tokenizer.eos_token for r in responses]
    tails = tokenizer(answers, add_special_tokens=False)["input_ids"]
    rows = [(h + r)[:max_length] for h, r in zip(heads, tails, strict=True)]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, head) in enumerate(zip(rows, heads, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = True
        loss_mask[i, len(head) : len(row)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
