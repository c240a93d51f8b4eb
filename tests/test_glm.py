"""GLM decoder: parity with transformers' GLM-4, conversion, attention masks, cached generation."""

import dataclasses
import json
import re

import pytest
import torch
from transformers import Glm4Config, Glm4ForCausalLM

from autoglm_phone.config import DecoderConfig, MemoryConfig, MoEConfig, RopeScalingConfig
from autoglm_phone.models import glm
from autoglm_phone.models.convert import (
    GLM4_DEFAULTS,
    decoder_config_from_glm4,
    glm4_config_from_decoder,
    load_glm4,
    save_glm4,
)
from autoglm_phone.models.generation import KVCache, LayerKVCache, filter_logits
from autoglm_phone.models.glm import (
    GLMDecoder,
    SwiGLU,
    build_attention_mask,
    make_ffn,
    positions_from_padding,
)

V = 97
SMALL_TEXT = DecoderConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
HF_SMALL = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, pad_token_id=0,
)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (norm weights and biases too), so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def _padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 7, 5 and 3 real tokens, padded on ``side`` with token 0."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 7), generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, n in enumerate((7, 5, 3)):
        if side == "left":
            mask[row, 7 - n :] = True
        else:
            mask[row, :n] = True
    return ids.masked_fill(~mask, 0), mask


def _hf_logits(hf: Glm4ForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' logits with our position convention: positions count real tokens only."""
    return hf(ids, attention_mask=mask.long(), position_ids=positions_from_padding(mask)).logits


# --- parity and conversion ----------------------------------------------------------------------


def test_glm_matches_transformers_glm4():
    torch.manual_seed(0)
    hf = Glm4ForCausalLM(Glm4Config(**HF_SMALL)).eval()
    ours = GLMDecoder(
        DecoderConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5)
    ).eval()  # fmt: skip
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    ids = torch.randint(1, V, (2, 11))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


@pytest.fixture(scope="module")
def hf_tied() -> Glm4ForCausalLM:
    """A tiny random GLM-4 with tied embeddings and non-default RoPE parameters."""
    rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}
    cfg = Glm4Config(**HF_SMALL, tie_word_embeddings=True, rope_parameters=rope)
    return _randomize(Glm4ForCausalLM(cfg))


@pytest.mark.parametrize("side", ["left", "right"])
def test_load_glm4_matches_transformers(hf_tied, tmp_path, side):
    hf_tied.save_pretrained(tmp_path)
    ours = load_glm4(tmp_path)
    assert ours.cfg.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    assert (ours.cfg.rope_theta, ours.cfg.rotary_dim) == (500.0, 4)
    ids, mask = _padded_batch(side)
    with torch.no_grad():
        expected = _hf_logits(hf_tied, ids, mask)
        got = ours(ids, attention_mask=mask)
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)  # real tokens only


def test_load_glm4_into_the_memory_decoder(hf_tied, tmp_path):
    """Every GLM-4 weight loads; memory weights get their documented init; inputs of one segment
    give transformers' logits, longer ones run segment by segment."""
    hf_tied.save_pretrained(tmp_path)
    ours = load_glm4(tmp_path, memory=MemoryConfig(enabled=True, segment_len=8, num_slots=2))
    layer = ours.layers[0]
    assert torch.equal(layer.memory_gate.bias, torch.ones_like(layer.memory_gate.bias))
    assert layer.memory_init.abs().max() < 0.2 and layer.memory_init.std() > 0
    ids, mask = _padded_batch("left")  # 7 tokens: one segment
    with torch.no_grad():
        got, expected = ours(ids, attention_mask=mask), _hf_logits(hf_tied, ids, mask)
        assert torch.allclose(got[mask], expected[mask], atol=1e-5)
        long = torch.randint(0, ours.cfg.vocab_size, (1, 30))
        assert ours(long).shape == (1, 30, ours.cfg.vocab_size)


