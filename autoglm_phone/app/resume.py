"""What an exact mid-epoch resume needs beyond Lightning's own checkpoint: the data position and
the random state.

Lightning saves ``state_dict()`` of every training loader that has one into the checkpoint and
calls ``load_state_dict`` on resume (but see :class:`ExactResume`). We keep that state to one
number, the batches yielded so far in the current pass, and rely on the order being a function of
``(seed, epoch)`` only: a resumed pass skips that many indices of the same permutation, without
loading the skipped samples. This is simpler than torchdata's ``StatefulDataLoader`` (which also
snapshots worker and iterable-dataset state) and enough for our map-style data, so it adds no
dependency.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a seeded shuffle per epoch, one shard per rank) that can begin
    part-way through its order. With one replica it is a seeded ``RandomSampler``."""

    start = 0  # indices to skip in the next pass; set by ResumableLoader, reset after use

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state is the number of batches it
    has yielded in the current pass; after ``load_state_dict`` the next pass resumes there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Its own generator (for the workers' base seed): iterating never draws from the global
        # random state, which ExactResume restores.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self._yielded = 0  # batches yielded by the current pass
        self._resume_at = 0  # batches to skip at the start of the next pass

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, so the sampler's epoch
        # (set by Lightning at the start of each epoch) is already in place.
        start, self._resume_at = self._resume_at, 0
        if start >= len(self):  # saved after the last batch of a pass: the next pass is whole
            start = 0
        self.sampler.start = start * self.batch_size
        self._yielded = start
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state["batches"])


def get_rng_state() -> dict[str, Any]:
    """The global random state of torch (CPU and CUDA), numpy and Python, as plain values and
    tensors so that checkpoints keep loading with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(Callback):
    """Restores, when training resumes, what Lightning's own restore misses:

    - the global random state, saved in every checkpoint, so that dropout, drop-path or masking
      after a resume draw what the uninterrupted run drew. The state saved is the writing
      process's (rank 0); ``seed_everything`` seeds every rank alike, so under DDP all ranks
      hold that same state anyway;
    - the training loaders' positions. Lightning saves them, but drops them on resume when
      ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as ours does
      (Lightning-AI/pytorch-lightning#20550, open in 2.6); once that is fixed this is a no-op.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict["rng"]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The last hook before the first batch: nothing between loading the checkpoint and
        # training (model setup, loaders) draws from the restored state, and the loaders'
        # iterators, being generators, have not started yet.
        trainer.fit_loop._load_combined_loader_states()  # Lightning's own path, run again
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
