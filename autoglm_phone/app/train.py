"""``run(cfg)`` for training: what ``train.py`` calls and what tests call directly."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from autoglm_phone.app.callbacks import SkippedSamples
from autoglm_phone.app.dashboards import Dashboards, RunLink
from autoglm_phone.app.datamodule import MultiModalDataModule
from autoglm_phone.app.fault import AtomicCheckpointIO, FiniteLossGuard
from autoglm_phone.app.module import PretrainModule
from autoglm_phone.app.resume import ExactResume
from autoglm_phone.app.schema import CallbacksConfig, LoggerConfig, TrainerConfig
from autoglm_phone.checkpoint import read_model_state
from autoglm_phone.config import MultiModalConfig
from autoglm_phone.data.records import DataError
from autoglm_phone.tokenizer import tokenizer_from_files

LOGGERS = ("wandb", "csv", "tensorboard", "none")


def build_logger(cfg: LoggerConfig, save_dir: Path, run_name: str) -> Logger | bool:
    if cfg.name == "wandb":
        # Offline unless asked otherwise: no account needed; `wandb sync` uploads later.
        os.environ.setdefault("WANDB_MODE", "offline" if cfg.offline else "online")
        return WandbLogger(
            project=cfg.project,
            name=run_name,
            group=run_name,  # eval.py's runs of its checkpoints join it (job_type="eval")
            save_dir=str(save_dir),
            offline=cfg.offline,
            entity=cfg.entity,
            tags=list(cfg.tags) or None,
        )
    if cfg.name == "csv":
        return CSVLogger(save_dir=str(save_dir), name="csv")
    if cfg.name == "tensorboard":
        return TensorBoardLogger(save_dir=str(save_dir), name="tensorboard")
    if cfg.name == "none":
        return False
    raise ValueError(f"unknown logger.name {cfg.name!r}; choose one of {LOGGERS}")


def build_callbacks(cfg: CallbacksConfig, ckpt_dir: Path, with_logger: bool) -> list[Callback]:
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="epoch{epoch:03d}-step{step}",
            auto_insert_metric_name=False,
            monitor=cfg.monitor,
            mode=cfg.mode,
            save_top_k=cfg.save_top_k,
            save_last=cfg.save_last,
            every_n_epochs=cfg.every_n_epochs,
            enable_version_counter=False,  # last.ckpt is overwritten, never last-v1.ckpt
        ),
        FiniteLossGuard(ckpt_dir),
        ExactResume(),
    ]
    if cfg.every_n_train_steps > 0:  # last.ckpt mid-epoch too, to resume after a kill
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                save_top_k=0,
                save_last=True,
                every_n_train_steps=cfg.every_n_train_steps,
                enable_version_counter=False,
            )
        )
    if cfg.lr_monitor and with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if with_logger:  # both act on wandb and TensorBoard loggers only
        callbacks.append(RunLink())
        d = cfg.dashboards
        if d.enabled:
            callbacks.append(Dashboards(d.queries, d.top_k, d.heatmap_size, d.max_new_tokens))
    return callbacks


def tokenizer_files(tokenizer, folder: Path) -> dict[str, str]:
    """The tokenizer's files as text (stored in checkpoints); rank 0 also saves them to ``folder``.

    Read back from a private folder: under torchrun or SLURM every rank runs this at once, and
    the shared one could be read while another rank rewrites it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: p.read_text(encoding="utf-8")
            for p in sorted(Path(tmp).iterdir())
            if p.is_file()
        }
    if rank_zero_only.rank == 0:
        tokenizer.save_pretrained(str(folder))
    return files


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def trainer_kwargs(cfg: TrainerConfig) -> dict[str, Any]:
    """``lightning.Trainer`` keywords. ``max_steps`` set (> 0) is the length of training:
    ``max_epochs`` no longer stops it first (Lightning stops at whichever comes first, so an
    experiment's ``max_epochs: 10`` would cut ``trainer.max_steps=20`` short on small data)."""
    kwargs = {k: v for k, v in vars(cfg).items() if v is not None}
    if cfg.max_steps > 0:
        kwargs["max_epochs"] = -1
    return kwargs


