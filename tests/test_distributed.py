"""Multi-process training on CPU (gloo): the gathered ITC loss, and train.py with trainer=ddp."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import ROOT, SMALL_DATA

from autoglm_phone.losses import itc_loss

WORLD = 2


def _itc_step(x_img, x_txt, items, w_img, w_txt, log_scale, rank=0, world=1):
    """Features of this rank's share of the batch through shared weights, then the ITC loss
    (pairs of the same item, here across ranks too, masked)."""
    img = F.normalize(x_img @ w_img, dim=-1)  # (B / world, E)
    txt = F.normalize(x_txt @ w_txt, dim=-1)
    return itc_loss(rank=rank, world_size=world)(img, txt, log_scale.exp(), item_ids=items)


def _itc_rank(rank: int, init: str, inputs: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        params = [p.clone().requires_grad_() for p in inputs["params"]]
        share = slice(
            rank * len(inputs["x_img"]) // WORLD, (rank + 1) * len(inputs["x_img"]) // WORLD
        )
        x_img, x_txt, items = (inputs[k][share] for k in ("x_img", "x_txt", "items"))
        loss = _itc_step(x_img, x_txt, items, *params, rank, WORLD)
        loss.backward()
        grads = []
        for p in params:  # what DDP does with every gradient: the mean over ranks
            dist.all_reduce(p.grad)
            grads.append(p.grad / WORLD)
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_itc_loss_gathered_over_two_ranks_equals_one_process(tmp_path):
    """Two gloo processes with half the batch each: every rank's loss is the one-process loss on
    the whole batch, and the DDP-averaged gradients are its gradients."""
    g = torch.Generator().manual_seed(0)
    batch, dim, embed = 12, 16, 8
    inputs = {
        "x_img": torch.randn(batch, dim, generator=g),
        "x_txt": torch.randn(batch, dim, generator=g),
        # items 0 and 1 have a caption on each rank, item 2 two on rank 1
        "items": torch.tensor([0, 1, 3, 4, 5, 6, 0, 1, 2, 2, 7, 8]),
        "params": [
            torch.randn(dim, embed, generator=g),
            torch.randn(dim, embed, generator=g),
            torch.tensor(2.0),
        ],
    }
    # spawn, not fork: a fork of the pytest process, whose torch thread pools earlier tests have
    # started, deadlocks in the children (seen in the full suite)
    mp.start_processes(
        _itc_rank,
        args=(f"file://{tmp_path}/store", inputs, str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
    )

    params = [p.clone().requires_grad_() for p in inputs["params"]]
    loss = _itc_step(inputs["x_img"], inputs["x_txt"], inputs["items"], *params)
    loss.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=0)
        for g_rank, p in zip(got["grads"], params, strict=True):
            torch.testing.assert_close(g_rank, p.grad, atol=1e-5, rtol=0)
    # the gathered loss is not the mean of the two half-batch losses (fewer negatives each)
    halves = [
        _itc_step(inputs["x_img"][s], inputs["x_txt"][s], inputs["items"][s], *inputs["params"])
        for s in (slice(0, batch // 2), slice(batch // 2, batch))
    ]
    assert abs(float(sum(halves) / 2) - loss.item()) > 1e-3


def test_train_ddp_two_cpu_processes(tmp_path, cache_dir):
    """trainer=ddp with 2 CPU processes: each rank gets half the data (3 steps an epoch instead
    of 7), validation gathers across ranks, rank 0 writes the checkpoint."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=itc_pretrain",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"hydra.run.dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            *SMALL_DATA,  # 112 training items per modality, batches of 16
            "model.vision.depth=1",  # the tiny preset at depth 1: this checks the sharding
            "model.audio.depth=1",
            "model.text.num_layers=2",
            "model.text.moe.layers=[1]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 112 // 2 // 16  # each of the 2 ranks stepped through half
    assert (tmp_path / "csv").exists()
