"""Long-context episodes: deterministic generation, the asked item far back, the decoder layout
(loss on the answer only, prefix lengths, left-padded generation prompt) and the accuracy-by-
distance arithmetic of eval.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config

from autoglm_phone.app import evaluate
from autoglm_phone.app.eval_tasks import accuracy_by_distance, bucket_label
from autoglm_phone.app.train import build, run
from autoglm_phone.data.episodes import (
    QUESTIONS,
    EpisodeSpec,
    generate_episode,
    parse_item_text,
    plan_episode,
)
from autoglm_phone.losses.lm import IGNORE_INDEX
from autoglm_phone.objectives import ObjectiveConfig, build_objectives, compute
from autoglm_phone.objectives.episode import answer_logits, layout_episodes

SMALL = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=8"]


def test_episodes_are_deterministic_per_seed_split_index():
    spec = EpisodeSpec(num_items=6, min_back=2)
    a, b = generate_episode(spec, "train", 3), generate_episode(spec, "train", 3)
    assert a["question"] == b["question"] and a["answer"] == b["answer"]
    for x, y in zip(a["items"], b["items"], strict=True):
        media = x["modality"]
        assert x["text"] == y["text"] and np.array_equal(x[media], y[media])
    # the text does not depend on whether media were rendered
    plan = plan_episode(spec, "train", 3)
    assert [it["text"] for it in plan["items"]] == [it["text"] for it in a["items"]]
    others = [plan_episode(spec, "train", 4), plan_episode(spec, "val", 3),
              plan_episode(EpisodeSpec(seed=1, num_items=6, min_back=2), "train", 3)]  # fmt: skip
    assert all([it["text"] for it in o["items"]] != [it["text"] for it in plan["items"]]
               for o in others)  # fmt: skip


def test_the_answer_is_the_asked_items_attribute_and_far_back():
    spec = EpisodeSpec(num_items=12, min_back=4)
    for index in range(50):
        ep = plan_episode(spec, "train", index)
        item = ep["items"][ep["asked"]]
        assert ep["items_back"] == spec.num_items - ep["asked"] >= spec.min_back
        assert item["name"] in ep["question"]
        assert ep["question"] in {
            q.format(item=item["name"]) for q in QUESTIONS[item["modality"]].values()
        }
        assert parse_item_text(item["text"])[ep["attribute"]] == ep["answer"]
        assert len(ep["answer"].split()) == 1
    with pytest.raises(ValueError, match="min_back"):
        EpisodeSpec(num_items=4, min_back=4)


def test_ask_within_and_shorter_training_episodes():
    spec = EpisodeSpec(num_items=12, min_back=4, ask_within=3, train_min_items=6)
    train = [plan_episode(spec, "train", i) for i in range(60)]
    lengths = {len(ep["items"]) for ep in train}
    assert min(lengths) == 6 and max(lengths) == 12
    assert all(ep["asked"] < 3 and ep["items_back"] >= 4 for ep in train)
    assert all(len(plan_episode(spec, "val", i)["items"]) == 12 for i in range(20))


def test_short_captions_cue_the_key_and_the_answer_is_the_token_after_it(tokenizer):
    """captions=short is associative recall: the prompt ends with the asked key, and the answer
    tokens are exactly those that followed that key in the asked item's text."""
    from autoglm_phone.data.episodes import EpisodeDataset, collate_episodes

    spec = EpisodeSpec(num_items=6, min_back=2, captions="short", image_size=16, num_train=8)
    batch = collate_episodes([EpisodeDataset(spec, "train")[i] for i in range(8)], tokenizer)
    for i in range(8):
        ep = plan_episode(spec, "train", i)
        item = ep["items"][ep["asked"]]
        key = item["text"].split()[0]
        assert ep["cue"] == f" {key}" and item["text"] == f" {key} {ep['answer']}."
        assert ep["attribute"] in {"colour", "count"} and parse_item_text(item["text"]) == {
            ep["attribute"]: ep["answer"]
        }
        caption = batch["items"][i][ep["asked"]][2]  # token ids of " key value."
        cue = tokenizer(ep["cue"], add_special_tokens=False)["input_ids"]
        assert batch["question_ids"][i][-len(cue) :] == cue == caption[: len(cue)]
        answer = batch["answer_ids"][i][:-1]  # without the end of text
        assert caption[len(cue) : len(cue) + len(answer)] == answer
        assert tokenizer.decode(answer).strip() == ep["answer"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("episodes")
    cfg = compose_config(
        "train",
        ["experiment=long_context_sft", "logger=csv", "logger.name=none",
         f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *SMALL],
    )  # fmt: skip
    b = build(cfg)
    batch = next(iter(b.datamodule._loader("episode", "val", shuffle=False)))  # full length
    return b.module.model.eval(), batch, b.datamodule.tokenizer, cfg


def test_the_asked_item_is_beyond_one_memory_segment(built):
    """With the experiment's sizes no answer can come from the question's own segment."""
    model, batch, _, cfg = built
    layout = layout_episodes(model, batch)
    segment_len = cfg.model.text.memory.segment_len
    assert (layout.distance > segment_len).all(), layout.distance
    # and an episode spans at least 8 segments
    assert (layout.prefix_lengths >= 8 * segment_len).all(), layout.prefix_lengths


def test_layout_scores_only_the_answer_with_the_right_prefix(built):
    model, batch, tok, _ = built
    with torch.no_grad():
        train = layout_episodes(model, batch)  # right-padded
        prompt = layout_episodes(model, batch, answers=False, left_pad=True)
    eos = tok.eos_token_id
    for i, answer in enumerate(batch["answer"]):
        labels = train.labels[i]
        scored = labels[labels != IGNORE_INDEX].tolist()
        assert tok.decode(scored[:-1]).strip() == answer and scored[-1] == eos
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert train.prefix_lengths[i] == first  # right padding: the prefix starts at 0
        assert train.attention_mask[i, :first].all()
        real = int(train.attention_mask[i].sum())
        assert real == first + len(scored) and not train.attention_mask[i, real:].any()
        # the generation prompt: the same prefix, left-padded, ending with the question
        width = prompt.attention_mask.shape[1]
        assert prompt.attention_mask[i, width - first :].all()
        assert not prompt.attention_mask[i, : width - first].any()
        assert prompt.prefix_lengths[i] == first and prompt.question_end[i] == width - 1
        assert torch.equal(prompt.input_ids[i, width - first :], train.input_ids[i, :first])
        assert torch.equal(prompt.inputs_embeds[i, width - first :], train.inputs_embeds[i, :first])
        assert int(prompt.distance[i]) == int(train.distance[i])
    logits, target = answer_logits(model, train)
    assert logits.shape == (int(train.loss_mask[:, 1:].sum()), model.cfg.text.vocab_size)
    assert torch.equal(target, train.input_ids[:, 1:][train.loss_mask[:, 1:]])


def test_media_blocks_sit_where_the_layout_says(built):
    model, batch, _, _ = built
    with torch.no_grad():
        layout = layout_episodes(model, batch)
        m, row, _ = batch["items"][0][0]
        block = model.media_block(m, model.embed_media(m, batch["media"][m][row : row + 1],
                                                       sample_rate=batch["sample_rate"]))  # fmt: skip
    start = len(batch["head_ids"][0])
    assert torch.allclose(
        layout.inputs_embeds[0, start : start + block.shape[1]], block[0], atol=1e-6
    )
    text = layout.input_ids[0, :start]
    assert torch.equal(layout.inputs_embeds[0, :start], model.text.embed_tokens(text))


def test_bucket_arithmetic_on_a_hand_made_case():
    assert [bucket_label((0.0, 1.0, 2.0, 4.0, 8.0), d) for d in (0, 0.99, 1, 3.9, 4, 8, 80)] == [
        "0-1", "0-1", "1-2", "2-4", "4-8", "8+", "8+"]  # fmt: skip
    distances = [0.5, 1.5, 1.9, 3.0, 5.0, 9.0, 12.0]
    correct = [True, True, False, True, False, True, True]
    chances = [0.5, 0.25, 0.5, 1 / 3, 1 / 6, 0.5, 0.25]
    table = accuracy_by_distance(distances, correct, chances)
    assert table["0-1"] == {"accuracy": 100.0, "chance": 50.0, "count": 1.0}
    assert table["1-2"] == {"accuracy": 50.0, "chance": pytest.approx(37.5), "count": 2.0}
    assert table["2-4"]["accuracy"] == 100.0 and table["2-4"]["chance"] == pytest.approx(100 / 3)
    assert table["4-8"] == {"accuracy": 0.0, "chance": pytest.approx(100 / 6), "count": 1.0}
    assert table["8+"] == {"accuracy": 100.0, "chance": pytest.approx(37.5), "count": 2.0}
    empty = accuracy_by_distance([0.2], [True], [0.5])["8+"]
    assert empty["count"] == 0 and math.isnan(empty["accuracy"])


def test_eval_reports_accuracy_by_distance_for_a_long_context_run(tmp_path, cache_dir):
    """``train.py experiment=long_context_sft`` then ``eval.py ckpt_path=...``: the JSON holds the
    accuracy per distance bucket beside chance."""
    cfg = compose_config(
        "train",
        ["experiment=long_context_sft", "logger=csv", "logger.name=none",
         "trainer.fast_dev_run=1", "trainer.enable_progress_bar=false",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *SMALL],
    )  # fmt: skip
    ckpt = run(cfg)["ckpt_path"]
    out = tmp_path / "metrics.json"
    ecfg = compose_config(
        "eval",
        [f"ckpt_path={ckpt}", f"output_json={out}", f"paths.cache_dir={cache_dir}",
         f"paths.output_dir={tmp_path}", "data.eval_batch_size=8"],
    )  # fmt: skip
    evaluate.run(ecfg)
    report = json.loads(out.read_text())["episode"]["episode recall"]
    assert report["num_episodes"] == 16 and report["segment_len"] == 16
    rows = report["by_segments_back"]
    assert list(rows) == ["0-1", "1-2", "2-4", "4-8", "8+"]
    assert sum(r["count"] for r in rows.values()) == 16 and rows["0-1"]["count"] == 0
    assert all(0 < r["chance"] < 100 for r in rows.values() if r["count"])
    assert 0 <= report["accuracy"] <= 100 and out.with_suffix(".png").exists()


def test_episode_batches_refuse_the_media_objectives(built):
    """ITC on an episode batch has no media tensor to read: refused naming the weight to zero."""
    model, batch, _, _ = built
    cfg = ObjectiveConfig(itc_weight=1.0, episode_weight=1.0)
    with pytest.raises(ValueError, match="objective.itc_weight"):
        compute(model, batch, build_objectives(cfg), cfg)
    cfg = ObjectiveConfig(itc_weight=0.0, episode_weight=1.0)
    losses, metrics, _ = compute(model, batch, build_objectives(cfg), cfg)
    assert losses["episode"] > 0 and 0 <= metrics["episode_acc"] <= 1
