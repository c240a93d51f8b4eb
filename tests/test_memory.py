import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoglm_phone.config import DecoderConfig, MemoryConfig
from autoglm_phone.models.glm import GLMDecoder
from autoglm_phone.models.memory import MemoryGLMDecoder

SEG, SLOTS = 16, 4


def _cfg(enabled: bool = True, segment_len: int = SEG, bptt: int = 2) -> DecoderConfig:
    memory = MemoryConfig(
        enabled=enabled, segment_len=segment_len, num_slots=SLOTS, bptt_segments=bptt
    )
    return DecoderConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, memory=memory
    )


def _model(**kwargs) -> MemoryGLMDecoder:
    torch.manual_seed(0)
    return MemoryGLMDecoder(_cfg(**kwargs)).eval()


@pytest.mark.parametrize("t", [SEG, 11])
def test_one_segment_equals_glm_decoder(t):
    torch.manual_seed(0)
    decoder = GLMDecoder(_cfg(enabled=False)).eval()
    model = MemoryGLMDecoder.from_decoder(decoder, MemoryConfig(enabled=True, segment_len=SEG))
    assert model.cfg.memory.enabled and model.layers[0].memory_init.shape == (32, 64)
    ids = torch.randint(1, 97, (2, t))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), decoder(ids), atol=1e-5, rtol=0)


def test_from_decoder_loads_everything_but_the_memory_parameters():
    decoder = GLMDecoder(_cfg())
    model = MemoryGLMDecoder(_cfg())
    missing, unexpected = model.load_state_dict(decoder.state_dict(), strict=False)
    assert not unexpected
    assert sorted({k.split(".", 2)[2] for k in missing}) == [
        "memory_gate.bias",
        "memory_gate.weight",
        "memory_init",
        "self_attn.memory_read_bias",
        "self_attn.memory_write_bias",
    ]


def test_without_memory_segments_are_independent_glm_windows():
    model = _model(enabled=False)
    decoder = GLMDecoder(_cfg())
    decoder.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(1, 97, (2, 3 * SEG))
    with torch.no_grad():
        out = model(ids)
        for start in range(0, 3 * SEG, SEG):  # positions restart at 0 in every segment
            window = decoder(ids[:, start : start + SEG])
            torch.testing.assert_close(out[:, start : start + SEG], window, atol=1e-5, rtol=0)


def test_shapes_and_streaming_match_forward():
    model = _model()
    ids = torch.randint(1, 97, (2, 3 * SEG + 5))  # the last segment is shorter
    with torch.no_grad():
        logits, memory = model.forward_with_memory(ids)
        assert logits.shape == (2, 3 * SEG + 5, 97) and logits.isfinite().all()
        assert memory.filled and [m.shape for m in memory.slots] == [(2, SLOTS, 64)] * 2
        state, streamed = model.init_memory(2), []
        for start in range(0, ids.shape[1], SEG):
            out, state = model.step(ids[:, start : start + SEG], state)
            streamed.append(out)
    torch.testing.assert_close(torch.cat(streamed, 1), logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at most memory.segment_len"):
        model.step(ids[:, : SEG + 1], state)


@pytest.mark.parametrize("enabled", [True, False])
def test_memory_carries_the_first_segment_to_the_last(enabled):
    model = _model(enabled=enabled)
    ids = torch.randint(1, 97, (2, 4 * SEG))
    other = ids.clone()
    other[:, :SEG] = torch.randint(1, 97, (2, SEG))
    with torch.no_grad():
        diff = (model(ids)[:, -SEG:] - model(other)[:, -SEG:]).abs().max().item()
    assert (diff > 1e-4) if enabled else (diff == 0.0)


def test_memory_read_is_causal():
    model = _model()
    ids = torch.randint(1, 97, (1, 4 * SEG))
    p = SEG + 5  # a token inside the second segment
    other = ids.clone()
    other[:, p] = (ids[:, p] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(other)
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=0, rtol=0)  # the past is untouched
    assert (a[:, p] - b[:, p]).abs().max() > 1e-4
    assert (a[:, 3 * SEG :] - b[:, 3 * SEG :]).abs().max() > 1e-4  # later segments see it


@pytest.mark.parametrize(
    ("bptt", "reached"), [(1, [0, 0, 0, 1]), (2, [0, 0, 1, 1]), (4, [1, 1, 1, 1])]
)
def test_gradients_flow_through_bptt_segments_only(bptt, reached):
    model = _model(bptt=bptt).train()
    x = model.embed_tokens(torch.randint(1, 97, (2, 4 * SEG))).detach().requires_grad_()
    model(inputs_embeds=x)[:, -SEG:].logsumexp(-1).sum().backward()  # loss on the last segment
    grads = [int(x.grad[:, i * SEG : (i + 1) * SEG].abs().sum() > 0) for i in range(4)]
    assert grads == reached


def test_segment_checkpointing_keeps_the_gradients():
    model = _model(bptt=2).train()
    ids = torch.randint(1, 97, (2, 3 * SEG + 3))
    grads = []
    for ckpt in (False, True):
        model.checkpoint_segments = ckpt
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert model.layers[0].memory_init.grad.abs().sum() > 0  # the learned init trains


def _attention_shapes(model, ids, monkeypatch) -> set[tuple[int, int]]:
    """(queries, keys) of every attention score matrix a forward computes."""
    shapes = set()
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.add((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(ids)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return shapes


def test_attention_and_memory_are_bounded_by_segment_and_slots(monkeypatch):
    model = _model()
    short, long = torch.randint(1, 97, (1, 2 * SEG)), torch.randint(1, 97, (1, 8 * SEG))
    expected = {(SEG, SEG), (SEG, SLOTS + SEG), (SLOTS, SLOTS + SEG)}  # first read, read, write
    assert _attention_shapes(model, short, monkeypatch) == expected
    assert _attention_shapes(model, long, monkeypatch) == expected
    state = model.forward_with_memory(long)[1]
    assert sum(m.numel() for m in state.slots) == 2 * SLOTS * 64  # the carried state, any length
    # the check can fail: the full-attention decoder's scores grow with the sequence
    full = GLMDecoder(_cfg()).eval()
    assert (8 * SEG, 8 * SEG) in _attention_shapes(full, long, monkeypatch)


@pytest.mark.slow
def test_tiny_long_recall_learns_with_memory(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import long_recall

    args = "--seq-len 128 --segment-len 64 --pairs 1 --steps 300 --curriculum 0"
    models = ["--models", "memory,no_memory", "--out", str(tmp_path)]
    report = long_recall.main([*args.split(), *models])
    acc = {name: res["final_accuracy"] for name, res in report["results"].items()}
    assert acc["memory"] > 0.5 and acc["no_memory"] < 0.25, acc  # chance: 1 / 16


def test_config_fields_are_read_with_defaults():
    cfg = dataclasses.replace(_cfg(), memory=MemoryConfig(enabled=True, num_slots=3))
    model = MemoryGLMDecoder(cfg)
    assert model.checkpoint_segments is False and model.layers[0].memory_init.shape == (3, 64)
    assert torch.allclose(model.layers[0].memory_gate.bias, torch.ones(64))
    attn = model.layers[0].self_attn
    read_bias = torch.full((4,), math.log(512 / 3) + 2)  # log(segment_len / num_slots) + 2
    assert torch.allclose(attn.memory_read_bias, read_bias)
    assert torch.allclose(attn.memory_write_bias, torch.full((4,), math.log(3) + 2))
