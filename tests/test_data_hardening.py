"""Real data as a new user brings it: paths that leave the data root, pipes and devices, files too
large, non-UTF-8 bytes, spreadsheet CSVs, wrong file shapes, every supported audio format through
the shards, truncated shards; and the data package's import graph."""

from __future__ import annotations

import ast
import csv
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import ROOT
from datafixtures import write_audio, write_image
from torch.utils.data import DataLoader

from autoglm_phone.data.convert_shards import write_shards
from autoglm_phone.data.decode import AUDIO_SUFFIXES, SampleError, decode_image
from autoglm_phone.data.records import RecordDataset
from autoglm_phone.data.shards import ShardDataset
from autoglm_phone.data.sources import read_split


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    return path


def _skips(ds, batch_size: int = 4) -> tuple[list[dict], list[dict]]:
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=list)
    items = [it for batch in loader for it in batch]
    return items, [e for it in items for e in it["skipped"]]


# ---------------------------------------------------------------- the data root
def _escaping_manifest(tmp_path: Path) -> tuple[Path, Path]:
    secret = write_image(tmp_path / "outside" / "secret.png", "PNG", "RGB", rgb=(1, 2, 3))
    data = tmp_path / "data"
    write_image(data / "images" / "ok.png", "PNG", "RGB")
    rel = os.path.relpath(secret, data)  # ../outside/secret.png
    path = _jsonl(
        data / "pairs.jsonl",
        [
            {"image": "images/ok.png", "text": "a good picture"},
            {"image": rel, "text": "a picture from elsewhere"},
            {"image": str(secret), "text": "an absolute path elsewhere"},
        ],
    )
    return path, secret


def test_media_paths_outside_the_data_root_are_refused_and_named(tmp_path):
    path, secret = _escaping_manifest(tmp_path)
    records = read_split("manifest", path, "train")
    assert [r.error.reason if r.error else None for r in records] == [
        None,
        "outside_root",
        "outside_root",
    ]
    assert "secret.png" in str(records[1].error) and "allow_outside_root" in str(records[1].error)
    items, skipped = _skips(RecordDataset(records, "image", 8, 16000, 160))
    assert {e["row"] for e in skipped} == {"line 2", "line 3"}
    assert all(e["reason"] == "outside_root" for e in skipped)
    # the converter copies nothing from outside either
    result = write_shards(records, tmp_path / "shards", "train", 10, progress=False)
    assert result["samples"] == 1 and result["skipped"]["by_reason"] == {"outside_root": 2}
    with tarfile.open(result["shards"][0]) as tar:
        assert secret.read_bytes() not in [tar.extractfile(m).read() for m in tar.getmembers()]


def test_outside_root_is_allowed_when_asked(tmp_path):
    path, _ = _escaping_manifest(tmp_path)
    records = read_split("manifest", path, "train", allow_outside=True)
    assert all(r.error is None for r in records)


def test_a_symlinked_media_folder_inside_the_root_is_followed(tmp_path):
    real = tmp_path / "disk" / "images"
    write_image(real / "a.png", "PNG", "RGB")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(real)
    path = _jsonl(tmp_path / "data" / "pairs.jsonl", [{"image": "images/a.png", "text": "a"}])
    (record,) = read_split("manifest", path, "train")
    assert record.error is None
    assert RecordDataset([record], "image", 8, 16000, 160)[0]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize("source", ["coco", "audiocaps"])
def test_coco_and_audiocaps_refuse_escaping_paths(source, tmp_path):
    if source == "coco":
        path = tmp_path / "c.json"
        img = {"filepath": "..", "filename": "passwd.png", "split": "train", "sentences": ["x"]}
        path.write_text(json.dumps({"images": [img]}))
        records = read_split("coco", path, "train")
    else:
        path = tmp_path / "{split}.csv"
        with open(tmp_path / "train.csv", "w", newline="") as f:
            csv.writer(f).writerows([["file_name", "caption"], ["../../x.wav", "a sound"]])
        records = read_split("audiocaps", path, "train")
    assert [r.error.reason for r in records] == ["outside_root"]