@dataclass
class Built:
    datamodule: MultiModalDataModule
    module: PretrainModule
    trainer: L.Trainer
    output_dir: Path


def build(cfg: DictConfig) -> Built:
    """Everything ``cfg`` describes, ready to fit (tests build every experiment this way)."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.data.path:  # typed relative to where the run starts; saved absolute for eval.py
        cfg.data.path = str(Path(cfg.data.path).expanduser().absolute())
    if rank_zero_only.rank == 0:  # every process of a multi-process run builds too
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    model_cfg: MultiModalConfig = OmegaConf.to_object(cfg.model)
    dm = MultiModalDataModule(
        OmegaConf.to_object(cfg.data),
        cfg.paths.cache_dir,
        image_size=model_cfg.vision.img_size,
        seed=cfg.seed,
    )
    if cfg.objective.lm_weight > 0 and not cfg.data.instructions:
        raise ValueError("objective.lm_weight > 0 needs data.instructions=true")
    # weights trained elsewhere come with their tokenizer: the data must use the same one
    source = cfg.init_from or cfg.objective.distill.teacher_ckpt
    if source:
        dm.set_tokenizer(tokenizer_from_files(read_model_state(source)[1]["tokenizer_files"]))
    dm.prepare_data()
    tok = dm.tokenizer
    model_cfg = model_cfg.with_tokenizer(tok)  # vocabulary size, pad id, media and mask ids

    module = PretrainModule(
        model=model_cfg.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        data=OmegaConf.to_container(cfg.data, resolve=True),
        tokenizer_files=tokenizer_files(tok, out / "tokenizer"),
        finetune=OmegaConf.to_container(cfg.finetune, resolve=True),
        init_from=cfg.init_from,
    )
    logger = build_logger(
        OmegaConf.to_object(cfg.logger), out, run_name=f"{cfg.task_name}-{out.name}"
    )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = L.Trainer(
        **trainer_kwargs(OmegaConf.to_object(cfg.trainer)),
        logger=logger,
        callbacks=build_callbacks(
            OmegaConf.to_object(cfg.callbacks), out / "checkpoints", bool(logger)
        )
        + ([SkippedSamples(out / "skipped_samples.jsonl")] if dm.source.reports_skips else []),
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
    )
    return Built(dm, module, trainer, out)


@contextlib.contextmanager
def exit_on_data_error() -> Iterator[None]:
    """For the command line: a data error ends the run with one line naming the file and row
    instead of a traceback through the data loader (``train.py``, ``eval.py``)."""
    try:
        yield
    except (DataError, FileNotFoundError) as e:
        # a loader worker's error arrives with its traceback in the message: keep the last line
        raise SystemExit(f"data error: {str(e).strip().splitlines()[-1]}") from None


def main(cfg: DictConfig) -> dict[str, Any]:
    """:func:`run` for the command line (see :func:`exit_on_data_error`)."""
    with exit_on_data_error():
        return run(cfg)


def finish_wandb_run() -> None:
    """Close the wandb run this process opened, so the next job of a ``-m`` sweep (same
    process) gets a run of its own instead of logging into this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build data, tokenizer, model and trainer from ``cfg``; fit; return paths and metrics."""
    b = build(cfg)
    ckpt_dir = b.output_dir / "checkpoints"
    try:
        b.trainer.fit(
            b.module, datamodule=b.datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, ckpt_dir)
        )
    finally:
        finish_wandb_run()
    if b.trainer.global_step == 0:
        raise RuntimeError(
            f"no training step ran (data.batch_size={cfg.data.batch_size}, "
            f"trainer.limit_train_batches={cfg.trainer.limit_train_batches}): nothing to save"
        )
    last = ckpt_dir / "last.ckpt"
    if not last.exists():  # fast_dev_run disables ModelCheckpoint; still leave a checkpoint
        b.trainer.save_checkpoint(str(last))
    metrics = {k: float(v) for k, v in b.trainer.callback_metrics.items() if torch.is_tensor(v)}
    return {"output_dir": str(b.output_dir), "ckpt_path": str(last), "metrics": metrics}