def test_load_glm4_from_instance_and_shards(hf_tied, tmp_path):
    hf_tied.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = _padded_batch("left")
    with torch.no_grad():
        a = load_glm4(tmp_path)(ids, attention_mask=mask)
        b = load_glm4(hf_tied)(ids, attention_mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/model.safetensors", "x.bin"])
def test_load_glm4_refuses_shard_names_outside_the_folder(hf_tied, tmp_path, shard):
    hf_tied.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    hf_tied.save_pretrained(tmp_path)  # a readable outside.safetensors next to the folder
    (tmp_path / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(repr(shard))):
        load_glm4(tmp_path / "ckpt")


def test_save_glm4_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        rope_theta=2000.0, rms_norm_eps=1e-6)  # fmt: skip
    ours = _randomize(GLMDecoder(cfg))
    save_glm4(ours, tmp_path)
    hf = Glm4ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.rope_parameters["rope_theta"] == 2000.0
    ids, mask = _padded_batch("left")
    with torch.no_grad():
        assert torch.allclose(
            _hf_logits(hf, ids, mask)[mask], ours(ids, attention_mask=mask)[mask], atol=1e-5
        )
    assert load_glm4(tmp_path).cfg == cfg  # and the round trip keeps the config


ROPE_CASES = {
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                                 "original_max_position_embeddings": 8, "beta_fast": 8.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8}},
    # transformers lets rope_scaling replace rope_parameters, rope_theta included
    "rope_scaling_beside": {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                            "rope_scaling": {"type": "linear", "factor": 3.0}},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_load_glm4_applies_rope_scaling_as_transformers(case, tmp_path):
    """A config.json with scaled RoPE: our logits are transformers', before and after save_glm4."""
    hf_folder = tmp_path / "hf"
    _randomize(Glm4ForCausalLM(Glm4Config(**HF_SMALL))).save_pretrained(hf_folder)
    config = json.loads((hf_folder / "config.json").read_text())
    config.pop("rope_parameters")
    (hf_folder / "config.json").write_text(json.dumps({**config, **ROPE_CASES[case]}))
    hf = Glm4ForCausalLM.from_pretrained(hf_folder).eval()
    ours = load_glm4(hf_folder)
    assert ours.cfg.rope_scaling.rope_type == hf.config.rope_parameters["rope_type"] != "default"
    ids = torch.randint(1, V, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = _hf_logits(hf, ids, mask)
        assert torch.allclose(ours(ids), expected, atol=1e-5)
        unscaled = dataclasses.replace(ours.cfg, rope_scaling=RopeScalingConfig())
        plain = GLMDecoder(unscaled).eval()
        plain.load_state_dict(ours.state_dict())
        assert not torch.allclose(plain(ids), expected, atol=1e-3)  # the scaling matters here
        save_glm4(ours, tmp_path / "ours")
        again = Glm4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert torch.allclose(_hf_logits(again, ids, mask), expected, atol=1e-5)


@pytest.mark.parametrize("eos", [[5, 6], 5])
def test_save_glm4_keeps_special_token_ids(tmp_path, eos):
    hf = Glm4ForCausalLM(Glm4Config(**{**HF_SMALL, "pad_token_id": 3}, bos_token_id=1,
                                    eos_token_id=eos))  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    save_glm4(load_glm4(tmp_path / "hf"), tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
        1,
        eos,
        3,
    )
    again = Glm4ForCausalLM.from_pretrained(tmp_path / "ours").config
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, eos, 3)


def test_glm4_defaults_match_transformers():
    hf = Glm4Config()
    assert {k: getattr(hf, k) for k in GLM4_DEFAULTS} == GLM4_DEFAULTS


