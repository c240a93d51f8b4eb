"""Loading a trained model without the app: ``autoglm_phone.load_model`` on a training checkpoint
and on a saved folder, the size check of config against weights, and the import boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHALLOW

from autoglm_phone import AutoGLMModel, load_model
from autoglm_phone.models.autoglm import MODALITY_TABLE
from autoglm_phone.models.lora import apply_lora

LORA = {
    "lora": True,
    "lora_targets": ["text"],
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_dora": False,
    "lora_keep_trainable": [],
}


def _tokenizer_files(tokenizer) -> dict[str, str]:
    """As the training app stores them: the saved folder's files as text."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir()}


def _write_ckpt(path: Path, model: AutoGLMModel, tokenizer, finetune=None) -> Path:
    """A checkpoint laid out as Lightning writes the app's: plain hyper-parameters and the
    module's state dict under ``model.``."""
    hp = {
        "model": model.cfg.to_dict(),
        "finetune": finetune,
        "tokenizer_files": _tokenizer_files(tokenizer),
        "data": {"name": "synthetic"},
        "objective": {"itc_weight": 1.0},
    }
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hp, "epoch": 0}, path)
    return path


def _features(model: AutoGLMModel, tokenizer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        out = model(
            "image", torch.rand(1, 3, 64, 64, generator=g), ids.input_ids, ids.attention_mask
        )
    return torch.cat([out["image_features"], out["text_features"]], dim=-1)


def test_load_model_reads_a_folder_with_its_tokenizer(tiny, tokenizer, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    loaded = load_model(folder)
    assert not loaded.model.training and loaded.hparams is None
    assert loaded.config == tiny.cfg
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    torch.testing.assert_close(
        _features(loaded.model, loaded.tokenizer), _features(tiny, tokenizer)
    )
    tiny.save_pretrained(tmp_path / "bare")  # no tokenizer saved: none loaded
    assert load_model(tmp_path / "bare").tokenizer is None


def test_load_model_reads_a_training_checkpoint_and_merges_lora(tiny, tokenizer, tmp_path):
    torch.manual_seed(1)
    tuned = AutoGLMModel(tiny.cfg)
    tuned.load_state_dict(tiny.state_dict())
    apply_lora(tuned, targets=("text",), r=4, alpha=8)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    tuned.eval()
    ckpt = _write_ckpt(tmp_path / "last.ckpt", tuned, tokenizer, finetune=LORA)
    loaded = load_model(ckpt)
    assert loaded.hparams["finetune"] == LORA and loaded.config == tiny.cfg
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())  # merged
    torch.testing.assert_close(
        _features(loaded.model, loaded.tokenizer), _features(tuned, tokenizer), atol=1e-5, rtol=0
    )
    assert not torch.allclose(_features(loaded.model, tokenizer), _features(tiny, tokenizer))


def _edit_config(folder: Path, section: str, key: str, value) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["model"][section][key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "section, key, value, culprit",
    [
        # within config.py's sanity caps (which refuse 10**12 and 10**5 outright), still far
        # from the weights: 4M x 256 values, a thousand layers stopped while building
        ("text", "vocab_size", 4_000_000, "text.embed_tokens.weight"),
        ("text", "num_layers", 1000, "text.num_layers"),
        ("audio", "depth", 1000, "audio.depth"),
        ("text", "intermediate_size", 999, "text.layers.0.mlp"),
    ],
)
def test_config_is_checked_against_the_weights_before_building(
    tiny, tmp_path, section, key, value, culprit
):
    folder = tiny.save_pretrained(tmp_path / "model")
    _edit_config(folder, section, key, value)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="model.safetensors does not fit the config") as err:
        AutoGLMModel.from_pretrained(folder)
    assert culprit in str(err.value)
    assert time.perf_counter() - start < 20  # nothing of the config's size was built
    if key == "vocab_size":  # both shapes named
        assert f"config ({value}, 256), file (" in str(err.value)


