"""The hard suites beside the embedded test split (autoglm_phone/data/headroom.py) and their
evaluation (``eval.py headroom=true``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config

from autoglm_phone.app import evaluate
from autoglm_phone.app.eval_headroom import format_headroom, pick
from autoglm_phone.data.headroom import (
    add_noise,
    attribute_choice,
    attributes_of,
    combination,
    compositional_sample,
    distractor_sample,
    hard_distractors,
    overlap_sample,
    snr_sample,
    training_combinations,
)
from autoglm_phone.data.synthetic import (
    SyntheticSpec,
    build_synthetic,
    load_split,
    parse_caption,
)

SPEC = SyntheticSpec(num_train=24, num_val=1, num_test=1, num_av_train=6, num_av_val=1,
                     num_av_test=1)  # fmt: skip


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda i: distractor_sample(SPEC, "image", i),
        lambda i: distractor_sample(SPEC, "audio", i),
        lambda i: compositional_sample(SPEC, i),
        lambda i: snr_sample(SPEC, i, 0.0),
        lambda i: overlap_sample(SPEC, i),
    ],
    ids=["image", "audio", "compositional", "snr", "overlap"],
)
def test_suites_are_deterministic(make):
    assert _same(make(3), make(3))
    assert not _same(make(3), make(4))


def test_training_combinations_are_the_training_records(tmp_path):
    folder = build_synthetic(SPEC, tmp_path, progress=False)
    for modality in ("image", "audio"):
        records = load_split(folder, modality, "train")["records"]
        av = load_split(folder, "av", "train")["records"]
        expected = {combination(r["attributes"]) for r in records}
        expected |= {combination(r["attributes"][modality]) for r in av}
        assert training_combinations(SPEC, modality) == expected


def test_compositional_scenes_never_occur_in_training():
    """A training scene holds one kind of object (its caption parses under the single-object
    grammar); every compositional scene holds two kinds differing in colour and in shape."""
    for i in range(20):
        s = compositional_sample(SPEC, i)
        (c1, s1), (c2, s2) = s["objects"]
        assert c1 != c2 and s1 != s2
        assert len({s["caption"], s["swapped"], s["rebound"]}) == 3
        with pytest.raises(ValueError):
            parse_caption("image", s["caption"])
        assert s["caption"] == f"a {c1} {s1} {s['relation']} a {c2} {s2}"


def test_compositional_objects_sit_where_the_relation_says():
    for i in range(8):
        s = compositional_sample(SPEC, i)
        ink = (s["image"].astype(int).sum(-1) < 600).nonzero()  # (rows, cols) of object pixels
        axis = 1 if s["relation"] == "left of" else 0
        coords = ink[axis]
        mid = s["image"].shape[axis] / 2
        assert (coords < mid).sum() > 10 and (coords > mid).sum() > 10


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_a_distractor_differs_from_the_answer_in_exactly_one_attribute(modality):
    sample = distractor_sample(SPEC, modality, 0)
    truth = sample["attributes"]
    for name, values in attributes_of(modality).items():
        gallery = hard_distractors(modality, truth, name)
        assert len(gallery) == len(values) and sample["caption"] in gallery
        for caption in gallery:
            stated = parse_caption(modality, caption)
            differ = {k for k in truth if stated[k] != truth[k]}
            assert differ == (set() if caption == sample["caption"] else {name})


def test_chance_accuracy_and_confusion():
    values = ("red", "green", "blue")
    choice = attribute_choice(values, [0, 0, 1, 2], [0, 1, 1, 1])
    assert choice.chance == pytest.approx(100 / 3)
    assert choice.accuracy == pytest.approx(50.0)
    assert choice.confusion == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert choice.most_confused() == ("blue", "green", 100.0)


def test_pick_counts_ties_against_the_model():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.5, 0.5, 0.5]])
    truth = torch.tensor([0, 1, 2])
    assert pick(scores, truth).tolist() == [1, 1, 0]


def test_noise_is_added_at_the_requested_snr():
    clip = np.sin(np.linspace(0, 400 * np.pi, 16000)).astype(np.float32) * 0.3
    noisy = add_noise(clip, 5.0, np.random.default_rng(0))
    measured = 10 * np.log10(np.mean(clip**2) / np.mean((noisy - clip) ** 2))
    assert measured == pytest.approx(5.0, abs=0.2)


def test_eval_reports_headroom_suites(base_ckpt, cache_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={base_ckpt}",
            f"output_json={out}",
            "tasks=[]",
            "headroom=true",
            "headroom_size=6",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    result = evaluate.run(cfg)
    headroom = json.loads(out.read_text())["headroom"]
    assert headroom == json.loads(json.dumps(result["headroom"]))
    colour = headroom["image distractors"]["colour"]
    assert colour["chance"] == pytest.approx(100 / 6)
    assert sum(map(sum, colour["confusion"])) == 6
    assert headroom["audio distractors"]["pitch"]["chance"] == pytest.approx(100 / 3)
    comp = headroom["image compositional"]
    assert comp["relation (vs swapped)"]["chance"] == 50.0
    assert comp["image->text"]["num_queries"] == 6
    assert {"clean", "snr -10 dB", "overlap -6 dB"} <= set(headroom["audio snr"])
    printed = capsys.readouterr().out
    assert "headroom suite" in printed and "confusion (rows: truth" in printed
    assert format_headroom(headroom) in printed
    assert (tmp_path / "metrics_headroom.png").stat().st_size > 0


def test_headroom_needs_the_embedded_data(base_ckpt, cache_dir, tmp_path):
    cfg = compose_config(
        "eval",
        [f"ckpt_path={base_ckpt}", "headroom=true", f"paths.cache_dir={cache_dir}",
         f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="headroom=true needs the embedded data .*'manifest'"):
        evaluate.run(cfg, data_overrides=["data.name=manifest"])
