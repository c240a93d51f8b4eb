"""The GLM decoder with memory (models/memory.py): equal to the plain decoder where it must be,
recurrent across segments, bounded, and generating exactly what a full recomputation gives."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoglm_phone.config import DecoderConfig, MemoryConfig, MoEConfig
from autoglm_phone.models.glm import GLMDecoder
from autoglm_phone.models.memory import SegmentRunner

SEG, SLOTS, V = 16, 4, 97
MODES = ["causal", "prefix", "bidirectional"]


def _cfg(enabled=True, segment_len=SEG, bptt=2, moe=False, **memory) -> DecoderConfig:
    mem = MemoryConfig(
        enabled=enabled, segment_len=segment_len, num_slots=SLOTS, bptt_segments=bptt, **memory
    )
    experts = MoEConfig(num_experts=4, top_k=2, layers=[1], capacity_factor=8.0) if moe else None
    return DecoderConfig(
        vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, memory=mem,
        moe=experts or MoEConfig(),
    )  # fmt: skip


def _model(**kwargs) -> GLMDecoder:
    torch.manual_seed(0)
    return GLMDecoder(_cfg(**kwargs)).eval()


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``(B, T)`` and a mask with each row's padding first."""
    lens, t = torch.tensor(lengths), max(lengths)
    ids = torch.randint(1, V, (len(lengths), t))
    return ids, torch.arange(t)[None] >= (t - lens)[:, None]


def _kwargs(mode: str, mask: torch.Tensor) -> dict:
    return {"attention_mask": mask, "mode": mode, "prefix_lengths": mask.sum(1) - 2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [SEG, 11])
def test_one_segment_equals_the_plain_decoder_exactly(mode, t):
    plain = _model(enabled=False)
    model = _model()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".memory_" in k for k in missing)
    ids, mask = _left_padded([t, t - 3])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, **_kwargs(mode, mask)), plain(ids, **_kwargs(mode, mask)), atol=0, rtol=0
        )


def test_memory_off_is_the_plain_decoder_and_on_adds_only_memory_weights():
    off, on = _model(enabled=False), _model()
    assert not any("memory" in k for k in off.state_dict())
    new = sorted({k.split(".", 2)[-1] for k in set(on.state_dict()) - set(off.state_dict())})
    assert new == [
        "memory_gate.bias",
        "memory_gate.weight",
        "memory_init",
        "self_attn.memory_read_bias",
        "self_attn.memory_write_bias",
    ]


def test_memory_weights_leave_every_other_initial_weight_unchanged():
    """The memory weights draw from their own stream: the same seed gives a memory model the
    very weights of the model without memory, modules built after the decoder included (so a
    recipe that never runs the decoder, like itc_pretrain, trains the same with memory on)."""
    from autoglm_phone import AutoGLMModel

    def weights(memory: dict) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        text = {"num_layers": 2, "hidden_size": 64, "moe": {"layers": [1]}, "memory": memory}
        text["vocab_size"] = 128
        config = {"text": text, "text_encoder_layers": 1}
        return AutoGLMModel.from_pretrained("autoglm-phone-tiny", config).state_dict()

    off = weights({"enabled": False})
    on = weights({"enabled": True, "segment_len": 16, "num_slots": 4})
    assert set(off) < set(on) and any(k.startswith("text_encoder.") for k in off)
    for k, v in off.items():
        torch.testing.assert_close(on[k], v, atol=0, rtol=0, msg=k)
    again = weights({"enabled": True, "segment_len": 16, "num_slots": 4})
    for k in set(on) - set(off):  # deterministic under the seed, and not left uninitialised
        torch.testing.assert_close(again[k], on[k], atol=0, rtol=0, msg=k)
        assert torch.isfinite(on[k]).all() and on[k].abs().max() < 10, k


def test_without_carry_segments_are_independent_plain_windows():
    model = _model(carry=False)
    plain = _model(enabled=False)
    plain.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(1, V, (2, 3 * SEG))
    with torch.no_grad():
        out = model(ids)
        for start in range(0, 3 * SEG, SEG):  # positions restart at 0 in every segment
            window = plain(ids[:, start : start + SEG])
            torch.testing.assert_close(out[:, start : start + SEG], window, atol=1e-5, rtol=0)


