"""Fault tolerance: checkpoints that are whole or absent, and a stop on a non-finite loss."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, flush it to disk, then rename it over
    the old one (``os.replace``, atomic on POSIX and Windows): a run killed during a save leaves
    the previous checkpoint in place and loadable.

    Lightning's own writer stages the file in the system temp folder and moves it into place;
    when that folder is on another file system (a node-local ``/tmp``, a shared checkpoint disk)
    the move is a copy, and a kill during the copy leaves a truncated checkpoint.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # hidden, and not a *.ckpt name
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class NonFiniteLossError(RuntimeError):
    pass


class FiniteLossGuard(Callback):
    """Stop at the first non-finite training loss, saving ``<dirpath>/nonfinite.ckpt`` first.

    The check runs before the backward pass, so the checkpoint holds the weights and optimizer
    state *before* the bad update (a later step would write NaN into every weight). The bad
    forward itself has already folded its activations into batch-norm running statistics (the
    conv stem's), so those buffers are copied before each step and put back before the save.
    The checkpoint is for inspection: resume from ``last.ckpt``. The error names the global step and every logged
    ``train/`` term that is not finite. Under DDP the decision is shared, so all ranks stop.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "nonfinite.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._stats = [
            (buf, buf.detach().clone())
            for m in pl_module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]  # a few hundred numbers: the stem's BN layers

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        with torch.no_grad():
            for buf, before in self._stats:
                buf.copy_(before)
        terms = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and torch.is_tensor(v) and not math.isfinite(float(v))
        }
        if bad and not terms:  # nothing logged: name the returned loss
            terms["loss"] = float(loss.detach().sum())
        trainer.save_checkpoint(self.path)
        named = ", ".join(f"{k}={v}" for k, v in terms.items()) or "on another rank"
        raise NonFiniteLossError(
            f"non-finite loss at global step {trainer.global_step} (epoch {trainer.current_epoch},"
            f" batch {trainer.fit_loop.epoch_loop.batch_idx}): {named}. Weights and optimizer"
            f" state before this update are in {self.path}; lower optim.lr, check the data of"
            f" this batch, or resume from last.ckpt."
        )
