"""The objectives package: typed settings, the one logit-scale clamp, and the batch's sample
rate reaching the audio tower in training and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from test_configs import compose_train

from autoglm_phone.app.eval_tasks import tasks_for
from autoglm_phone.app.evaluate import embed_split
from autoglm_phone.app.train import build
from autoglm_phone.config import AudioConfig, DecoderConfig, MultiModalConfig, VisionConfig
from autoglm_phone.data.decode import decode_audio
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.objectives import ObjectiveConfig, clamped_logit_scale, encode_batch


def test_objective_settings_refuse_unknown_keys_by_name():
    with pytest.raises(ValueError, match="itm_wieght"):
        ObjectiveConfig.from_dict({"itc_weight": 1.0, "itm_wieght": 0.5})
    with pytest.raises(ValueError, match="temprature"):
        ObjectiveConfig.from_dict({"distill": {"temprature": 2.0}})
    with pytest.raises(ValueError, match="mlm_prob"):
        ObjectiveConfig.from_dict({"mlm_prob": 1.5})
    with pytest.raises(ValueError, match="itc_weight"):
        ObjectiveConfig.from_dict({"itc_weight": -1})
    # eval.py reads the checkpoint's settings the same way: a misspelt weight is not a 0
    with pytest.raises(ValueError, match="itm_wieght"):
        tasks_for({"itm_wieght": 1.0})


def test_old_checkpoint_settings_load_and_round_trip():
    old = {"itc_weight": 1.0, "itm_weight": 3, "distill": {"teacher_ckpt": None, "weight": 0.0}}
    cfg = ObjectiveConfig.from_dict(old)  # keys added later (mlm_prob, lm_weight, ...) default
    weights = {"itc": 1.0, "itm": 3.0, "mlm": 0.0, "lm": 0.0, "episode": 0.0, "distill": 0.0}
    assert cfg.weights == weights
    assert cfg.mlm_prob == 0.15 and cfg.distill.temperature == 2.0
    plain = cfg.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # plain values: weights_only checkpoints
    assert ObjectiveConfig.from_dict(plain) == cfg
    assert tasks_for(old) == ["itm", "rerank"]


def test_logit_scale_is_clamped_in_one_place():
    cfg = MultiModalConfig(
        vision=VisionConfig(img_size=32, patch_size=8, depth=1),
        audio=AudioConfig(depth=1),
        text=DecoderConfig(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4),
    )
    model = AutoGLMModel(cfg)
    model.logit_scale.data.fill_(10.0)  # exp(10) > 100: clamped
    assert clamped_logit_scale(model.logit_scale).item() == pytest.approx(100.0)
    ids, mask = torch.randint(1, 97, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    batch = {
        "modality": "image",
        "media": torch.rand(2, 3, 32, 32),
        "sample_rate": 0,
        "input_ids": ids,
        "attention_mask": mask,
    }
    feats = encode_batch(model, batch)
    assert feats.scale.item() == pytest.approx(100.0)
    assert model("image", batch["media"], ids, mask)["logit_scale"].item() == pytest.approx(100.0)


# --- the batch's sample rate reaches the tower ------------------------------------------------
MODEL_RATE, DATA_RATE = 16000, 32000  # data.sample_rate differs from model.audio.sample_rate
SOURCE_RATES = (22050, 44100)


def _audio_manifest(root) -> list:
    """Audio-only manifest rows, clips alternately at 22.05 and 44.1 kHz (0.6 s tones)."""
    rows = []
    for i in range(12):
        rate = SOURCE_RATES[i % 2]
        t = np.arange(int(0.6 * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (250 + 90 * i) * t) * np.exp(-2 * t)
        path = root / "audio" / f"{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave.astype(np.float32), rate, subtype="FLOAT")
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        rows.append({"audio": f"audio/{i:02d}.wav", "text": f"tone number {i}", "split": split})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [root / r["audio"] for r in rows]


def _audio_cfg(tmp_path, cache_dir, *extra: str):
    """A small run on :func:`_audio_manifest`'s clips."""
    return compose_train(
        [
            "data=manifest",
            f"data.path={tmp_path / 'data' / 'pairs.jsonl'}",
            "data.modalities=[audio]",
            "data.eval_batch_size=4",
            "model.audio.depth=1",
            "model.vision.depth=1",
            "logger=csv",
            "logger.name=none",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={cache_dir}",
            *extra,
        ]
    )


def test_data_at_another_rate_reaches_the_tower_resampled(tmp_path, cache_dir):
    """Clips at 22.05 and 44.1 kHz, decoded to a 32 kHz data rate, give the features of the
    same clips decoded straight to the model's 16 kHz, in a training step and in eval.py."""
    paths = _audio_manifest(tmp_path / "data")
    cfg = _audio_cfg(
        tmp_path,
        cache_dir,
        "experiment=itm_mlm_pretrain",
        f"data.sample_rate={DATA_RATE}",
        "data.batch_size=4",
        f"model.audio.sample_rate={MODEL_RATE}",
    )
    built = build(cfg)
    module, dm = built.module.eval(), built.datamodule
    model = module.model
    batch = next(iter(dm._loader("audio", "train", shuffle=False)))
    assert batch["sample_rate"] == DATA_RATE

    def reference(rows: list[int]) -> torch.Tensor:
        n = int(MODEL_RATE * cfg.data.audio_seconds)
        waves = torch.stack([decode_audio(paths[i], MODEL_RATE, n) for i in rows])
        return model.encode_audio(waves)  # (B, E) at the model's own rate

    with torch.no_grad():
        losses, _, feats = module._objectives(batch)  # a training step's forward
        assert all(math.isfinite(v.item()) for v in losses.values())
        want = reference(range(4))
        close = F.cosine_similarity(feats.media, want, dim=-1)
        assert close.min() > 0.999, close
        # what the tower made of it before: 32 kHz samples read as 16 kHz ones
        wrong = F.cosine_similarity(model.encode_audio(batch["media"]), want, dim=-1)
        assert wrong.max() < 0.99, wrong
        emb = embed_split(model, dm.test_dataloader()[0], "audio", "test")
        close = F.cosine_similarity(emb["media"], reference([10, 11]), dim=-1)
        assert close.min() > 0.999, close


def test_eval_refuses_non_finite_embeddings_naming_modality_and_split(tmp_path, cache_dir):
    _audio_manifest(tmp_path / "data")
    cfg = _audio_cfg(tmp_path, cache_dir)
    built = build(cfg)
    model = built.module.model.eval()
    with torch.no_grad():
        model.audio_proj.down.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"audio embeddings of the val split.*diverged"):
        embed_split(model, built.datamodule.val_dataloader()[0], "audio", "val")