def test_glm4_config_legacy_keys_and_rejections():
    legacy = {**HF_SMALL, "model_type": "glm4", "rope_theta": 300.0, "partial_rotary_factor": 1.0}
    cfg = decoder_config_from_glm4(legacy)
    assert (cfg.rope_theta, cfg.rotary_dim, cfg.num_layers) == (300.0, 16, 2)
    with pytest.raises(ValueError, match="rope_parameters.rope_type='dynamic'"):
        decoder_config_from_glm4({**HF_SMALL, "rope_parameters": {"rope_type": "dynamic"}})
    with pytest.raises(ValueError, match="rope_scaling.rope_type='longrope'"):
        decoder_config_from_glm4({**HF_SMALL, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_parameters: .*RopeScalingConfig key.*wobble"):
        decoder_config_from_glm4(
            {**HF_SMALL, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "wobble": 1}}
        )
    with pytest.raises(ValueError, match="text.rope_scaling.factor"):
        decoder_config_from_glm4({**HF_SMALL, "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="hidden_act"):
        decoder_config_from_glm4({**HF_SMALL, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="model_type='llama'"):
        decoder_config_from_glm4({**HF_SMALL, "model_type": "llama"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        decoder_config_from_glm4({k: v for k, v in HF_SMALL.items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match="moe.num_experts"):
        glm4_config_from_decoder(dataclasses.replace(SMALL_TEXT, moe=MoEConfig(num_experts=4)))
    with pytest.raises(ValueError, match="memory.enabled"):
        glm4_config_from_decoder(dataclasses.replace(SMALL_TEXT, memory=MemoryConfig(enabled=True)))


# --- attention masks ----------------------------------------------------------------------------


def test_mask_modes():
    pad = torch.tensor([[True, True, True, True], [False, True, True, True]])
    causal = build_attention_mask(pad, "causal")[:, 0]
    bidir = build_attention_mask(pad, "bidirectional")[:, 0]
    prefix = build_attention_mask(pad, "prefix", prefix_lengths=torch.tensor([2, 2]))[:, 0]
    assert causal[0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert bidir[0].all() and not bidir[1, :, 0][1:].any()  # nobody attends the pad key
    # prefix of 2 real tokens: bidirectional among them, causal afterwards; left pad shifts it
    assert prefix[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert prefix[1, 1:, 1:].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "prefix"])
def test_cached_step_mask_is_the_last_rows_of_the_full_mask(mode):
    _, pad = _padded_batch("left")
    prefix = torch.tensor([4, 3, 2])
    full = build_attention_mask(pad, mode, prefix)  # (B, 1, 7, 7)
    for q in (1, 3, 7):
        assert torch.equal(build_attention_mask(pad, mode, prefix, num_queries=q), full[:, :, -q:])
    with pytest.raises(ValueError, match="num_queries"):
        build_attention_mask(pad, mode, prefix, num_queries=8)


def test_text_pooling_ignores_padding():
    model = GLMDecoder(SMALL_TEXT).eval()
    ids = torch.randint(1, V, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3]).bool()
    for pool in ("mean", "last"):
        a = model.forward_head(model.forward_features(ids, mode="bidirectional"), pool=pool)
        h = model.forward_features(padded, mask, mode="bidirectional")
        assert torch.allclose(a, model.forward_head(h, mask, pool=pool), atol=1e-5)


# --- generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm() -> GLMDecoder:
    return _randomize(GLMDecoder(SMALL_TEXT), seed=3)


@torch.no_grad()
def _greedy_recompute(model, prompt, mask, mode, steps, embeds=False):
    """Reference decoding without a cache: a full forward over prompt + generated at each step."""
    new = torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=prompt.device)
    prefix = mask.sum(-1)
    for _ in range(steps):
        full_mask = torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], dim=1)
        if embeds:
            x = torch.cat([prompt, model.embed_tokens(new)], dim=1)
            logits = model(
                inputs_embeds=x, attention_mask=full_mask, mode=mode, prefix_lengths=prefix
            )
        else:
            x = torch.cat([prompt, new], dim=1)
            logits = model(x, attention_mask=full_mask, mode=mode, prefix_lengths=prefix)
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return new


@pytest.mark.parametrize("embeds", [False, True], ids=["ids", "embeds"])
@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_cached_generation_matches_recompute(lm, mode, embeds):
    ids, mask = _padded_batch("left")
    prompt = lm.embed_tokens(ids).detach() if embeds else ids
    kwargs = {"inputs_embeds": prompt} if embeds else {"input_ids": prompt}
    got = lm.generate(**kwargs, attention_mask=mask, max_new_tokens=6, mode=mode)
    assert got.shape == (3, 6)
    assert torch.equal(got, _greedy_recompute(lm, prompt, mask, mode, 6, embeds))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_generation_on_gpu(lm):
    model = GLMDecoder(SMALL_TEXT).cuda().eval()
    model.load_state_dict(lm.state_dict())
    ids, mask = (t.cuda() for t in _padded_batch("left"))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got, _greedy_recompute(model, ids, mask, "prefix", 6))
    assert torch.equal(
        got.cpu(), lm.generate(ids.cpu(), attention_mask=mask.cpu(), max_new_tokens=6)
    )


def test_prefix_and_causal_modes_differ(lm):
    ids, mask = _padded_batch("left")
    prefix = lm.generate(ids, attention_mask=mask, max_new_tokens=4, mode="prefix")
    causal = lm.generate(ids, attention_mask=mask, max_new_tokens=4, mode="causal")
    assert not torch.equal(prefix, causal)  # the prompt really is encoded differently


def test_top_k_1_equals_greedy(lm):
    ids, mask = _padded_batch("left")
    greedy = lm.generate(ids, attention_mask=mask, max_new_tokens=5)
    gen = torch.Generator().manual_seed(0)
    sampled = lm.generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=2.0, top_k=1,
        generator=gen,
    )  # fmt: skip
    assert torch.equal(sampled, greedy)


def test_seeded_sampling_is_reproducible(lm):
    ids, mask = _padded_batch("left")

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True,
                           temperature=1.5, top_p=0.95, generator=gen)  # fmt: skip

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_filter_logits_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # shuffle the vocabulary so filtering must map back
    logits = probs.log()[perm][None]  # (1, 4); token i has probability probs[perm[i]]

    def support(**kw):
        kept = filter_logits(logits, **kw)[0].isfinite()
        return sorted(perm[kept].tolist())  # in ranks: 0 is the most likely token

    assert support() == [0, 1, 2, 3]
    assert support(top_k=1) == [0]
    assert support(top_k=3) == [0, 1, 2]
    assert support(top_k=10) == [0, 1, 2, 3]
    assert support(top_p=0.45) == [0]  # the most likely token is always kept
    assert support(top_p=0.6) == [0, 1]
    assert support(top_p=0.9) == [0, 1, 2]
    assert support(top_k=2, top_p=0.9) == [0, 1]
    assert torch.equal(filter_logits(logits, top_k=1), filter_logits(logits, top_p=0.1))
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_stop_tokens_end_rows_and_max_new_tokens(lm):
    ids, mask = _padded_batch("left")
    greedy = lm.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert greedy.shape == (3, 6)
    stop = int(greedy[0, 1])
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[stop])
    expected = greedy.clone()
    for row in expected:  # everything after a row's first stop token becomes padding
        hits = (row == stop).nonzero()
        if len(hits):
            row[int(hits[0]) + 1 :] = SMALL_TEXT.pad_token_id
    assert got.shape[1] <= 6 and torch.equal(got, expected[:, : got.shape[1]])
    first = greedy[:, 0].tolist()  # every row stops at once: one step only
    assert torch.equal(lm.generate(ids, attention_mask=mask, stop_token_ids=first), greedy[:, :1])


