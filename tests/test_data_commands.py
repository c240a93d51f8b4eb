"""Every command in docs/DATA.md runs as written on fixtures laid out as the docs describe, through
``run(cfg)`` (Hydra's compose API, no subprocess); and runs that would train nothing fail."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from datafixtures import (
    make_audiocaps,
    make_clotho,
    make_coco,
    make_coco2017,
    make_manifest,
    split_manifest,
)
from hydra import compose, initialize_config_dir

from autoglm_phone.app import evaluate
from autoglm_phone.app import train as train_app
from autoglm_phone.app.schema import register_schemas
from autoglm_phone.data import convert_shards

# appended to each documented train command: one step, small batches, no workers
FAST = [
    "logger=csv",
    "trainer.fast_dev_run=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.audio_seconds=0.25",
]


def doc_commands(doc: Path = ROOT / "docs" / "DATA.md") -> list[list[str]]:
    """The ``python ...`` lines of the doc's bash blocks, continuation lines joined, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("python "):
                commands.append(shlex.split(line)[1:])
    return commands


def compose_config(name: str, overrides: list[str]):
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The layouts the doc's commands name, relative to where they run."""
    root = tmp_path_factory.mktemp("docs")
    make_manifest(root / "mydata", 40)
    split_manifest(make_manifest(root / "mydata", 40, fmt="csv"))
    make_coco(root / "coco", n_images=24)
    make_coco2017(root / "coco")
    make_audiocaps(root / "audiocaps", {"train": 8, "val": 3, "test": 3})
    make_clotho(root / "clotho")
    return root


def test_the_doc_has_the_commands_this_file_runs():
    scripts = [c[0] if c[0] != "-m" else c[1] for c in doc_commands()]
    assert scripts.count("train.py") == 7
    assert scripts.count("eval.py") == 1
    assert scripts.count("autoglm_phone.data.convert_shards") == 3


def test_every_documented_command_runs_as_written(data_root, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(data_root)
    ckpts = []
    for i, argv in enumerate(doc_commands()):
        out = data_root / "outputs" / str(i)
        where = f"docs/DATA.md: python {shlex.join(argv)}"
        if argv[0] == "train.py":
            cfg = compose_config(
                "train",
                [*argv[1:], *FAST, f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"],
            )
            result = train_app.run(cfg)
            state = torch.load(result["ckpt_path"], map_location="cpu", weights_only=True)
            assert state["global_step"] == 1, where
            ckpts.append(result["ckpt_path"])
        elif argv[0] == "eval.py":  # the checkpoint of the first run stands for outputs/...
            args = [f"ckpt_path={ckpts[0]}" if a.startswith("ckpt_path=") else a for a in argv[1:]]
            cfg = compose_config(
                "eval", [*args, f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"]
            )
            assert evaluate.run(cfg)["retrieval_protocol"]["name"] == "item", where
        else:
            assert argv[:2] == ["-m", "autoglm_phone.data.convert_shards"], where
            convert_shards.main(argv[2:])
            assert "0 samples" not in capsys.readouterr().out, where
    assert len(ckpts) == 7


def test_split_names_name_coco2017_image_folders(data_root):
    from autoglm_phone.data.sources import read_split

    path = data_root / "coco" / "annotations" / "captions_{split}2017.json"
    names = {"test": "val"}
    test = read_split("coco", path, "test", image_dir="../{split}2017", split_names=names)
    assert {Path(r.image).parent.name for r in test} == {"val2017"}
    assert all(r.error is None for r in test) and len(test) == 4 * 5


# ---------------------------------------------------------------- runs that train nothing
def _train_cfg(tmp_path, cache_dir, *overrides: str):
    return compose_config(
        "train",
        [
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={cache_dir}",
            *overrides,
        ],
    )


def test_a_data_set_smaller_than_a_batch_trains_with_the_batch_capped(tmp_path, cache_dir, capsys):
    path = make_manifest(tmp_path / "data", 14)  # 6 train rows
    cfg = _train_cfg(
        tmp_path,
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "data.modalities=[image]",
        "data.batch_size=64",
        "trainer.max_epochs=1",
    )
    result = train_app.run(cfg)
    state = torch.load(result["ckpt_path"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert "data.batch_size=64 is more than the 6 image training items" in capsys.readouterr().out


def test_a_manifest_whose_only_row_is_bad_fails_naming_it(tmp_path, cache_dir):
    path = make_manifest(tmp_path / "data", 9, bad={0: "missing_file"})  # 1 train row, missing
    cfg = _train_cfg(
        tmp_path,
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "data.modalities=[image]",
        "trainer.max_epochs=1",
    )
    with pytest.raises(SystemExit) as e:
        train_app.main(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("data error: ") and "pairs.jsonl, line 1" in message
    assert "000.png does not exist" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_no_training_step_writes_no_checkpoint(tmp_path, cache_dir):
    path = make_manifest(tmp_path / "data", 40)
    cfg = _train_cfg(
        tmp_path,
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "trainer.limit_train_batches=0",
    )
    with pytest.raises(RuntimeError, match="no training step ran"):
        train_app.run(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_max_steps_is_the_length_of_training_whatever_max_epochs_says(tmp_path, cache_dir):
    """An experiment's ``max_epochs: 10`` cut ``trainer.max_steps=20`` short on small data;
    here ``max_epochs=1`` stands for it (1 step per epoch) to keep the test short."""
    path = make_manifest(tmp_path / "data", 16)  # 8 train rows: 1 step of 8 per epoch
    cfg = _train_cfg(
        tmp_path,
        cache_dir,
        "data=manifest",
        f"data.path={path}",
        "data.modalities=[image]",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "trainer.max_steps=3",
        "trainer.check_val_every_n_epoch=100",
    )
    result = train_app.run(cfg)
    state = torch.load(result["ckpt_path"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 3


def test_a_data_file_of_the_wrong_shape_ends_the_run_with_one_line(tmp_path, cache_dir):
    (tmp_path / "pairs.jsonl").write_text("")
    cfg = _train_cfg(tmp_path, cache_dir, "data=manifest", f"data.path={tmp_path / 'pairs.jsonl'}")
    with pytest.raises(SystemExit) as e:
        train_app.main(cfg)
    assert str(e.value) == (
        f"data error: {tmp_path / 'pairs.jsonl'} is empty: expected one row per (media, caption) "
        "pair (image, audio, text and optionally split, id)"
    )
