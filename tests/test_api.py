"""The public model API: config shorthands, presets, files, summary, multimodal generation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import ROOT, SHALLOW
from omegaconf import OmegaConf
from safetensors import safe_open

from autoglm_phone import AutoGLMModel, MultiModalConfig
from autoglm_phone.config import DecoderConfig, MemoryConfig, SpecialTokens, VisionConfig
from autoglm_phone.models.presets import PRESETS, autoglm_phone_tiny


@pytest.fixture(scope="module")
def big():
    return AutoGLMModel.from_pretrained("autoglm-phone-9b")


def _media(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 64, 64, generator=g), 0.1 * torch.randn(batch, 8000, generator=g)


# -- configs -----------------------------------------------------------------------------------
def test_shorthands_resolve_to_the_nested_configs():
    cfg = MultiModalConfig(
        vision_encoder="vit-tiny",
        audio_encoder="audio-tiny",
        text_decoder="glm-4-9b",
        quantize=None,
    )
    assert cfg.vision == VisionConfig() and cfg.text.hidden_size == 4096
    assert (cfg.text.num_layers, cfg.text.num_kv_heads, cfg.text.vocab_size) == (40, 2, 151552)
    assert MultiModalConfig.from_dict(cfg.to_dict()) == cfg  # only nested configs are stored
    assert MultiModalConfig.from_dict({"text_decoder": "glm-4-9b"}).text == cfg.text
    explicit = MultiModalConfig(text=DecoderConfig(vocab_size=10, num_layers=2))
    assert explicit.text.num_layers == 2 and explicit.text.head_dim == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"vision_encoder": "vit-huge"},
            r"unknown vision encoder 'vit-huge'; known: vit-base, vit-tiny, vit-tiny-conv",
        ),
        ({"audio_encoder": "wav2vec"}, r"known: audio-base, audio-tiny"),
        ({"text_decoder": "llama"}, r"known: glm-4-9b, glm-tiny"),
        ({"text_decoder": "glm-tiny", "text": DecoderConfig(num_layers=2)}, "not both"),
        ({"quantize": "int8"}, "quantize"),
    ],
)
def test_bad_shorthands_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiModalConfig(**kwargs)


def test_tiny_preset_is_the_experiments_yaml():
    """conf/model/tiny.yaml composed onto the schema (as Hydra does) equals the preset."""
    node = OmegaConf.structured(MultiModalConfig)
    for name in DecoderConfig.DERIVED:  # left for __post_init__, as app/schema.py does
        node.text[name] = None
    node = OmegaConf.merge(node, OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml"))
    assert OmegaConf.to_object(node) == autoglm_phone_tiny()


def test_with_tokenizer_sets_vocabulary_and_markers(tokenizer, tiny):
    cfg = tiny.cfg
    assert cfg.text.vocab_size == len(tokenizer) and cfg.text.pad_token_id == tokenizer.pad_token_id
    for name, token in SpecialTokens.NAMES.items():
        assert getattr(cfg.special_tokens, name) == tokenizer.convert_tokens_to_ids(token)
    assert cfg.special_tokens.eos == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="vocab_size=10 < tokenizer size"):
        MultiModalConfig(text=DecoderConfig(vocab_size=10)).with_tokenizer(tokenizer)


# -- presets and summary -----------------------------------------------------------------------
def test_9b_preset_size_on_meta(big):
    assert all(p.is_meta for p in big.parameters())
    s = big.summary(show=False)
    assert s.params == sum(p.numel() for p in big.parameters())
    assert abs(s.params - 8.9e9) < 0.1e9
    assert s.precision == "int4" and s.context_len == 8192
    assert s.kv_cache_bytes == 2 * 40 * 2 * 128 * 8192 * 2  # K and V, 40 layers, 2 KV heads, FP16
    assert s.weight_bytes("int4") + s.kv_cache_bytes < 6e9  # fits 6 GB (decimal, so GiB too)
    text = next(r for r in s.rows if r.name == "text")
    assert text.bytes["fp16"] == 2 * text.params
    assert not big.cfg.text.memory.enabled and s.memory_state_bytes == 0


def test_9b_preset_leaves_memory_off_for_a_measured_reason(big):
    """The preset docstring's reason: at 8k tokens the memory's gates cost more than the KV cache
    they save, and the model no longer fits 6 GB; the KV cache itself shrinks to one segment."""
    text = dataclasses.replace(big.cfg.text, memory=MemoryConfig(enabled=True))
    with torch.device("meta"):
        on = AutoGLMModel(dataclasses.replace(big.cfg, text=text)).summary(show=False)
    off = big.summary(show=False)
    assert on.kv_cache_bytes == 2 * 40 * 2 * 128 * 512 * 2  # one 512-token segment
    assert on.memory_state_bytes == 40 * 32 * 4096 * 2  # 32 slots per layer
    saved = off.kv_cache_bytes - on.kv_cache_bytes - on.memory_state_bytes
    assert on.weight_bytes("int4") - off.weight_bytes("int4") > 2 * saved
    assert off.total_bytes() < 6e9 < on.total_bytes()


def test_summary_table_and_int4_convention(tiny, capsys):
    s = tiny.summary(context_len=128)
    table = capsys.readouterr().out
    assert str(s) in table and "vision_adapter" in table and "FP32*" in table
    assert [r.name for r in s.rows][:3] == ["vision", "audio", "text"]
    assert s.params == sum(p.numel() for p in tiny.parameters())
    # vision adapter: Linear 192 -> 64 and Linear 64 -> 256 at 4 bits + FP16 scale and zero
    # point per 128 inputs (a partial group counts whole); the up-projection's bias, the
    # modality embedding (256 each) and the 17 slot embeddings (summary + 16 grid, x 256) at FP16
    row = next(r for r in s.rows if r.name == "vision_adapter")
    down = 64 * 192 / 2 + 4 * 64 * 2
    up = 256 * 64 / 2 + 4 * 256 * 1
    assert row.bytes["int4"] == down + up + 2 * (256 + 256 + 17 * 256)
    assert s.kv_cache_bytes == 2 * 2 * 2 * 64 * 128 * 2  # 2 layers, 2 KV heads of 64, FP16


def test_unknown_preset_or_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a preset.*autoglm-phone-9b"):
        AutoGLMModel.from_pretrained("autoglm-phone-7b")
    assert set(PRESETS) == {"autoglm-phone-tiny", "autoglm-phone-9b"}
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoGLMModel.from_pretrained(tmp_path)


# -- files -------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    stored = json.loads((folder / "config.json").read_text())
    assert stored["format_version"] == 1 and stored["model"] == tiny.cfg.to_dict()
    loaded = AutoGLMModel.from_pretrained(folder).eval()
    assert loaded.cfg == tiny.cfg
    images, audio = _media()
    ids = torch.randint(20, 300, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        for modality, media in (("image", images), ("audio", audio)):
            a, b = tiny(modality, media, ids, mask), loaded(modality, media, ids, mask)
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(
            tiny.build_prefix(images, audio, ids, mask)[0],
            loaded.build_prefix(images, audio, ids, mask)[0],
        )


def test_tied_embeddings_are_stored_once(tokenizer, tmp_path):
    tied = {**SHALLOW, "text": {**SHALLOW["text"], "tie_word_embeddings": True}}
    model = AutoGLMModel.from_pretrained("autoglm-phone-tiny", tied, tokenizer=tokenizer)
    folder = model.save_pretrained(tmp_path / "tied")
    loaded = AutoGLMModel.from_pretrained(folder)
    assert loaded.text.lm_head.weight is loaded.text.embed_tokens.weight
    assert torch.equal(loaded.text.lm_head.weight, model.text.lm_head.weight)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "text.embed_tokens.weight" in f.keys() and "text.lm_head.weight" not in f.keys()


def test_load_with_overrides_checks_the_weights_fit(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "model")
    bigger = AutoGLMModel.from_pretrained(folder, {"text": {"hidden_size": 128}}, device="meta")
    assert bigger.cfg.text.head_dim == 32  # derived sizes follow the new width
    with pytest.raises(ValueError, match="model.safetensors does not fit"):
        AutoGLMModel.from_pretrained(folder, {"text": {"num_layers": 3}})


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format_version": 2, "model": {}}), "format_version 2 is newer"),
        (json.dumps({"format_version": "1", "model": {}}), "unknown format_version"),
        (json.dumps({"model": {}}), "expected the keys"),
        (json.dumps({"format_version": 1, "model": {"vision": {"img_sz": 64}}}), "img_sz"),
        (
            json.dumps({"format_version": 1, "model": {"text_decoder": "gpt"}}),
            "unknown text decoder",
        ),
    ],
)
def test_bad_config_file_raises_naming_the_file(tiny, tmp_path, content, match):
    folder = tiny.save_pretrained(tmp_path / "model")
    (folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        AutoGLMModel.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("text.hidden_size", "32", "text.hidden_size='32' must be an integer"),
        ("text.hidden_size", 32.5, "text.hidden_size=32.5 must be an integer"),
        ("text.num_layers", True, "text.num_layers=True must be an integer"),
        ("text.attention_bias", 1, "text.attention_bias=1 must be true or false"),
        ("audio.sample_rate", 0, r"audio.sample_rate=0 is outside \[1, "),
        ("text.vocab_size", 10**12, "text.vocab_size=1000000000000 is outside"),
        ("text.num_layers", 10**5, "text.num_layers=100000 is outside"),
        ("vision.drop_path_rate", 1.5, "vision.drop_path_rate=1.5 is outside"),
        ("text.moe.layers", ["1"], r"text.moe.layers\[0\]='1' must be an integer"),
        ("text", 5, "text must be a mapping"),
        ("text.memory.carry", "yes", "text.memory.carry='yes' must be true or false"),
    ],
)
def test_bad_config_value_raises_naming_file_and_key(tiny, tmp_path, key, value, match):
    """Wrong types and absurd sizes fail on the config, before anything is allocated."""
    folder = tiny.save_pretrained(tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    *parents, leaf = key.split(".")
    node = data["model"]
    for name in parents:
        node = node[name]
    node[leaf] = value
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as err:
        AutoGLMModel.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def test_meta_model_cannot_be_saved(big, tmp_path):
    with pytest.raises(ValueError, match="meta"):
        big.save_pretrained(tmp_path)


# -- multimodal prefix and generation ----------------------------------------------------------
def test_prefix_layout(tiny, tokenizer):
    images, audio = _media()
    ids = torch.tensor([[30, 31, 32, 33], [40, 41, 0, 0]])  # right-padded prompt
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    embeds, out_mask, lengths = tiny.build_prefix(images, audio, ids, mask, sample_rate=8000)
    k_img, k_aud = tiny.vision_adapter.num_tokens, tiny.audio_adapter.num_tokens  # with summary
    media = 2 + k_img + 2 + k_aud
    assert embeds.shape == (2, media + 4, 256) and lengths.tolist() == [media + 4, media + 2]
    assert out_mask[1].tolist() == [False] * 2 + [True] * (media + 2)  # left-padded
    table = tiny.text.embed_tokens.weight
    st = tiny.cfg.special_tokens
    row = embeds[1, 2:]  # the real part of the padded row
    marks = {0: st.begin_of_image, k_img + 1: st.end_of_image}
    marks |= {k_img + 2: st.begin_of_audio, media - 1: st.end_of_audio}
    for pos, token in marks.items():
        assert torch.equal(row[pos], table[token])
    assert torch.equal(row[media:], table[[40, 41]])
    assert torch.equal(row[1 : k_img + 1], tiny.embed_image(images)[1])


def test_summary_token_leads_the_media_block(tiny):
    assert tiny.cfg.adapter.summary_token  # the preset's
    images, audio = _media()
    for modality, media in (("image", images), ("audio", audio)):
        k = getattr(tiny.cfg.adapter, f"{modality}_tokens")
        with torch.no_grad():
            _, block = tiny.encode_media_tokens(modality, media, 8000)
        assert block.shape[1] == k + 3  # <begin> summary, k tokens <end>
    with torch.no_grad():
        out = tiny.vision(images)
        adapter = tiny.vision_adapter
        expected = adapter.proj(out.pooled) + adapter.modality_embed + adapter.position_embed[0]
        _, block = tiny.encode_media_tokens("image", images)
    assert torch.allclose(block[:, 1], expected, atol=1e-5)
    assert torch.allclose(block[:, 1:-1], tiny.embed_image(images), atol=1e-6)


def test_changing_the_image_changes_only_its_tokens(tiny):
    (images, audio), (other, _) = _media(0), _media(1)
    ids = torch.randint(20, 300, (2, 3))
    a = tiny.build_prefix(images, audio, ids)[0]
    b = tiny.build_prefix(other, audio, ids)[0]
    k = tiny.vision_adapter.num_tokens
    assert not torch.allclose(a[:, 1 : k + 1], b[:, 1 : k + 1])
    assert torch.equal(a[:, k + 1 :], b[:, k + 1 :])  # markers, audio and prompt unchanged


def test_generate_from_a_multimodal_prefix(tiny):
    images, audio = _media()
    ids = torch.randint(20, 300, (2, 5))
    kwargs = dict(max_new_tokens=6, stop_token_ids=())
    out = tiny.generate(images, audio, ids, **kwargs)
    assert out.shape == (2, 6) and out.dtype == torch.long
    assert torch.equal(out, tiny.generate(images, audio, ids, **kwargs))  # greedy: deterministic
    assert torch.equal(out, torch.stack(list(tiny.stream(images, audio, ids, **kwargs)), dim=1))
    assert tiny.generate(images=images, max_new_tokens=3, stop_token_ids=()).shape == (2, 3)
    g = torch.Generator().manual_seed(0)
    sampled = tiny.generate(audio=audio, max_new_tokens=4, do_sample=True, top_k=5, generator=g)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate(images=images, max_new_tokens=-3)
