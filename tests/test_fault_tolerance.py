"""Fault tolerance (docs/SCALING.md): a run killed mid-epoch resumes to the same weights,
checkpoints are written atomically and hold plain values, a non-finite loss stops the run."""

from __future__ import annotations

import io
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_DATA, compose_config

from autoglm_phone.app.fault import AtomicCheckpointIO, NonFiniteLossError
from autoglm_phone.app.resume import ResumableLoader, ResumableSampler
from autoglm_phone.app.train import run

# A small model and data set so a 3-epoch run takes seconds; drop-path makes training draw random
# numbers, so an exact resume also needs the restored random state.
FAST = [
    "experiment=itc_pretrain",
    *SMALL_DATA,
    "data.num_train=24",
    "data.num_av_train=8",
    "data.batch_size=8",  # 32 items per modality: 4 steps an epoch
    "model.vision.depth=2",
    "model.audio.depth=2",
    "model.text.num_layers=2",
    "model.text.hidden_size=128",
    "model.text.moe.layers=[1]",
    "model.vision.drop_path_rate=0.1",
    "model.audio.drop_path_rate=0.1",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]
STEPS_PER_EPOCH = 4


def _train(run_dir: Path, cache_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *FAST,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        *args,
    ]


def _compose(run_dir: Path, cache_dir: Path, *args: str):
    """The config of :func:`_train`'s command, for ``run(cfg)`` in this process."""
    return compose_config(
        "train", [*FAST, f"paths.output_dir={run_dir}", f"paths.cache_dir={cache_dir}", *args]
    )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_plain(value, where: str = "hyper_parameters") -> None:
    """Only dict / list / tuple / str / int / float / bool / None, all the way down."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{where}: {type(value)}"


def test_resumable_loader_resumes_mid_pass_and_reshuffles_per_epoch():
    data = list(range(40))

    def loader(rank: int = 0, replicas: int = 1) -> ResumableLoader:
        sampler = ResumableSampler(data, num_replicas=replicas, rank=rank, seed=3, drop_last=True)
        return ResumableLoader(data, batch_size=4, sampler=sampler, drop_last=True)

    a = loader()
    a.sampler.set_epoch(1)
    full = [b.tolist() for b in a]
    it = iter(a)
    for _ in range(3):
        next(it)
    assert a.state_dict() == {"batches": 3}

    b = loader()  # a fresh process: the same seed and epoch, then the saved position
    b.load_state_dict(a.state_dict())
    b.sampler.set_epoch(1)
    assert [x.tolist() for x in b] == full[3:]
    assert [x.tolist() for x in b] == full  # the next pass is whole again
    b.load_state_dict({"batches": len(b)})  # saved after the last batch of a pass
    assert [x.tolist() for x in b] == full

    a.sampler.set_epoch(2)
    b.sampler.set_epoch(2)
    epoch2 = [x.tolist() for x in a]
    assert epoch2 == [x.tolist() for x in b] and epoch2 != full  # seeded, reshuffled each epoch
    assert sorted(sum(full, [])) == data

    shards = [sum(([int(i) for i in x] for x in loader(r, 2)), []) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 20


def test_killed_run_resumes_mid_epoch_to_the_same_weights(tmp_path, cache_dir):
    """SIGKILL after a mid-epoch last.ckpt in epoch 1, restart with ckpt_path=last: the weights
    after 3 epochs equal an uninterrupted run's, bit for bit (16-token memory segments, so the
    decoder's memory is written and read across segments)."""
    common = [
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "callbacks.every_n_train_steps=3",
        "model.text.memory.segment_len=16",
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    run = subprocess.Popen(_train(run_dir, cache_dir, *common), **quiet)
    ref, last, seen, killed = None, run_dir / "checkpoints" / "last.ckpt", None, None
    deadline = time.monotonic() + 300
    while killed is None:
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        if last.exists() and last.stat().st_mtime_ns != seen:
            if ref is None:  # the uninterrupted run, started once the data cache is built
                ref = subprocess.Popen(_train(ref_dir, cache_dir, *common), **quiet)
            seen = last.stat().st_mtime_ns
            ckpt = _load(last)  # always whole: a present last.ckpt was renamed into place
            position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"]
            if ckpt["epoch"] == 1 and 0 < position < STEPS_PER_EPOCH:
                run.send_signal(signal.SIGKILL)
                killed = ckpt["global_step"]
        time.sleep(0.02)
    assert run.wait() == -signal.SIGKILL
    assert STEPS_PER_EPOCH < killed < 2 * STEPS_PER_EPOCH

    resumed = subprocess.run(
        _train(run_dir, cache_dir, *common, "ckpt_path=last"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait() == 0

    a, b = _load(ref_dir / "checkpoints" / "last.ckpt"), _load(last)
    # a loader that restarted epoch 1 from its first batch would run more steps than this
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ after resuming from step {killed}"


def test_every_checkpoint_loads_weights_only_with_plain_hyper_parameters(tmp_path, cache_dir):
    run(_compose(tmp_path, cache_dir, "trainer.max_epochs=1", "callbacks.every_n_train_steps=2"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch000-step4.ckpt", "last.ckpt"]
    for name in names:
        ckpt = _load(tmp_path / "checkpoints" / name)  # weights_only=True
        assert set(ckpt["hyper_parameters"]) >= {"model", "optim", "tokenizer_files"}
        _assert_plain(ckpt["hyper_parameters"])


def test_nonfinite_loss_stops_with_message_and_checkpoint(tmp_path, cache_dir):
    """lr=1e30 blows the weights up after one step; the run stops at step 1, before the update
    that would write NaN into the weights, and keeps them in nonfinite.ckpt."""
    with pytest.raises(NonFiniteLossError) as e:
        run(_compose(tmp_path, cache_dir, "optim.lr=1e30", "trainer.max_epochs=1"))
    message = str(e.value)
    assert message.startswith("non-finite loss at global step 1 (epoch 0, batch 1)")
    assert "train/loss=nan" in message and "train/itc_image=nan" in message
    ckpt = _load(tmp_path / "checkpoints" / "nonfinite.ckpt")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    _assert_plain(ckpt["hyper_parameters"])
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_checkpoint_write_killed_halfway_keeps_the_previous_one(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    first = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 1}
    io_.save_checkpoint(first, path)

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: buf.tell() // 2])
        f.flush()
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    second = {"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint(second, path)
    monkeypatch.undo()

    kept = _load(path)
    assert kept["global_step"] == 1 and torch.equal(
        kept["state_dict"]["w"], first["state_dict"]["w"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind
    io_.save_checkpoint(second, path)
    assert _load(path)["global_step"] == 2
    assert math.isclose(float(_load(path)["state_dict"]["w"].sum()), 0.0)
