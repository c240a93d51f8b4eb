"""Media adapters: token pooling, low-rank projection into the decoder, modality embedding."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import AttentionalPooler

from autoglm_phone.config import AdapterConfig
from autoglm_phone.models.adapters import (
    AttentionTokenPool,
    AvgTokenPool,
    LowRankProjection,
    MediaAdapter,
)


def test_low_rank_projection_is_rank_limited():
    proj = LowRankProjection(48, 32, rank=4)
    assert sum(p.numel() for p in proj.parameters()) == 4 * (48 + 32) + 32
    weight = proj.up.weight @ proj.down.weight  # (32, 48) effective map
    assert torch.linalg.matrix_rank(weight) == 4
    with pytest.raises(ValueError, match="rank"):
        LowRankProjection(48, 32, rank=0)


def test_avg_pool_on_the_patch_grid_merges_neighbours():
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 raster of patches, one channel
    pooled = AvgTokenPool(4, grid=True)(x)  # (1, 4, 1): the 2 x 2 quadrants
    quadrants = x.reshape(4, 4).unfold(0, 2, 2).unfold(1, 2, 2).mean((-1, -2)).flatten()
    assert torch.equal(pooled[0, :, 0], quadrants)
    assert torch.equal(AvgTokenPool(16, grid=True)(x), x)  # K == N: identity
    with pytest.raises(ValueError, match="square"):
        AvgTokenPool(16, grid=True)(torch.randn(1, 15, 1))


def test_avg_pool_over_time_takes_any_length():
    pool = AvgTokenPool(4)
    for n in (4, 7, 25, 100):
        assert pool(torch.randn(2, n, 8)).shape == (2, 4, 8)
    x = torch.arange(8.0).reshape(1, 8, 1)
    assert pool(x)[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]  # order kept


def test_attention_pool_learned_queries():
    pool = AttentionTokenPool(dim=128, num_tokens=5)
    assert pool.attn.num_heads == 2  # 64-wide heads
    for n in (3, 40):
        assert pool(torch.randn(2, n, 128)).shape == (2, 5, 128)
    assert AttentionTokenPool(dim=48, num_tokens=2).attn.num_heads == 1


def test_attention_pool_is_open_clips_with_the_saved_names():
    """open_clip's pooler, not a copy; its state-dict names are the ones saved adapters have."""
    pool = AttentionTokenPool(dim=64, num_tokens=3)
    assert isinstance(pool, AttentionalPooler)
    assert list(pool.state_dict()) == [
        "query", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias",
    ]  # fmt: skip
    x = torch.randn(2, 7, 64)  # what the copy computed: LN'd queries attend to LN'd tokens
    q = pool.ln_q(pool.query).expand(2, -1, -1)
    k = pool.ln_k(x)
    torch.testing.assert_close(pool(x), pool.attn(q, k, k, need_weights=False)[0])


@pytest.mark.parametrize("pool", ["avg", "attn"])
def test_media_adapter_maps_tokens_into_the_decoder(pool):
    adapter = MediaAdapter(in_dim=48, out_dim=32, rank=8, num_tokens=4, pool=pool, grid=True)
    tokens = torch.randn(3, 16, 48, requires_grad=True)
    out = adapter(tokens)
    assert out.shape == (3, 4, 32)
    out.square().sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in adapter.parameters())


def test_modality_embedding_is_added_to_every_token():
    adapter = MediaAdapter(in_dim=8, out_dim=6, rank=2, num_tokens=3)
    with torch.no_grad():
        adapter.proj.up.weight.zero_()
        adapter.proj.up.bias.zero_()
    out = adapter(torch.randn(2, 9, 8))
    assert torch.equal(out, adapter.modality_embed.expand(2, 3, 6))


def test_position_embedding_tells_slots_apart():
    adapter = MediaAdapter(
        in_dim=8, out_dim=6, rank=2, num_tokens=4, grid=True, position_embed=True
    )
    same = torch.ones(1, 16, 8)  # every patch identical: only the slot embedding differs
    out = adapter(same)
    assert out.shape == (1, 4, 6)
    assert torch.allclose(out - adapter.position_embed, out[:, :1] - adapter.position_embed[:1])
    assert (out[0, 0] - out[0, 3]).abs().max() > 0
    plain = MediaAdapter(in_dim=8, out_dim=6, rank=2, num_tokens=4, grid=True)
    assert plain.position_embed is None and torch.allclose(plain(same), plain(same)[:, :1])


def test_summary_token_puts_the_pooled_feature_first():
    adapter = MediaAdapter(
        in_dim=8,
        out_dim=6,
        rank=2,
        num_tokens=4,
        grid=True,
        position_embed=True,
        summary_token=True,
    )
    tokens, pooled = torch.randn(2, 16, 8), torch.randn(2, 8)
    out = adapter(tokens, pooled)
    assert adapter.num_tokens == 5 and out.shape == (2, 5, 6)
    first = adapter.proj(pooled) + adapter.modality_embed + adapter.position_embed[0]
    assert torch.allclose(out[:, 0], first, atol=1e-6)
    # the pooled grid follows, unchanged by the extra slot
    plain = MediaAdapter(in_dim=8, out_dim=6, rank=2, num_tokens=4, grid=True)
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if k != "position_embed"})
    assert torch.allclose(out[:, 1:] - adapter.position_embed[1:], plain(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="summary_token"):
        adapter(tokens)


def test_adapter_config_validation():
    assert AdapterConfig(pool="attn", image_tokens=10).image_tokens == 10  # any count with attn
    with pytest.raises(ValueError, match="square"):
        AdapterConfig(pool="avg", image_tokens=10)
    with pytest.raises(ValueError, match="adapter.pool"):
        AdapterConfig(pool="max")
    with pytest.raises(ValueError, match="adapter.rank"):
        AdapterConfig(rank=0)
