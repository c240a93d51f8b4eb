"""train.py and eval.py end to end through Hydra, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL_DATA


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("run")
    _run(
        "train.py",
        "experiment=itc_pretrain",
        "trainer.fast_dev_run=2",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        *SMALL_DATA,
    )
    return run_dir


def test_train_leaves_checkpoint_config_and_logs(trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and (trained / "config.yaml").exists()
    assert (trained / ".hydra" / "config.yaml").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain values only
    hp = state["hyper_parameters"]
    assert hp["model"]["text"]["vocab_size"] > 0 and "tokenizer.json" in hp["tokenizer_files"]
    assert state["global_step"] == 2


def test_eval_reports_all_directions_with_chance(trained, cache_dir, tmp_path):
    out = tmp_path / "metrics.json"
    proc = _run(
        "eval.py",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        f"output_json={out}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}",
    )
    report = json.loads(out.read_text())["retrieval"]
    assert set(report) == {"image->text", "text->image", "audio->text", "text->audio"}
    n_test = 32 + 8  # modality test split + AV scenes
    for m in report.values():
        for k in ("R@1", "R@5", "R@10", "median_rank", "chance_R@1"):
            assert k in m
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
    assert report["image->text"]["num_queries"] == n_test
    assert "x chance" in proc.stdout
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
    _run(
        "train.py",
        "experiment=itc_pretrain",
        f"logger={logger}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        *SMALL_DATA,
    )
    files = [p.name for p in (tmp_path / logger).rglob("*") if p.is_file()]
    assert any(f == "metrics.csv" or f.startswith("events.out.tfevents") for f in files), files
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_multirun_sweeps(tmp_path, cache_dir):
    _run(
        "train.py",
        "-m",
        "experiment=itc_pretrain",
        "seed=1,2",
        "trainer.fast_dev_run=1",
        "logger=csv",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        *SMALL_DATA,
    )
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").exists()
