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
