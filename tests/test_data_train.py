"""train.py and eval.py (``run(cfg)`` in-process) on every real source, built on the fly; the
multi-caption protocol."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose_config
from datafixtures import make_audiocaps, make_coco, make_manifest

from autoglm_phone.app import evaluate
from autoglm_phone.app import train as train_app
from autoglm_phone.app.evaluate import retrieval_report
from autoglm_phone.data import convert_shards

# 4 bad rows of 40 (10%), all in the train split (lines are rows + 1)
DEFECTS = {3: "corrupt_image", 10: "missing_file", 17: "empty_caption", 25: "malformed_row"}
FAST = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    # the tiny preset at depth 1: these tests check the data path, not what is learnt
    "model.vision.depth=1",
    "model.audio.depth=1",
    "model.text.num_layers=2",
    "model.text.moe.layers=[1]",
]


def _train_cfg(run_dir, cache_dir, *overrides: str):
    return compose_config(
        "train",
        [*overrides, f"paths.output_dir={run_dir}", f"paths.cache_dir={cache_dir}", *FAST],
    )


def _eval(run_dir, tmp_path, cache_dir) -> dict:
    out = tmp_path / "metrics.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"output_json={out}",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path / 'eval'}",
        ],
    )
    evaluate.run(cfg)
    return json.loads(out.read_text())


def test_manifest_with_ten_percent_bad_rows_trains_and_reports_exactly_those(
    tmp_path, cache_dir, capsys
):
    path = make_manifest(tmp_path / "data", 40, bad=DEFECTS)
    run = tmp_path / "run"
    cfg = _train_cfg(
        run,
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "trainer.max_epochs=1",  # one full epoch: 32 image rows in 4 batches of 8
    )
    train_app.run(cfg)
    assert (
        "epoch 0 train: skipped 4 samples "
        "(corrupt_image=1, empty_caption=1, malformed_row=1, missing_file=1)"
        in capsys.readouterr().out
    )
    train = [json.loads(x) for x in (run / "skipped_samples.jsonl").read_text().splitlines()]
    train = [s for s in train if s["stage"] == "train"]
    assert len(train) == 1
    assert {r["row"]: r["reason"] for r in train[0]["rows"]} == {
        f"line {i + 1}": d for i, d in DEFECTS.items()
    }
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        logged = [r["data/skipped_train"] for r in csv.DictReader(f) if r["data/skipped_train"]]
    assert logged == ["4.0"]
    # eval: the run's data (test split, 4 good rows), item protocol stated in the JSON
    result = _eval(run, tmp_path, cache_dir)
    assert result["retrieval_protocol"]["name"] == "item"
    assert result["retrieval"]["image->text"]["num_queries"] == 4
    assert result["skipped"]["image"]["total"] == 0


def test_strict_mode_stops_naming_the_file_and_row(tmp_path, cache_dir):
    path = make_manifest(tmp_path / "data", 40, bad={3: "corrupt_image"})
    cfg = _train_cfg(
        tmp_path / "run",
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "data.strict=true",
        "trainer.fast_dev_run=4",
    )
    with pytest.raises(SystemExit) as e:  # what train.py exits with
        train_app.main(cfg)
    message = str(e.value)
    assert "bad sample at pairs.jsonl, line 4: corrupt_image" in message
    assert "003.png" in message


def test_coco_trains_and_evaluates_with_the_multi_caption_protocol(tmp_path, cache_dir):
    path = make_coco(tmp_path / "coco", n_images=24, captions=5)
    run = tmp_path / "run"
    train_app.run(
        _train_cfg(
            run,
            cache_dir,
            "data=coco",
            f"data.path={path}",
            "data.image_dir=images",
            "trainer.fast_dev_run=2",
        )
    )
    result = _eval(run, tmp_path, cache_dir)
    assert set(result["retrieval"]) == {"image->text", "text->image"}
    i2t, t2i = result["retrieval"]["image->text"], result["retrieval"]["text->image"]
    assert (i2t["num_queries"], i2t["gallery_size"]) == (4, 20)  # 4 test images, 5 captions each
    assert (t2i["num_queries"], t2i["gallery_size"]) == (20, 4)
    assert i2t["chance_R@1"] == pytest.approx(100 * 5 / 20)  # 5 of 20 captions are right
    assert result["retrieval_protocol"]["name"] == "item"


def test_caption_sft_on_real_captions(tmp_path, cache_dir):
    """Real data has no attributes to ask about: each item is a describe-prompt/caption pair."""
    path = make_coco(tmp_path / "coco", n_images=24, captions=2)
    run = tmp_path / "run"
    train_app.run(
        _train_cfg(
            run,
            cache_dir,
            "experiment=caption_sft",
            "data=coco",
            f"data.path={path}",
            "data.image_dir=images",
            "trainer.fast_dev_run=2",
        )
    )
    fused = _eval(run, tmp_path, cache_dir)["fused"]
    assert set(fused) == {"image perplexity"}  # captioning accuracy needs the synthetic grammar
    assert (
        1 < fused["image perplexity"]["perplexity"] < 10 * fused["image perplexity"]["vocab_size"]
    )


def test_audiocaps_trains(tmp_path, cache_dir):
    pattern = make_audiocaps(tmp_path / "ac", {"train": 16, "val": 4, "test": 4})
    run = tmp_path / "run"
    train_app.run(
        _train_cfg(
            run,
            cache_dir,
            "data=audiocaps",
            f"data.path='{pattern}'",  # quoted: Hydra reads braces otherwise
            "data.audio_dir=audio",
            "data.audio_seconds=0.5",
            "trainer.fast_dev_run=2",
        )
    )
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["hyper_parameters"]["data"]["name"] == "audiocaps"


def test_webdataset_shards_train_with_workers(tmp_path, cache_dir):
    path = make_manifest(tmp_path / "data", 40)
    convert_shards.main(  # its command line is test_data_sources' concern
        ["--source", "manifest", "--input", str(path), "--out", str(tmp_path / "shards")]
        + ["--shard-size", "8"]
    )
    run = tmp_path / "run"
    train_app.run(
        _train_cfg(
            run,
            cache_dir,
            "data=webdataset",
            f"data.path='{tmp_path / 'shards' / '{split}-*.tar'}'",
            "data.num_workers=2",
            "trainer.max_epochs=1",  # a real epoch: the LR schedule needs the shards' length
            "trainer.log_every_n_steps=1",
        )
    )
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # 32 train pairs in 4 shards, 2 workers, batches of 8
    # the cosine schedule spans the 4 steps (a length-less stream would plan 1 and sit at LR 0)
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    column = next(k for k in rows[0] if k.startswith("lr-"))
    lrs = [float(r[column]) for r in rows if r[column]]
    assert len(lrs) == 4 and min(lrs) > 0, lrs


def test_multi_caption_protocol_any_caption_counts():
    # 2 items with 3 captions each; item 0's media matches only its second caption
    items = torch.tensor([10, 10, 10, 20, 20, 20])
    keys = torch.tensor([1, 2, 3, 4, 5, 6])
    text = torch.eye(6)
    media = torch.zeros(6, 6)
    media[:3, 1] = 1.0  # item 0 (rows 0-2, the same media) close to caption 2 only
    media[3:, 5] = 1.0  # item 1 close to caption 6 only
    media[:3, 3] = 0.5  # and somewhat close to a caption of item 1
    emb = {"media": media, "text": text, "keys": keys, "items": items}
    report = retrieval_report(emb, "image", "item")
    i2t, t2i = report["image->text"], report["text->image"]
    assert (i2t["num_queries"], i2t["gallery_size"]) == (2, 6)  # media once per item
    assert i2t["chance_R@5"] == 100.0 and t2i["chance_R@5"] == 100.0  # gallery smaller than k
    assert i2t["R@1"] == 100.0  # one matching caption is enough
    assert (t2i["num_queries"], t2i["gallery_size"]) == (6, 2)
    # captions 2 and 6 rank their own item first; caption 4 prefers item 0 (0.5 > 0); the other
    # three tie at 0 with both items and count as rank 2 (ties count against the query)
    assert t2i["R@1"] == pytest.approx(100 * 2 / 6)
    # a replaced bad sample repeats a pair: the protocol counts it once
    dup = {k: torch.cat([v, v[:1]]) for k, v in emb.items()}
    assert retrieval_report(dup, "image", "item") == report
    # the caption protocol on the same rows counts every media row as a query instead
    assert retrieval_report(emb, "image", "caption")["image->text"]["num_queries"] == 6