def test_streaming_segments_matches_one_forward():
    model = _model()
    ids = torch.randint(1, V, (2, 3 * SEG + 5))  # the last segment is shorter
    with torch.no_grad():
        logits, memory = model.forward_with_memory(ids)
        assert logits.shape == (2, 3 * SEG + 5, V) and logits.isfinite().all()
        assert memory.filled.all() and [m.shape for m in memory.slots] == [(2, SLOTS, 64)] * 2
        state, streamed = model.init_memory(2), []
        for start in range(0, ids.shape[1], SEG):
            out, state = model.forward_with_memory(ids[:, start : start + SEG], memory=state)
            streamed.append(out)
    torch.testing.assert_close(torch.cat(streamed, 1), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("carry", [True, False])
def test_memory_carries_the_first_segment_to_the_last(carry):
    model = _model(carry=carry)
    ids = torch.randint(1, V, (2, 4 * SEG))
    other = ids.clone()
    other[:, :SEG] = torch.randint(1, V, (2, SEG))
    with torch.no_grad():
        diff = (model(ids)[:, -SEG:] - model(other)[:, -SEG:]).abs().max().item()
    assert (diff > 1e-4) if carry else (diff == 0.0)


def test_memory_read_is_causal():
    model = _model()
    ids = torch.randint(1, V, (1, 4 * SEG))
    p = SEG + 5  # a token inside the second segment
    other = ids.clone()
    other[:, p] = (ids[:, p] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(other)
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=0, rtol=0)  # the past is untouched
    assert (a[:, p] - b[:, p]).abs().max() > 1e-4
    assert (a[:, 3 * SEG :] - b[:, 3 * SEG :]).abs().max() > 1e-4  # later segments see it


@pytest.mark.parametrize("mode", MODES)
def test_left_padding_changes_nothing_across_segments(mode):
    """Segments count from each row's first real token, so a padded row equals itself alone."""
    model = _model()
    ids, mask = _left_padded([3 * SEG + 5, SEG + 2, 2 * SEG])
    with torch.no_grad():
        batch = model(ids, **_kwargs(mode, mask))
        for r in range(3):
            real = ids[r : r + 1, mask[r]]
            ones = torch.ones_like(real, dtype=torch.bool)
            alone = model(real, **_kwargs(mode, ones))
            torch.testing.assert_close(batch[r : r + 1, mask[r]], alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("bptt", "reached"), [(1, [0, 0, 0, 1]), (2, [0, 0, 1, 1]), (4, [1, 1, 1, 1])]
)
def test_gradients_flow_through_bptt_segments_only(bptt, reached):
    model = _model(bptt=bptt).train()
    x = model.embed_tokens(torch.randint(1, V, (2, 4 * SEG))).detach().requires_grad_()
    model(inputs_embeds=x)[:, -SEG:].logsumexp(-1).sum().backward()  # loss on the last segment
    grads = [int(x.grad[:, i * SEG : (i + 1) * SEG].abs().sum() > 0) for i in range(4)]
    assert grads == reached


def test_segment_checkpointing_keeps_the_gradients():
    model = _model(bptt=2, moe=True).train()
    ids = torch.randint(1, V, (2, 3 * SEG + 3))
    grads = []
    for ckpt in (False, True):
        model.checkpoint_segments = ckpt
        model.zero_grad()
        (model(ids).logsumexp(-1).mean() + model.aux_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert model.layers[0].memory_init.grad.abs().sum() > 0  # the learned init trains


def test_moe_balance_loss_is_averaged_over_segments():
    model = _model(moe=True, carry=False)  # independent segments: each can be run alone
    ids = torch.randint(1, V, (2, 3 * SEG))
    with torch.no_grad():
        model(ids)
        whole = model.aux_loss()
        per_segment = []
        for start in range(0, 3 * SEG, SEG):
            model(ids[:, start : start + SEG])
            per_segment.append(model.aux_loss())
    assert whole > 0
    torch.testing.assert_close(whole, torch.stack(per_segment).mean())


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
    short, long = torch.randint(1, V, (1, 2 * SEG)), torch.randint(1, V, (1, 8 * SEG))
    expected = {(SEG, SEG), (SEG, SLOTS + SEG), (SLOTS, SLOTS + SEG)}  # first read, read, write
    assert _attention_shapes(model, short, monkeypatch) == expected
    assert _attention_shapes(model, long, monkeypatch) == expected
    state = model.forward_with_memory(long)[1]
    assert sum(m.numel() for m in state.slots) == 2 * SLOTS * 64  # the carried state, any length
    # the check can fail: the full-attention decoder's scores grow with the sequence
    full = _model(enabled=False)
    assert (8 * SEG, 8 * SEG) in _attention_shapes(full, long, monkeypatch)


def _decode_logits(model, ids, mask, mode, steps):
    """Greedy decoding through prefill + decode_step, returning the tokens and their logits."""
    runner = SegmentRunner(model)
    x = model.embed_tokens(ids)
    prefix = mask.sum(1) if mode == "prefix" else None
    hidden, memory, cache = runner.prefill(x, mask, mode, prefix)
    assert cache.k.shape[3] == SEG  # one segment, however long the prompt
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(model.lm_head(hidden))
        tokens.append(logits[-1].argmax(-1))
        hidden, memory = runner.decode_step(model.embed_tokens(tokens[-1][:, None]), memory, cache)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_cached_decoding_equals_full_recomputation_across_segments(mode, moe):
    model = _model(moe=moe)
    ids, mask = _left_padded([2 * SEG + 5, 7, SEG])  # prompts end mid-, early and at a border
    steps = 2 * SEG + 3  # every row crosses at least two segment borders while decoding
    with torch.no_grad():
        tokens, logits = _decode_logits(model, ids, mask, mode, steps)
        full_ids = torch.cat([ids, tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(tokens, dtype=torch.bool)], 1)
        prefix = mask.sum(1) if mode == "prefix" else None
        ref = model(full_ids, attention_mask=full_mask, mode=mode, prefix_lengths=prefix)
    ref = ref[:, ids.shape[1] - 1 : -1]  # the logits that chose each new token
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=0)
    assert torch.equal(ref.argmax(-1), tokens)
    assert len(set(tokens.flatten().tolist())) > 3  # not one repeated token


def test_generate_with_memory_matches_each_row_alone():
    model = _model()
    ids, mask = _left_padded([2 * SEG + 5, 7, SEG])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=SEG + 4)
    assert out.shape == (3, SEG + 4)
    for r in range(3):
        alone = model.generate(ids[r : r + 1, mask[r]], max_new_tokens=SEG + 4)
        assert torch.equal(alone, out[r : r + 1])
    long = torch.randint(1, V, (1, 40 * SEG))  # far beyond max_seq_len's role: any length works
    assert model.generate(long, max_new_tokens=2).shape == (1, 2)