def test_stream_yields_generate(lm):
    ids, mask = _padded_batch("left")
    steps = list(lm.stream(ids, attention_mask=mask, max_new_tokens=5))
    assert len(steps) == 5 and all(s.shape == (3,) for s in steps)
    assert torch.equal(
        torch.stack(steps, 1), lm.generate(ids, attention_mask=mask, max_new_tokens=5)
    )


def test_generate_rejects_bad_inputs(lm):
    ids, mask = _padded_batch("right")
    with pytest.raises(ValueError, match="left-padded"):
        lm.generate(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="bidirectional"):
        lm.generate(ids, mode="bidirectional")
    with pytest.raises(ValueError, match="max_seq_len"):
        lm.generate(ids, max_new_tokens=SMALL_TEXT.max_seq_len)
    cache = LayerKVCache(1, 2, 3, 4)
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ],
)
def test_generate_rejects_bad_decoding_arguments(lm, kwargs, culprit):
    """Refused by name, by generate and by stream before its first step is asked for."""
    ids, mask = _padded_batch("left")
    with pytest.raises(ValueError, match=culprit):
        lm.generate(ids, attention_mask=mask, **kwargs)
    with pytest.raises(ValueError, match=culprit):
        lm.stream(ids, attention_mask=mask, **kwargs)
    if culprit == "temperature":  # greedy decoding ignores the temperature
        assert lm.generate(ids, attention_mask=mask, max_new_tokens=2, temperature=0.0).shape[1]


