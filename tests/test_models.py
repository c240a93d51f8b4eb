import dataclasses
import re

import pytest
import torch

from autoglm_phone import config as config_module
from autoglm_phone.config import (
    AdapterConfig,
    AudioConfig,
    DecoderConfig,
    MemoryConfig,
    MoEConfig,
    MultiModalConfig,
    RopeScalingConfig,
    SpecialTokens,
    VisionConfig,
    from_dict,
)
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.models.towers import AudioTower, VisionTower

SMALL_TEXT = DecoderConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _towers():
    yield (
        "vision",
        VisionTower(VisionConfig(img_size=32, patch_size=8, depth=2)),
        torch.rand(2, 3, 32, 32),
    )
    yield "audio", AudioTower(AudioConfig(depth=2)), 0.1 * torch.randn(2, 16000)


@pytest.mark.parametrize("name", ["vision", "audio"])
def test_towers_share_one_contract(name):
    tower, x = next((t, x) for n, t, x in _towers() if n == name)
    out = tower(x)
    b, n, d = out.tokens.shape
    assert b == 2 and d == tower.embed_dim and n > 1
    assert out.pooled.shape == (2, tower.embed_dim)
    assert torch.allclose(tower.forward_head(tower.forward_features(x)), out.pooled, atol=1e-6)


def test_conv_stem_keeps_the_patch_grid_and_sees_inside_a_patch():
    patch = VisionTower(VisionConfig(img_size=32, patch_size=8, depth=1))
    conv = VisionTower(VisionConfig(img_size=32, patch_size=8, depth=1, stem="conv")).eval()
    x = torch.rand(2, 3, 32, 32)
    assert conv(x).tokens.shape == patch(x).tokens.shape == (2, 16, patch.embed_dim)
    stem = conv.vit.patch_embed.backbone
    strides = [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 3  # log2(8) stride-2 convolutions, then a 1x1 projection
    # one pixel inside the first 8x8 cell changes that cell's stem output, not a far cell's
    y = x.clone()
    y[:, :, 3, 3] += 0.5
    with torch.no_grad():
        a, b = conv.vit.patch_embed(x), conv.vit.patch_embed(y)  # (B, 16, D)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    assert torch.equal(a[:, 15], b[:, 15])


def test_conv_stem_config_errors():
    with pytest.raises(ValueError, match="power of two"):
        VisionConfig(img_size=48, patch_size=12, stem="conv")
    with pytest.raises(ValueError, match="stem='patch'"):
        VisionConfig(stem="conv", pretrained_path="vit.safetensors")
    with pytest.raises(ValueError, match="'patch' or 'conv'"):
        VisionConfig(stem="resnet")


def test_vision_accepts_uint8_and_float_alike():
    tower = VisionTower(VisionConfig(img_size=32, patch_size=8, depth=1)).eval()
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(tower(img).pooled, tower(img.float() / 255).pooled, atol=1e-5)


def test_audio_any_sample_rate_is_resampled():
    tower = AudioTower(AudioConfig(depth=1)).eval()
    t = torch.arange(16000) / 16000
    wave16 = torch.sin(2 * torch.pi * 440 * t)[None]
    t8 = torch.arange(8000) / 8000
    wave8 = torch.sin(2 * torch.pi * 440 * t8)[None]
    a = tower(wave16, sample_rate=16000).tokens
    b = tower(wave8, sample_rate=8000).tokens
    assert a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    with pytest.raises(ValueError, match="mono"):
        tower(torch.randn(1, 2, 100))


def test_autoglm_forward_dict_feeds_the_loss():
    cfg = MultiModalConfig(
        vision=VisionConfig(img_size=32, patch_size=8, depth=1),
        audio=AudioConfig(depth=1),
        text=SMALL_TEXT,
    )
    model = AutoGLMModel(cfg)
    ids, mask = torch.randint(1, 97, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    for modality, media in (("image", torch.rand(3, 3, 32, 32)), ("audio", torch.randn(3, 8000))):
        out = model(modality, media, ids, mask)
        assert set(out) == {"image_features", "text_features", "logit_scale"}
        assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_config_round_trip_and_errors():
    cfg = MultiModalConfig(text=DecoderConfig(vocab_size=10))
    again = MultiModalConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.text.head_dim == 64
    with pytest.raises(ValueError, match="unknown VisionConfig key"):
        MultiModalConfig.from_dict({"vision": {"img_sz": 64}})
    with pytest.raises(ValueError, match="divisible"):
        VisionConfig(img_size=60, patch_size=8)


CONFIGS = [VisionConfig, AudioConfig, MoEConfig, MemoryConfig, RopeScalingConfig, DecoderConfig,
           AdapterConfig, SpecialTokens, MultiModalConfig]  # fmt: skip


def test_every_config_class_is_listed():
    classes = {c for c in vars(config_module).values() if dataclasses.is_dataclass(c)}
    assert classes == set(CONFIGS)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_is_type_checked_naming_its_key(cls):
    """From a dict or from Python, a value of the wrong type fails naming the key path."""
    for f in dataclasses.fields(cls):
        with pytest.raises(ValueError, match=re.escape(cls.PREFIX + f.name)):
            from_dict(cls, {f.name: b"?"})  # bytes are no config value of any type


def test_config_ranges_name_the_key():
    with pytest.raises(ValueError, match=r"text.head_dim=0 is outside \[1, "):
        DecoderConfig(head_dim=0)
    with pytest.raises(ValueError, match="text.pad_token_id=10 must be < text.vocab_size=10"):
        DecoderConfig(vocab_size=10, pad_token_id=10)
    with pytest.raises(ValueError, match="text.rms_norm_eps=0.0 is outside"):
        DecoderConfig(rms_norm_eps=0.0)
    with pytest.raises(ValueError, match="audio.n_fft=-1"):
        MultiModalConfig.from_dict({"audio": {"n_fft": -1}})
    with pytest.raises(ValueError, match="text.rope_scaling.factor=0.0"):
        RopeScalingConfig(rope_type="linear", factor=0.0)
    with pytest.raises(ValueError, match="mapping"):
        MultiModalConfig.from_dict([1, 2])
    assert DecoderConfig(rope_theta=10000).rope_theta == 10000  # an int is a fine float
