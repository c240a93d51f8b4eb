"""Instruction pairs from the synthetic attributes, the chat format, and the prefix-LM loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autoglm_phone import AutoGLMModel
from autoglm_phone.data.instructions import (
    AUDIO_QUESTIONS,
    IMAGE_QUESTIONS,
    MODALITY_MEDIA,
    format_chat,
    instructions_for,
    parse_answer,
    reasoning_for,
    split_reasoning,
    tokenize_chat,
)
from autoglm_phone.data.synthetic import (
    AUDIO_ATTRIBUTES,
    IMAGE_ATTRIBUTES,
    SyntheticSpec,
    audio_caption,
    av_caption,
    generate_sample,
    image_caption,
)
from autoglm_phone.losses import align_to_prefix, prefix_lm_loss
from autoglm_phone.tokenizer import cached_tokenizer

SPEC = SyntheticSpec(num_train=4, num_val=1, num_test=1, num_av_train=4)


def _all(vocab):
    return [dict(zip(vocab, values, strict=True)) for values in itertools.product(*vocab.values())]


def _records():
    """Every image and audio attribute combination, and some av pairs of them."""
    images, sounds = _all(IMAGE_ATTRIBUTES), _all(AUDIO_ATTRIBUTES)
    out = [("image", {"caption": image_caption(a), "attributes": a}) for a in images]
    out += [("audio", {"caption": audio_caption(a), "attributes": a}) for a in sounds]
    for a, s in zip(images[::7], itertools.cycle(sounds[::5])):
        attrs = {"image": a, "audio": s}
        out.append(("av", {"caption": av_caption(a, s), "attributes": attrs}))
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [
        generate_sample(SPEC, m, "train", i)["record"]["caption"]
        for m in ("image", "audio")
        for i in range(4)
    ]
    return cached_tokenizer(texts * 5, tmp_path_factory.mktemp("tok"), vocab_size=320)


def _merge(parsed: list[dict]) -> dict:
    out: dict = {}
    for d in parsed:
        for key, value in d.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def test_every_answer_parses_back_to_the_attributes():
    prompts = {}
    for modality, record in _records():
        pairs = instructions_for(modality, record)
        stated = [parse_answer(modality, p, r) for p, r in pairs]
        for d in stated:  # each answer states only true attributes...
            for key, value in d.items():
                truth = record["attributes"][key]
                assert value == truth or value.items() <= truth.items(), (modality, d)
        assert _merge(stated) == record["attributes"]  # ...and together they state them all
        prompts.setdefault(modality, [p for p, _ in pairs])
        assert [p for p, _ in pairs] == prompts[modality]  # wording never depends on the sample
        assert instructions_for(modality, {"caption": record["caption"]}) == pairs
    assert len(prompts["av"]) == 1 + len(IMAGE_QUESTIONS) + len(AUDIO_QUESTIONS)


def test_records_of_the_generated_data():
    for modality in ("image", "audio", "av"):
        record = generate_sample(SPEC, modality, "train", 0)["record"]
        pairs = dict(instructions_for(modality, record))
        attrs = record["attributes"]
        if modality in ("image", "av"):
            expected = record.get("image_caption", record["caption"])
            assert pairs["Describe the image."] == expected
        if modality in ("audio", "av"):
            expected = record.get("audio_caption", record["caption"])
            assert pairs["What is the sound?"] == expected
            count = (attrs["audio"] if modality == "av" else attrs)["count"]
            assert pairs["How many beeps?"] == ("one", "two", "three")[count - 1]


def test_parse_answer_rejects_what_the_grammar_cannot_say():
    with pytest.raises(ValueError, match="unknown prompt"):
        parse_answer("image", "How many beeps?", "two")
    with pytest.raises(ValueError, match="not a image colour"):
        parse_answer("image", "What colour are the shapes?", "magenta")
    with pytest.raises(ValueError, match="not an audio caption"):
        parse_answer("audio", "What is the sound?", "two red circles on the left")
    with pytest.raises(ValueError, match="unknown modality"):
        instructions_for("video", {"caption": "x"})


def test_format_chat():
    assert format_chat("How many beeps?", media=("audio",)) == (
        "<|user|>\n<|audio|>How many beeps?<|assistant|>\n"
    )
    assert format_chat("Describe the scene.", "x", media=("image", "audio"), eos="<e>") == (
        "<|user|>\n<|image|><|audio|>Describe the scene.<|assistant|>\nx<e>"
    )
    assert format_chat("Hi", media=()) == "<|user|>\nHi<|assistant|>\n"
    with pytest.raises(ValueError, match="unknown media"):
        format_chat("Hi", media=("video",))


@pytest.mark.parametrize("modality", ["image", "audio", "av"])
def test_chat_round_trips_and_loss_mask_is_the_response(tokenizer, modality):
    tok, media = tokenizer, MODALITY_MEDIA[modality]
    pairs = instructions_for(modality, generate_sample(SPEC, modality, "train", 1)["record"])
    prompts, responses = zip(*pairs, strict=True)
    batch = tokenize_chat(tok, prompts, responses, media=media)
    ids, real, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert ids.dtype == torch.long and real.dtype == loss.dtype == torch.bool
    assert (ids[~real] == tok.pad_token_id).all() and not (loss & ~real).any()
    for i, (p, r) in enumerate(pairs):
        row = ids[i][real[i]].tolist()
        full = format_chat(p, r, media=media, eos=tok.eos_token)
        assert tok.decode(row) == "[gMASK]<sop>" + full
        assert row == tok(full)["input_ids"]  # same ids as tokenizing the whole text at once
        head = tok(format_chat(p, media=media))["input_ids"]  # what a server sends
        assert row[: len(head)] == head
        # the loss covers exactly the response and the closing eos: one run at the end
        assert tok.decode(ids[i][loss[i]]) == r + tok.eos_token
        cols = loss[i].nonzero().squeeze(1)
        assert cols.tolist() == list(range(len(head), len(row)))
    head = tok(format_chat(prompts[0], media=media))["input_ids"]
    short = tokenize_chat(tok, prompts[:1], responses[:1], media=media, max_length=len(head) + 1)
    assert short["input_ids"].shape[1] == len(head) + 1 and short["loss_mask"].sum() == 1


@pytest.mark.parametrize("modality", ["image", "audio", "av"])
def test_thinking_pairs_reason_from_the_captions_then_answer(tokenizer, modality):
    """The thinking variant: the prompt opens <think>, the trained response is the reasoning
    (what the sample shows / sounds like), </think>, then the plain answer, which the server's
    split_reasoning gives back and parse_answer still reads."""
    record = generate_sample(SPEC, modality, "train", 2)["record"]
    plain = instructions_for(modality, record)
    thinking = instructions_for(modality, record, thinking=True)
    reasoning = reasoning_for(modality, record)
    if modality in ("image", "av"):
        assert f"I see {record.get('image_caption', record['caption'])}." in reasoning
    if modality in ("audio", "av"):
        assert f"I hear {record.get('audio_caption', record['caption'])}." in reasoning
    for (p, answer), (q, response) in zip(plain, thinking, strict=True):
        assert p == q and split_reasoning(response, thinking=True) == (reasoning, answer)
        parse_answer(modality, p, split_reasoning(response, thinking=True)[1])
    prompts, responses = zip(*thinking, strict=True)
    media = MODALITY_MEDIA[modality]
    batch = tokenize_chat(tokenizer, prompts, responses, media=media, thinking=True)
    head = tokenizer(format_chat(prompts[0], media=media, thinking=True))["input_ids"]
    assert tokenizer.decode(head).endswith("<|assistant|>\n<think>")
    row = batch["input_ids"][0][batch["loss_mask"][0]]
    assert tokenizer.decode(row) == responses[0] + tokenizer.eos_token


def test_prefix_lm_loss_by_hand():
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0], [0.0, 0.0, 9.0]],
            [[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],
        ]
    )
    input_ids = torch.tensor([[0, 1, 2, 0], [1, 2, 1, 0]])  # row 1 padded after 3 tokens
    loss_mask = torch.tensor([[False, False, True, True], [False, True, True, False]])

    def nll(row, target):  # -log softmax(row)[target]
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    # a token at t is predicted by the logits at t - 1
    terms = [
        nll([0.0, 1.0, 3.0], 2),  # row 0, token 2 from position 1: right
        nll([1.0, 2.0, 0.0], 0),  # row 0, token 3 from position 2: wrong (argmax 1)
        nll([0.0, 1.0, 0.0], 2),  # row 1, token 1 from position 0: wrong (argmax 1)
        nll([0.5, 0.0, 0.0], 1),  # row 1, token 2 from position 1: wrong (argmax 0)
    ]
    loss, accuracy = prefix_lm_loss(logits, input_ids, loss_mask)
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert accuracy.item() == pytest.approx(1 / 4)
    zero, _ = prefix_lm_loss(logits, input_ids, torch.zeros_like(loss_mask))
    assert zero.item() == 0.0


def test_align_to_prefix_by_hand():
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]).bool()
    prefix_mask = torch.tensor([[1] * 6, [0] + [1] * 5]).bool()  # 2 media positions, left-padded
    ids, scored, lengths = align_to_prefix(input_ids, attention, loss_mask, prefix_mask)
    assert ids.tolist() == [[0, 0, 5, 6, 7, 8], [0, 0, 0, 5, 6, 9]]
    assert scored.int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert lengths.tolist() == [4, 4]  # 2 media + 2 prompt tokens each


def test_prefix_lm_step_on_the_real_model(tokenizer):
    """build_prefix + align_to_prefix + prefix mode: the prefix never sees the response."""
    torch.manual_seed(0)
    # one dense and one MoE layer, as the preset, but dropless: with a capacity limit, which tokens
    # are dropped depends on the whole batch, so the response would reach the prefix through it
    text = {"num_layers": 2, "moe": {"layers": [1], "capacity_factor": 0.0}}
    shallow = {"vision": {"depth": 1}, "audio": {"depth": 1}, "text": text}
    model = AutoGLMModel.from_pretrained("autoglm-phone-tiny", shallow, tokenizer=tokenizer)
    model.eval()
    pairs = instructions_for("image", generate_sample(SPEC, "image", "train", 2)["record"])[:2]
    prompts, responses = zip(*pairs, strict=True)
    batch = tokenize_chat(tokenizer, prompts, responses)
    images = torch.rand(2, 3, 64, 64)

    def step(input_ids):
        embeds, mask, _ = model.build_prefix(images, None, input_ids, batch["attention_mask"])
        ids, loss_mask, lengths = align_to_prefix(
            input_ids, batch["attention_mask"], batch["loss_mask"], mask
        )
        text = loss_mask | (ids != 0)  # where text ids were placed (no pad id 0 in these rows)
        assert torch.equal(embeds[text], model.text.embed_tokens(ids[text]))
        logits = model.text(
            inputs_embeds=embeds, attention_mask=mask, mode="prefix", prefix_lengths=lengths
        )
        return logits, ids, loss_mask, lengths

    with torch.no_grad():
        logits, ids, loss_mask, lengths = step(batch["input_ids"])
        loss, accuracy = prefix_lm_loss(logits, ids, loss_mask)
        assert torch.isfinite(loss) and 0 <= accuracy.item() <= 1
        assert loss.item() == pytest.approx(math.log(model.cfg.text.vocab_size), rel=0.2)
        # other responses: the logits that predict the first response token stay the same
        other = batch["input_ids"].masked_fill(batch["loss_mask"], tokenizer.eos_token_id)
        logits2, *_ = step(other)
    first = loss_mask.int().argmax(dim=1)  # (B,) first response position
    for b in range(2):
        before = slice(0, int(first[b]))  # up to the position predicting the first response
        assert torch.allclose(logits[b, before], logits2[b, before], atol=1e-5)
        assert not torch.allclose(logits[b, first[b] :], logits2[b, first[b] :])
