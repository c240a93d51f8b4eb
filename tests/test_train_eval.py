"""train.py and eval.py end to end: ``run(cfg)`` in-process on configs composed as Hydra composes
them, and the command line itself once (a Hydra multirun) and once failing (eval without a
checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_DATA, compose_config

from autoglm_phone.app import evaluate
from autoglm_phone.app.train import run

# the tiny preset at depth 1 (a dense and an MoE decoder layer): these tests check files, not
# what is learnt
SHALLOW = [
    "model.vision.depth=1",
    "model.audio.depth=1",
    "model.text.num_layers=2",
    "model.text.moe.layers=[1]",
]


def test_train_leaves_checkpoint_config_and_tokenizer(base_run):
    out = Path(base_run["output_dir"])
    ckpt = Path(base_run["ckpt_path"])
    assert ckpt == out / "checkpoints" / "last.ckpt" and (out / "config.yaml").exists()
    assert (out / "tokenizer" / "tokenizer.json").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain values only
    hp = state["hyper_parameters"]
    assert hp["model"]["text"]["vocab_size"] > 0 and "tokenizer.json" in hp["tokenizer_files"]
    assert state["global_step"] == 2


def test_eval_reports_all_directions_with_chance(base_ckpt, cache_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={base_ckpt}",
            f"output_json={out}",
            "tasks=[]",  # retrieval only; the fused tasks are test_recipes' concern
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    result = evaluate.run(cfg)
    report = json.loads(out.read_text())["retrieval"]
    assert report == result["retrieval"]
    assert set(report) == {"image->text", "text->image", "audio->text", "text->audio"}
    n_test = 32 + 8  # modality test split + AV scenes
    for m in report.values():
        for k in ("R@1", "R@5", "R@10", "median_rank", "chance_R@1"):
            assert k in m
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
    assert report["image->text"]["num_queries"] == n_test
    assert "x chance" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0


def test_eval_needs_a_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0 and "ckpt_path" in proc.stderr + proc.stdout


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_other_loggers_write_their_files(logger, tmp_path, cache_dir):
    cfg = compose_config(
        "train",
        [
            "experiment=itc_pretrain",
            f"logger={logger}",
            "trainer.max_steps=2",  # fast_dev_run would replace the logger by a dummy
            "trainer.log_every_n_steps=1",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            *SMALL_DATA,
            *SHALLOW,
        ],
    )
    run(cfg)
    files = [p.name for p in (tmp_path / logger).rglob("*") if p.is_file()]
    assert any(f == "metrics.csv" or f.startswith("events.out.tfevents") for f in files), files
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_train_py_multirun_sweeps(tmp_path, cache_dir):
    """The command line: ``train.py -m`` runs one job per seed, each with Hydra's record of its
    config and its checkpoint, and says where the checkpoint is; wandb logs offline."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "experiment=itc_pretrain",
            "seed=1,2",
            "trainer.fast_dev_run=1",
            "trainer.enable_progress_bar=false",
            "logger=wandb",
            f"hydra.sweep.dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            *SMALL_DATA,
            *SHALLOW,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ("0", "1"):
        ckpt = tmp_path / job / "checkpoints" / "last.ckpt"
        assert f"checkpoint: {ckpt}" in proc.stdout
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 1
        saved = (tmp_path / job / ".hydra" / "config.yaml").read_text()
        assert f"seed: {int(job) + 1}" in saved
        assert (tmp_path / job / "config.yaml").exists()
    for job in ("0", "1"):  # each job its own offline wandb run, not the first job's
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1, job