def test_memory_path_refuses_a_kv_cache_or_position_ids():
    model = _model()
    ids = torch.randint(1, V, (1, 2 * SEG))
    with pytest.raises(ValueError, match="positions restart in every segment"):
        model(ids, position_ids=torch.arange(2 * SEG)[None])


@pytest.mark.slow
def test_tiny_long_recall_learns_with_memory(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import long_recall

    args = "--seq-len 128 --segment-len 64 --pairs 1 --steps 300 --curriculum 0"
    models = ["--models", "memory,no_memory", "--out", str(tmp_path)]
    report = long_recall.main([*args.split(), *models])
    acc = {name: res["final_accuracy"] for name, res in report["results"].items()}
    assert acc["memory"] > 0.5 and acc["no_memory"] < 0.25, acc  # chance: 1 / 16


def test_memory_weights_initialise_as_documented():
    cfg = dataclasses.replace(_cfg(), memory=MemoryConfig(enabled=True, num_slots=3))
    model = GLMDecoder(cfg)
    assert model.checkpoint_segments is False and model.layers[0].memory_init.shape == (3, 64)
    assert torch.allclose(model.layers[0].memory_gate.bias, torch.ones(64))
    attn = model.layers[0].self_attn
    read_bias = torch.full((4,), math.log(512 / 3) + 2)  # log(segment_len / num_slots) + 2
    assert torch.allclose(attn.memory_read_bias, read_bias)
    assert torch.allclose(attn.memory_write_bias, torch.full((4,), math.log(3) + 2))
    chrono = GLMDecoder(_cfg(chrono_segments=128)).layers[1].memory_gate.bias
    assert chrono.min() >= 0 and chrono.max() <= math.log(127) and chrono.std() > 0.5
    with pytest.raises(ValueError, match="chrono_segments=2"):
        MemoryConfig(enabled=True, chrono_segments=2)


def test_gate_stats_average_the_keep_gate_of_every_write():
    model = _model()
    keeps: list[torch.Tensor] = []  # sigmoid of the gate's output, per write, seen from outside
    for layer in model.layers:
        layer.memory_gate.register_forward_hook(lambda m, i, out: keeps.append(out.sigmoid()))
    ids, mask = _left_padded([3 * SEG, 3 * SEG - 5])
    with torch.no_grad():
        model(ids, **_kwargs("causal", mask))
    stats = model.memory_stats()
    assert set(stats) == {0, 1}
    per_layer = len(keeps) // 2
    assert per_layer >= 2 and int(stats[0]["writes"]) == per_layer
    expected = torch.stack([k.mean() for k in keeps[0::2]]).mean()  # layer 0's writes
    torch.testing.assert_close(stats[0]["keep"], expected)
    assert torch.allclose(stats[1]["keep_prior"], torch.sigmoid(torch.ones(64)))  # b_f init 1
    assert stats[1]["read_bias"].shape == (4,) and stats[1]["write_bias"].shape == (4,)
    assert "keep" not in model.memory_stats()[0]  # reset by the read
    assert GLMDecoder(_cfg(enabled=False)).memory_stats() == {}
