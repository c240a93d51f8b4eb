"""Shared fixtures. Every test runs with model/dataset hubs offline and outbound network blocked."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    AUTOGLM_ROOT=str(ROOT),
)

# Small data for fast tests: the same generator and grammar as the default run.
SMALL_DATA = [
    "data.num_train=96",
    "data.num_val=32",
    "data.num_test=32",
    "data.num_av_train=16",
    "data.num_av_val=8",
    "data.num_av_test=8",
    "data.batch_size=16",
    "data.eval_batch_size=32",
]

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            local = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            local = False
        if not local:
            raise RuntimeError(f"test tried to reach the network: {address}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data/tokenizer cache for the whole session."""
    return tmp_path_factory.mktemp("cache")


def compose_config(name: str, overrides: list[str]):
    """``conf/<name>.yaml`` with ``overrides``, as ``train.py``/``eval.py`` would see it (Hydra's
    compose API: tests call ``run(cfg)`` in-process instead of starting the scripts)."""
    from hydra import compose, initialize_config_dir

    from autoglm_phone.app.schema import register_schemas

    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, cache_dir) -> dict:
    """One (barely) trained itm_mlm_pretrain run for the session, built once: its checkpoint is
    evaluated, fine-tuned from and distilled from. ``run(cfg)``'s result (paths, metrics)."""
    from autoglm_phone.app.train import run

    out = tmp_path_factory.mktemp("base")
    cfg = compose_config(
        "train",
        [
            "experiment=itm_mlm_pretrain",
            "logger=csv",
            "logger.name=none",
            "trainer.fast_dev_run=2",
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={out}",
            f"paths.cache_dir={cache_dir}",
            *SMALL_DATA,
        ],
    )
    return run(cfg)


@pytest.fixture(scope="session")
def base_ckpt(base_run) -> str:
    """The checkpoint of :func:`base_run`."""
    return base_run["ckpt_path"]


# The tiny preset at depth 1 everywhere, for speed: shallow towers; the decoder keeps one dense
# and one MoE layer (the preset's layer 1 is MoE).
SHALLOW = {
    "vision": {"depth": 1},
    "audio": {"depth": 1},
    "text": {"num_layers": 2, "moe": {"layers": [1]}},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer with GLM's special tokens."""
    from autoglm_phone.tokenizer import train_tokenizer

    texts = ["a red circle on the left", "a dog barks twice", "a high beep then silence"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """The tiny preset, :data:`SHALLOW`, in eval mode (seed 0)."""
    import torch

    from autoglm_phone import AutoGLMModel

    torch.manual_seed(0)
    return AutoGLMModel.from_pretrained("autoglm-phone-tiny", SHALLOW, tokenizer=tokenizer).eval()
