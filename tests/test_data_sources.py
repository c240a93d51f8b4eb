"""The real-data readers, skip-and-count, strict mode, and tar shards split across ranks/workers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from datafixtures import caption, make_audiocaps, make_coco, make_manifest, write_audio
from torch.utils.data import DataLoader

from autoglm_phone.data.convert_shards import write_shards
from autoglm_phone.data.records import DataError, RecordDataset, summarize
from autoglm_phone.data.shards import ShardDataset, list_shards
from autoglm_phone.data.sources import read_split

# Row index -> defect: 4 of the 40 rows (10%), spread over train (32 rows).
DEFECTS = {3: "corrupt_image", 10: "missing_file", 17: "empty_caption", 25: "malformed_row"}


def _collect(ds, workers: int = 0, batch_size: int = 4) -> tuple[list[dict], list[dict]]:
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)
    items = [it for batch in loader for it in batch]
    return items, [e for it in items for e in it["skipped"]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_rows_resolve_relative_to_the_manifest(fmt, tmp_path):
    path = make_manifest(tmp_path / "data", 16, fmt=fmt)
    train = read_split("manifest", str(path), "train")
    val = read_split("manifest", str(path), "val")
    assert [r.row for r in train] == [f"line {i + 1 + (fmt == 'csv')}" for i in range(8)]
    assert len(val) == 4 and all(r.error is None for r in train + val)
    assert train[0].image == str((tmp_path / "data" / "images" / "000.png").resolve())
    assert train[0].caption == caption(0) and train[0].item == train[0].image


def test_manifest_columns_may_be_absent(tmp_path):
    make_manifest(tmp_path, 4)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio": "audio/000.wav", "text": "a", "split": "train"})
        + "\n"
        + json.dumps({"image": "images/000.png", "caption": "b", "split": "train"})
        + "\n"
        + json.dumps({"text": "no media", "split": "train"})
        + "\n"
    )
    rows = read_split("manifest", str(tmp_path / "m.jsonl"), "train")
    assert rows[2].error.reason == "malformed_row"  # no media at all: in both modalities
    audio, image = (RecordDataset(rows, m, 8, 8000, 80) for m in ("audio", "image"))
    assert (len(audio), len(image)) == (2, 2)
    assert audio[0]["caption"] == "a" and image[0]["caption"] == "b"


def test_manifest_without_splits_needs_a_split_template(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "x.png", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match="split column"):
        read_split("manifest", str(tmp_path / "train.jsonl"), "train")
    rows = read_split("manifest", str(tmp_path / "{split}.jsonl"), "train")
    assert len(rows) == 1 and rows[0].image == str(tmp_path.resolve() / "x.png")


@pytest.mark.parametrize("workers", [0, 2])
def test_ten_percent_bad_rows_are_skipped_and_reported_exactly(workers, tmp_path):
    path = make_manifest(tmp_path, 40, bad=DEFECTS)
    records = read_split("manifest", str(path), "train")
    ds = RecordDataset(records, "image", 16, 16000, 1600)
    items, skipped = _collect(ds, workers)
    assert len(items) == len(ds) == 32  # every index gave a good item (bad ones replaced)
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    summary = summarize(skipped)
    expected = {f"line {i + 1}": d for i, d in DEFECTS.items()}
    assert {e["row"]: e["reason"] for e in summary["rows"]} == expected
    assert summary["by_reason"] == dict.fromkeys(sorted(DEFECTS.values()), 1)
    assert all(e["source"] == "pairs.jsonl" for e in summary["rows"])


def test_strict_mode_names_the_file_and_row(tmp_path):
    path = make_manifest(tmp_path, 40, bad={3: "corrupt_image"})
    records = read_split("manifest", str(path), "train")
    ds = RecordDataset(records, "image", 16, 16000, 1600, strict=True)
    with pytest.raises(Exception, match=r"pairs\.jsonl, line 4: corrupt_image: .*003\.png"):
        _collect(ds, workers=2)
    bad = make_manifest(tmp_path / "b", 40, bad={5: "malformed_row"})
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 6: malformed_row"):
        RecordDataset(read_split("manifest", str(bad), "train"), "image", 16, 16000, 1600, True)


def test_coco_karpathy_splits_and_captions(tmp_path):
    path = make_coco(tmp_path, n_images=24, captions=5)
    splits = {
        s: read_split("coco", str(path), s, image_dir="images") for s in ("train", "val", "test")
    }
    # split pattern per 6 images: train, restval, train, val, test, train (restval is train)
    assert {s: len(r) // 5 for s, r in splits.items()} == {"train": 16, "val": 4, "test": 4}
    test = splits["test"]
    assert test[0].row == "images[4].sentences[0]" and test[0].image.endswith(
        "val2014/COCO_000004.jpg"
    )
    assert len({r.item for r in test}) == 4 and all(r.error is None for r in test)
    ds = RecordDataset(test, "image", 16, 16000, 100)
    ids = [ds[i]["item_id"] for i in range(len(ds))]
    assert ids[:5] == [ids[0]] * 5 and len(set(ids)) == 4  # five captions share the image's id


def test_coco_official_format(tmp_path):
    make_coco(tmp_path)  # for the images
    data = {
        "images": [{"id": 7, "file_name": "val2014/COCO_000000.png"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "A cat. "},
            {"id": 2, "image_id": 8, "caption": "orphan"},
            {"id": 3, "image_id": 7, "caption": ""},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    rows = read_split(
        "coco", str(tmp_path / "captions_{split}2017.json"), "val", image_dir="images"
    )
    assert [(r.caption, r.error and r.error.reason) for r in rows] == [
        ("A cat.", None),
        ("", "malformed_row"),
        ("", "empty_caption"),
    ]
    assert rows[0].image == str((tmp_path / "images/val2014/COCO_000000.png").resolve())


def test_audiocaps_and_clotho_csvs(tmp_path):
    pattern = make_audiocaps(tmp_path / "ac", {"train": 6, "test": 3})
    train = read_split("audiocaps", str(pattern), "train", audio_dir="audio")
    test = read_split("audiocaps", str(pattern), "test", audio_dir="audio")
    assert len(train) == 6 and len(test) == 15 and len({r.item for r in test}) == 3
    assert {Path(r.audio).suffix for r in train} == {".wav", ".flac", ".ogg", ".mp3"}  # by stem
    ds = RecordDataset(test, "audio", 16, 16000, 4000)
    assert ds[0]["audio"].shape == (4000,) and ds[0]["skipped"] == []
    # Clotho: one line per clip, caption_1..caption_N columns, split file names differ
    clotho = tmp_path / "clotho"
    write_audio(clotho / "development" / "rain.wav", "WAV", "PCM_16", 44100, 2)
    with open(clotho / "clotho_captions_development.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2", "caption_3"])
        w.writerow(["rain.wav", "Rain falls.", "water drips", "  "])
    rows = read_split(
        "audiocaps",
        str(clotho / "clotho_captions_{split}.csv"),
        "train",
        audio_dir="development",
        split_names={"train": "development"},
    )
    assert [r.row for r in rows] == ["line 2, caption_1", "line 2, caption_2", "line 2, caption_3"]
    assert rows[2].error.reason == "empty_caption" and rows[0].item == rows[1].item


def _shards(tmp_path: Path, n: int = 40, shard_size: int = 4) -> list[Path]:
    path = make_manifest(tmp_path / "m", n)
    records = [r for s in ("train", "val", "test") for r in read_split("manifest", str(path), s)]
    result = write_shards(records, tmp_path / "shards", "all", shard_size, progress=False)
    assert result["samples"] == n and result["skipped"]["total"] == 0
    return [Path(s) for s in result["shards"]]


def test_converter_command_and_shard_reading(tmp_path):
    path = make_coco(tmp_path / "coco", n_images=12, captions=3)
    (tmp_path / "coco" / "images" / "val2014" / "COCO_000004.jpg").unlink()  # a missing test image
    proc = subprocess.run(
        [sys.executable, "-m", "autoglm_phone.data.convert_shards", "--source", "coco"]
        + ["--input", str(path), "--image-dir", "images", "--out", str(tmp_path / "sh")]
        + ["--shard-size", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 8 samples in 3 shards" in proc.stdout and "sample/s" in proc.stderr  # tqdm bar
    assert "test: skipped 3 samples (missing_file=3)" in proc.stdout
    assert "images[4].sentences[0]" in proc.stdout
    shards = list_shards(str(tmp_path / "sh" / "{split}-*.tar"), "train")
    items, skipped = _collect(ShardDataset(shards, "image", 16, 16000, 100), workers=0)
    assert len(items) == 8 * 3 and not skipped
    assert len(ShardDataset(shards, "image", 16, 16000, 100)) == 8 * 3  # from headers and json
    assert len(ShardDataset(shards, "audio", 16, 16000, 100)) == 0  # no audio members
    assert len({it["item_id"] for it in items}) == 8
    assert sorted({it["caption"] for it in items}) == sorted(
        r.caption for r in read_split("coco", str(path), "train")
    )


def test_bad_shard_samples_are_skipped_and_reported(tmp_path):
    shards = _shards(tmp_path, 12, 4)
    # rewrite shard 1 with a corrupt image in its second sample and an empty caption in its third
    import tarfile

    members = []
    with tarfile.open(shards[1]) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(shards[1], "w") as tar:
        for m, data in members:
            if m.name == "00000005.png":
                data = data[:40]
            if m.name == "00000006.json":
                data = json.dumps({"captions": [" "]}).encode()
            m.size = len(data)
            tar.addfile(m, __import__("io").BytesIO(data))
    items, skipped = _collect(ShardDataset(shards, "image", 16, 16000, 100, shuffle=True, buffer=3))
    summary = summarize(skipped)
    assert {(e["source"], e["row"], e["reason"]) for e in summary["rows"]} == {
        ("all-000001.tar", "00000005", "corrupt_image"),
        ("all-000001.tar", "00000006", "empty_caption"),
    }
    assert len(items) == 10
    with pytest.raises(DataError, match=r"all-000001\.tar, 00000005: corrupt_image"):
        _collect(ShardDataset(shards, "image", 16, 16000, 100, strict=True))


_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from torch.utils.data import DataLoader
from autoglm_phone.data.shards import ShardDataset
rank, init, out, shards = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
ds = ShardDataset(shards, "audio", 16, 8000, 80, shuffle=True, seed=3, buffer=4)
loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=list, persistent_workers=True)
seen = [[it["item_id"] for b in loader for it in b] for epoch in range(2)]
json.dump(seen, open(out, "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("num_shards", [10, 3])  # >= 4 readers: by shard; fewer: by sample
def test_two_ranks_two_workers_read_each_sample_exactly_once(num_shards, tmp_path):
    shards = _shards(tmp_path, 40, shard_size=-(-40 // num_shards))
    assert len(shards) == num_shards
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(r), init, str(tmp_path / f"r{r}.json")]
            + [str(s) for s in shards],
            cwd=ROOT,
            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    per_rank = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    expected = sorted(
        it["item_id"] for it in _collect(ShardDataset(shards, "audio", 16, 8000, 80))[0]
    )
    for epoch in range(2):
        seen = per_rank[0][epoch] + per_rank[1][epoch]
        assert sorted(seen) == expected  # every sample once, none twice
        assert per_rank[0][epoch] and per_rank[1][epoch]
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled between epochs
    assert len(expected) == 40