# ---------------------------------------------------------------- regular files, size limit
def test_a_named_pipe_is_skipped_not_opened(tmp_path):
    fifo = tmp_path / "images" / "pipe.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    path = _jsonl(tmp_path / "pairs.jsonl", [{"image": "images/pipe.png", "text": "a pipe"}])
    records = read_split("manifest", path, "train")
    done: dict = {}

    def convert() -> None:  # a pipe opened for reading blocks until a writer comes: never here
        done["result"] = write_shards(records, tmp_path / "shards", "train", 10, progress=False)

    worker = threading.Thread(target=convert, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the hung reader so the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("the converter blocked on a named pipe")
    assert done["result"]["skipped"]["by_reason"] == {"bad_file": 1}
    with pytest.raises(SampleError, match="pipe.png is not a regular file"):
        decode_image(fifo, 8)


def test_devices_and_files_over_the_limit_are_skipped(tmp_path):
    big = write_image(tmp_path / "big.png", "PNG", "RGB", size=(400, 400))
    with pytest.raises(SampleError, match="big.png is [0-9,]+ bytes, over the 100-byte limit"):
        decode_image(big, 8, max_bytes=100)
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # a device behind an image name
    rows = [{"image": "zero.png", "text": "zeros"}, {"image": "big.png", "text": "big"}]
    records = read_split("manifest", _jsonl(tmp_path / "m.jsonl", rows), "train")
    result = write_shards(records, tmp_path / "shards", "t", 10, progress=False, max_bytes=100)
    assert result["samples"] == 0
    assert [e["message"] for e in result["skipped"]["rows"]] == [
        f"bad_file: {tmp_path / 'zero.png'} is not a regular file",
        f"bad_file: {big} is {big.stat().st_size:,} bytes, over the 100-byte limit "
        "(data.max_file_mb)",
    ]
    # in shards, a member over the limit is not read into memory
    write_image(tmp_path / "small.png", "PNG", "L", size=(2, 2))
    rows = [{"image": "big.png", "text": "big"}, {"image": "small.png", "text": "small"}]
    records = read_split("manifest", _jsonl(tmp_path / "s.jsonl", rows), "train")
    ok = write_shards(records, tmp_path / "s2", "t", 10, progress=False)["shards"]
    items, skipped = _skips(ShardDataset(ok, "image", 8, 16000, 160, max_bytes=100))
    assert [it["caption"] for it in items] == ["small"]
    assert [e["reason"] for e in skipped] == ["bad_file"]


# ---------------------------------------------------------------- encodings and file shapes
def test_non_utf8_bytes_in_a_jsonl_caption_are_a_counted_skip_naming_the_line(tmp_path):
    write_image(tmp_path / "a.png", "PNG", "RGB")
    good = json.dumps({"image": "a.png", "text": "fine", "split": "train"}).encode()
    bad = b'{"image": "a.png", "text": "caf\xe9 latin-1", "split": "train"}'
    (tmp_path / "m.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    records = read_split("manifest", tmp_path / "m.jsonl", "train")
    assert records[0].error is None
    assert (records[1].row, str(records[1].error)) == (
        "line 2",
        "malformed_row: not UTF-8 (byte 0xe9)",
    )


def test_non_utf8_coco_json_names_the_file(tmp_path):
    path = tmp_path / "captions_train2017.json"
    path.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(ValueError, match=r"captions_train2017.json: not UTF-8 at byte 47"):
        read_split("coco", tmp_path / "captions_{split}2017.json", "train")


def test_a_csv_saved_by_excel_with_a_bom_reads_its_first_column(tmp_path):
    write_image(tmp_path / "a.png", "PNG", "RGB")
    (tmp_path / "m.csv").write_bytes(
        "\ufeffimage,text,split\na.png,a caf\u00e9 picture,train\n".encode()
    )
    (record,) = read_split("manifest", tmp_path / "m.csv", "train")
    assert record.error is None and record.image == str(tmp_path / "a.png")
    assert record.caption == "a caf\u00e9 picture"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("m.csv", "image,description,split\na.png,x,train\n", r"m.csv: no caption column"),
        ("m.csv", "picture,text\na.png,x\n", r"m.csv: no media column"),
        ("m.jsonl", "", r"m.jsonl is empty"),
        ("m.csv", "", r"m.csv is empty"),
        ("m.json", '[{"image": "a.png", "text": "x"}]', r"m.json holds a JSON array"),
        ("m.json", '[\n  {"image": "a.png", "text": "x"}\n]\n', r"m.json holds a JSON array"),
    ],
)
def test_wrong_file_shapes_get_a_message_naming_file_and_expectation(
    name, content, message, tmp_path
):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_split("manifest", tmp_path / name, "train")


@pytest.mark.parametrize(
    "suffix, fmt, subtype", [(".oga", "OGG", "VORBIS"), (".aiff", "AIFF", "PCM_16")]
)
def test_every_audio_format_a_manifest_loads_survives_the_shards(suffix, fmt, subtype, tmp_path):
    assert suffix.lstrip(".") in AUDIO_SUFFIXES
    write_audio(tmp_path / f"clip{suffix}", fmt, subtype, 16000, 1)
    path = _jsonl(tmp_path / "m.jsonl", [{"audio": f"clip{suffix}", "text": "a tone"}])
    records = read_split("manifest", path, "train")
    direct = RecordDataset(records, "audio", 8, 16000, 1600)[0]["audio"]
    shards = write_shards(records, tmp_path / "shards", "train", 10, progress=False)["shards"]
    items, skipped = _skips(ShardDataset(shards, "audio", 8, 16000, 1600))
    assert skipped == [] and len(items) == 1
    assert (items[0]["audio"] == direct).all()


def test_an_unsupported_suffix_is_a_counted_skip_naming_the_formats(tmp_path):
    (tmp_path / "clip.m4a").write_bytes(b"\0" * 64)
    path = _jsonl(tmp_path / "m.jsonl", [{"audio": "clip.m4a", "text": "aac"}])
    result = write_shards(
        read_split("manifest", path, "train"), tmp_path / "s", "t", 10, False, False
    )
    (row,) = result["skipped"]["rows"]
    assert row["reason"] == "unsupported_format" and "'m4a' is not one of wav" in row["message"]


def test_a_truncated_shard_says_where_it_was_cut_and_how_many_samples_were_read(tmp_path):
    for i in range(12):
        write_image(tmp_path / f"{i}.png", "PNG", "RGB", size=(64, 64))
    rows = [{"image": f"{i}.png", "text": f"picture {i}"} for i in range(12)]
    records = read_split("manifest", _jsonl(tmp_path / "m.jsonl", rows), "train")
    (shard,) = write_shards(records, tmp_path / "s", "t", 100, progress=False)["shards"]
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 6])  # 2 of 12 samples whole, then the cut
    items, skipped = _skips(ShardDataset([shard], "image", 8, 16000, 160))
    (entry,) = skipped
    assert len(items) == 2
    assert entry["message"].startswith(
        "malformed_row: t-000000.tar is truncated or damaged after sample 2: 2 whole samples "
        "read, the rest of the shard (from sample '00000002') is lost"
    )


# ---------------------------------------------------------------- the import graph
def _imports(path: Path) -> set[str]:
    """The ``autoglm_phone`` modules ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("autoglm_phone")}
    return out


def test_the_package_has_no_import_cycle():
    package = ROOT / "autoglm_phone"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
