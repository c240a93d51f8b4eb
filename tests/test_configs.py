"""Every config composes, every experiment builds its objects, and bad configs fail early."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, SMALL_DATA, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from autoglm_phone.app.train import build
from autoglm_phone.config import MultiModalConfig

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (ROOT / "conf" / "logger").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml"))


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


def test_there_are_experiments():
    assert "itc_pretrain" in EXPERIMENTS


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("logger", LOGGERS)
def test_groups_compose(trainer, logger, tmp_path):
    cfg = compose_train([f"trainer={trainer}", f"logger={logger}", f"paths.output_dir={tmp_path}"])
    assert cfg.logger.name == logger
    OmegaConf.to_object(cfg)  # every value has its schema type


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds_its_objects(experiment, tmp_path, cache_dir):
    cfg = compose_train(
        [
            f"experiment={experiment}",
            "logger=csv",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            "trainer.fast_dev_run=1",
            *SMALL_DATA,
        ]
    )
    built = build(cfg)
    assert built.module.model.text.cfg.vocab_size == len(built.datamodule.tokenizer)
    batch = next(iter(built.datamodule.train_dataloader()))
    assert set(batch[0] if isinstance(batch, tuple) else batch) == set(cfg.data.modalities)
    assert (tmp_path / "config.yaml").exists()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("model.vision.img_sz=64", "img_sz"),
        ("trainer.max_epochs=many", "max_epochs"),
        ("data.batch_size=1.5", "batch_size"),
        ("experiment=no_such_experiment", "no_such_experiment"),
    ],
)
def test_bad_config_fails_at_startup_naming_the_key(override, culprit):
    """Composing fails (the schemas type-check), so nothing is built; the command line's exit
    code and message are checked once in :func:`test_train_py_fails_at_startup_naming_the_key`."""
    with pytest.raises((ConfigCompositionException, ValidationError), match=culprit):
        compose_train([override])


def test_train_py_fails_at_startup_naming_the_key(tmp_path):
    proc = _run("train.py", "data.batch_size=1.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "batch_size" in proc.stderr + proc.stdout
    assert not list(tmp_path.iterdir())  # failed before anything was built or written


def test_an_experiment_sets_its_task_and_model():
    """What ``train.py experiment=itc_pretrain --cfg job`` prints (run by the slow test below)."""
    cfg = compose_train(["experiment=itc_pretrain"])
    assert cfg.task_name == "itc_pretrain" and cfg.model.vision.name == "vit_tiny_patch16_224"


@pytest.mark.slow
def test_hydra_help_and_cfg_job():
    help_ = _run("train.py", "--help")
    assert help_.returncode == 0 and "experiment" in help_.stdout
    job = _run("train.py", "experiment=itc_pretrain", "--cfg", "job")
    assert job.returncode == 0
    cfg = OmegaConf.create(job.stdout)
    assert cfg.task_name == "itc_pretrain" and cfg.model.vision.name == "vit_tiny_patch16_224"


def test_memory_option_builds_the_memory_decoder():
    """``model.text.memory.enabled=true`` reaches the model: its decoder layers carry memory."""
    cfg = compose_train(["model.text.memory.enabled=true", "model.text.memory.segment_len=64"])
    model_cfg = OmegaConf.to_object(cfg.model)
    assert model_cfg.text.memory.enabled and model_cfg.text.memory.segment_len == 64
    with pytest.raises(ValueError, match="text.memory.chrono_segments=1"):
        MultiModalConfig.from_dict({"text": {"memory": {"enabled": True, "chrono_segments": 1}}})


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("model.audio.sample_rate=0", "audio.sample_rate=0 is outside"),
        ("model.text.num_layers=100000", "text.num_layers=100000 is outside"),
    ],
)
def test_out_of_range_model_values_fail_when_the_config_is_built(override, culprit):
    """OmegaConf checks the types; the dataclasses' ranges run when the app builds the config."""
    cfg = compose_train([override])
    with pytest.raises(ValueError, match=culprit):
        OmegaConf.to_object(cfg.model)


@pytest.mark.parametrize(
    "override",
    [
        "data.split_names.train=development",
        "data.split_names={train: development, val: validation, test: evaluation}",
    ],
)
def test_split_names_override_as_documented(override):
    cfg = compose_train(["data=audiocaps", override, "paths.output_dir=out"])
    assert cfg.data.split_names.train == "development"
    assert OmegaConf.to_object(cfg).data.split_names.train == "development"


def test_a_misspelt_split_name_fails_naming_it():
    with pytest.raises(Exception, match="trian"):
        compose_train(["data=audiocaps", "data.split_names.trian=development"])