def test_kv_cache_grows_in_place_of_preallocating(lm, monkeypatch):
    """The cache holds what was generated, not prompt + max_new_tokens; outputs are unchanged."""
    caches = []
    from_config = KVCache.from_config

    def recording(cls, *args, **kwargs):
        caches.append(from_config(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(KVCache, "from_config", classmethod(recording))
    monkeypatch.setattr(glm, "KV_BLOCK", 4)  # a small first block, so a short test grows it
    ids, mask = _padded_batch("left")
    first = lm.generate(ids, attention_mask=mask, max_new_tokens=1)[:, 0].tolist()
    big = SMALL_TEXT.max_seq_len - ids.shape[1]
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=big, stop_token_ids=first)
    assert got.shape == (3, 1)
    assert caches[-1].length == ids.shape[1] and caches[-1][0].max_len == SMALL_TEXT.max_seq_len
    assert caches[-1][0].capacity == ids.shape[1] + 4  # not 8192 positions
    steps = 20  # 7 + 19 cached positions: the cache grows twice
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=steps)
    assert caches[-1][0].capacity == ids.shape[1] + steps  # 11 -> 22 -> 27 (never past it)
    assert torch.equal(got, _greedy_recompute(lm, ids, mask, "prefix", steps))
    gen = torch.Generator().manual_seed(5)
    sampled = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=True,
                          generator=gen)  # fmt: skip
    monkeypatch.setattr(KVCache, "from_config", classmethod(_preallocated(from_config)))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(
        sampled,
        lm.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=True, generator=gen),
    )


def _preallocated(from_config):
    """``KVCache.from_config`` allocating every position up front (the former behaviour)."""
    return lambda cls, *args, capacity=None, **kwargs: from_config(*args, **kwargs)


def test_layer_kv_cache_growth_keeps_values():
    cache = LayerKVCache(2, 1, 10, 3, capacity=2)
    k = torch.arange(2 * 7 * 3, dtype=torch.float).reshape(2, 1, 7, 3)
    for step in range(7):
        got, _ = cache.update(k[:, :, step : step + 1], -k[:, :, step : step + 1])
        assert torch.equal(got, k[:, :, : step + 1])
    assert (cache.capacity, cache.length) == (8, 7)  # 2 -> 4 -> 8
    cache.update(k[:, :, :3], k[:, :, :3])
    assert cache.capacity == 10  # never past max_len


# --- pluggable FFN ------------------------------------------------------------------------------


def test_make_ffn_is_dense_without_experts():
    cfg = dataclasses.replace(SMALL_TEXT, moe=MoEConfig(num_experts=0, layers=[1]))
    assert all(type(make_ffn(cfg, i)) is SwiGLU for i in range(cfg.num_layers))
    model = GLMDecoder(cfg)
    model(torch.randint(1, V, (2, 5)))
    assert model.aux_loss().item() == 0.0 and model.moe_stats() == {}


def test_moe_layers_plug_in():
    moe = pytest.importorskip("autoglm_phone.models.moe")
    cfg = dataclasses.replace(SMALL_TEXT, moe=MoEConfig(num_experts=4, top_k=2, layers=[1]))
    model = GLMDecoder(cfg)
    assert type(model.layers[0].mlp) is SwiGLU
    assert isinstance(model.layers[1].mlp, moe.MoEFeedForward)
    model(torch.randint(1, V, (2, 5)))
    assert model.aux_loss().ndim == 0 and torch.isfinite(model.aux_loss())
    assert set(model.moe_stats()) == {1}


def test_prefix_mask_needs_no_cumprod():
    """Leading pads from a cumsum equal the ``cumprod`` count they replaced (ExecuTorch has no
    cumprod kernel), and the prefix mask's graph holds no cumprod."""
    from autoglm_phone.models.layers import build_attention_mask, leading_pads

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = torch.rand(5, 9, generator=g) > 0.5
        mask[0] = False  # all padding
        mask[1] = True  # none
        assert torch.equal(leading_pads(mask), (~mask).long().cumprod(-1).sum(-1))

    class Prefix(torch.nn.Module):
        def forward(self, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return build_attention_mask(mask, "prefix", lengths)

    program = torch.export.export(Prefix(), (mask, mask.sum(-1)))
    assert not [n for n in program.graph.nodes if "cumprod" in str(n.target)]
