"""Memory inside the whole model: with segments shorter than the media + text sequences, every
objective, LoRA, saving and generation go through the segment-recurrent path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHALLOW
from test_recipes import SHALLOW_TOWERS, _cfg

from autoglm_phone import AutoGLMModel
from autoglm_phone.app.train import build
from autoglm_phone.models.lora import apply_lora, lora_layers

# 8-token segments: an image or clip block (17 tokens + 2 markers) alone spans three
SEGMENTS = ["model.text.memory.segment_len=8", "model.text.memory.num_slots=4"]
MEMORY = {"enabled": True, "segment_len": 8, "num_slots": 4}


def test_every_objective_trains_across_segments(tmp_path, cache_dir):
    cfg = _cfg(
        "itm_mlm_pretrain",
        tmp_path,
        cache_dir,
        "objective.lm_weight=1.0",
        "data.instructions=true",
        "data.batch_size=4",
        "model.text_encoder_layers=0",  # ITC's text side through the memory decoder too
        *SHALLOW_TOWERS,
        *SEGMENTS,
    )
    built = build(cfg)
    module = built.module
    batch = next(iter(built.datamodule._loader("audio", "train", shuffle=False)))
    torch.manual_seed(0)
    losses, _, _ = module._objectives(batch)
    assert {"itc", "itm", "mlm", "lm"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    module._total(losses).backward()
    layer = module.model.text.layers[0]
    # the read bias and the keep-gate only get gradients when a later segment reads the memory
    for name, p in [
        ("memory_init", layer.memory_init),
        ("memory_gate", layer.memory_gate.weight),
        ("memory_read_bias", layer.self_attn.memory_read_bias),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    memory = module.model.text.cfg.memory
    memory.carry = False  # the same weights without the memory: other losses
    try:
        torch.manual_seed(0)
        without, _, _ = module._objectives(batch)
    finally:
        memory.carry = True
    for name in ("itc", "mlm", "lm"):
        assert abs(without[name].item() - losses[name].item()) > 1e-4, name


@pytest.fixture(scope="module")
def tiny_memory(tokenizer):
    torch.manual_seed(0)
    config = {**SHALLOW, "text": {**SHALLOW["text"], "memory": MEMORY}}
    return AutoGLMModel.from_pretrained("autoglm-phone-tiny", config, tokenizer=tokenizer).eval()


def test_saved_memory_model_loads_to_the_same_outputs(tiny_memory, tmp_path):
    folder = tiny_memory.save_pretrained(tmp_path / "model")
    again = AutoGLMModel.from_pretrained(folder).eval()
    assert again.cfg.text.memory == tiny_memory.cfg.text.memory
    ids = torch.randint(3, 300, (2, 30))  # four segments
    with torch.no_grad():
        assert torch.equal(again.text(ids), tiny_memory.text(ids))
    s = tiny_memory.summary(context_len=1000, show=False)
    assert s.kv_cache_bytes == 2 * 2 * 2 * 64 * 8 * 2  # one 8-token segment, 2 layers
    assert s.memory_state_bytes == 2 * 4 * 256 * 2  # 4 slots of 256 per layer, FP16


def test_lora_wraps_the_memory_gate(tokenizer):
    torch.manual_seed(0)
    config = {**SHALLOW, "text": {**SHALLOW["text"], "memory": MEMORY}}
    model = AutoGLMModel.from_pretrained("autoglm-phone-tiny", config, tokenizer=tokenizer)
    apply_lora(model, targets=("text",), r=4)
    wrapped = lora_layers(model)
    assert {f"text.layers.{i}.memory_gate" for i in range(2)} <= set(wrapped)
    model.text(torch.randint(3, 300, (1, 30))).logsumexp(-1).mean().backward()
    gate = wrapped["text.layers.0.memory_gate"]
    assert gate.lora_B["default"].weight.grad.abs().sum() > 0  # LoRA reaches the memory write


def test_multimodal_generation_across_segments(tiny_memory, tokenizer):
    images = torch.rand(2, 3, 64, 64)
    ids = tokenizer(["describe the image", "what"], padding=True, return_tensors="pt")
    out = tiny_memory.generate(
        images=images, input_ids=ids.input_ids, attention_mask=ids.attention_mask,
        max_new_tokens=12, stop_token_ids=(),
    )  # fmt: skip
    assert out.shape == (2, 12)
    first = tiny_memory.generate(
        images=images[:1], input_ids=ids.input_ids[:1], attention_mask=ids.attention_mask[:1],
        max_new_tokens=12, stop_token_ids=(),
    )  # fmt: skip
    assert torch.equal(first, out[:1])  # padding of the other row changes nothing


def test_itc_pretrain_trains_the_same_with_memory_on(tmp_path, cache_dir):
    """itc_pretrain's text side is its own encoder: with the memory weights drawn from their own
    stream, turning memory on changes no initial weight, loss or gradient of that recipe."""
    runs = {}
    for on in (True, False):
        cfg = _cfg("itc_pretrain", tmp_path / str(on), cache_dir, "data.batch_size=8",
                   *SHALLOW_TOWERS, f"model.text.memory.enabled={str(on).lower()}")  # fmt: skip
        built = build(cfg)
        batch = next(iter(built.datamodule._loader("image", "train", shuffle=False)))
        losses, _, _ = built.module._objectives(batch)
        built.module._total(losses).backward()
        grads = {n: p.grad for n, p in built.module.model.named_parameters() if p.grad is not None}
        runs[on] = losses, grads, built.module.model.cfg.text.memory.enabled
    (on_losses, on_grads, on_enabled), (off_losses, off_grads, off_enabled) = (
        runs[True],
        runs[False],
    )
    assert on_enabled and not off_enabled and "itc" in on_losses
    assert {k: v.item() for k, v in on_losses.items()} == {
        k: v.item() for k, v in off_losses.items()
    }
    assert set(on_grads) == set(off_grads) and any(n.startswith("text_encoder.") for n in on_grads)
    for name, g in off_grads.items():
        torch.testing.assert_close(on_grads[name], g, atol=0, rtol=0, msg=name)