def test_checkpoint_config_is_checked_against_its_weights(tiny, tokenizer, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    _write_ckpt(ckpt, tiny, tokenizer)
    blob = torch.load(ckpt, weights_only=True)
    blob["hyper_parameters"]["model"]["text"]["vocab_size"] = (
        4_000_000  # within the sanity caps, far from the weights
    )
    torch.save(blob, ckpt)
    with pytest.raises(ValueError, match=r"last.ckpt does not fit the config.*embed_tokens"):
        load_model(ckpt)


def test_state_dict_names_are_the_saved_format(tiny):
    """The modality table must not rename submodules: their names are the checkpoints' keys."""
    tops = {k.split(".")[0] for k in tiny.state_dict()}
    assert tops == {
        "vision", "audio", "text", "vision_proj", "audio_proj", "text_proj",
        "vision_adapter", "audio_adapter", "itm_head", "logit_scale",
    }  # fmt: skip
    for m in MODALITY_TABLE.values():
        assert {m.tower, m.proj, m.adapter} <= tops
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        tiny.encode_media("video", torch.zeros(1))


TRAIN_ONLY = ("lightning", "pytorch_lightning", "hydra", "hydra_core", "omegaconf", "wandb")
TRAIN_ONLY += ("tensorboard", "tensorboard_data_server", "matplotlib")  # the [train] extra
IMPORT_CHECK = """
import sys
import autoglm_phone
import autoglm_phone.serve  # the server library (docs/SERVE.md) too
for path in sys.argv[1:]:
    loaded = autoglm_phone.load_model(path)
    print(type(loaded.model).__name__, len(loaded.tokenizer))
print(sorted({{m.split(".")[0] for m in sys.modules}} & {names!r}))
"""


def _site_without(tmp: Path, names: tuple[str, ...]) -> Path:
    """The installed packages, less ``names`` (and their metadata): links to everything else."""
    site = tmp / "site"
    site.mkdir()
    for folder in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        for entry in Path(folder).iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top not in names and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


@pytest.mark.slow
def test_loader_needs_no_training_packages(tiny, tokenizer, tmp_path):
    """``import autoglm_phone`` and ``load_model`` (folder and checkpoint) where the training
    packages are not installed, as after ``pip install autoglm-phone`` without ``[train]``."""
    folder = tiny.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    ckpt = _write_ckpt(tmp_path / "last.ckpt", tiny, tokenizer)
    site = _site_without(tmp_path, TRAIN_ONLY)
    out = subprocess.run(  # -S: no site-packages but the reduced copy on PYTHONPATH
        [
            sys.executable,
            "-S",
            "-c",
            IMPORT_CHECK.format(names=set(TRAIN_ONLY)),
            str(folder),
            str(ckpt),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[:2] == [f"AutoGLMModel {len(tokenizer)}"] * 2, out.stdout
    assert lines[-1] == "[]", out.stdout  # and none of them imported


def test_import_loads_no_training_package(tiny, tokenizer, tmp_path):
    """With everything installed, ``import autoglm_phone``, ``autoglm_phone.serve`` and
    ``load_model`` (folder and checkpoint) import none of Lightning, Hydra, OmegaConf,
    TensorBoard or matplotlib. (wandb is left out here: timm imports it whenever it is
    installed; the slow test above runs without.)"""
    folder = tiny.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    ckpt = _write_ckpt(tmp_path / "last.ckpt", tiny, tokenizer)
    names = set(TRAIN_ONLY) - {"wandb"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK.format(names=names), str(folder), str(ckpt)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_saved_config_names_no_file_to_open(tokenizer, tmp_path):
    """``vision.pretrained_path`` in a saved config.json is not opened: the weights replace it."""
    shallow_patch = {**SHALLOW, "vision": {"depth": 1, "stem": "patch"}}
    model = AutoGLMModel.from_pretrained("autoglm-phone-tiny", shallow_patch, tokenizer=tokenizer)
    folder = model.save_pretrained(tmp_path / "model")
    _edit_config(folder, "vision", "pretrained_path", str(tmp_path / "elsewhere" / "vit.pth"))
    loaded = AutoGLMModel.from_pretrained(folder)
    assert loaded.cfg.vision.pretrained_path is None
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
