"""LoRA / DoRA through peft on AutoGLMModel: freezing, identity at init, merge, unmerge, training."""

import copy

import pytest
import torch

from autoglm_phone.config import AudioConfig, DecoderConfig, MultiModalConfig, VisionConfig
from autoglm_phone.losses import itc_loss
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.models.lora import (
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    trainable_summary,
    unmerge_lora,
)

ALL = ("text", "vision", "audio")
LAYERS = {"text": 2 * 6, "vision": 1 * 4, "audio": 1 * 4}  # blocks x adapted linears per block


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several, much more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> AutoGLMModel:
    torch.manual_seed(0)
    cfg = MultiModalConfig(
        vision=VisionConfig(img_size=32, patch_size=8, depth=1),
        audio=AudioConfig(depth=1),
        text=DecoderConfig(
            vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2
        ),
        embed_dim=32,
        proj_rank=8,
    )
    return AutoGLMModel(cfg).eval()


def _batch(n: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.bool)
    return {
        "image": dict(
            modality="image",
            media=torch.rand(n, 3, 32, 32, generator=g),
            input_ids=ids,
            attention_mask=mask,
        ),
        "audio": dict(
            modality="audio",
            media=0.1 * torch.randn(n, 4000, generator=g),
            input_ids=ids,
            attention_mask=mask,
        ),
    }


@torch.no_grad()
def _outputs(model: AutoGLMModel, batch) -> torch.Tensor:
    model.eval()
    outs = [model(**batch[m]) for m in ("image", "audio")]
    return torch.cat([torch.cat([o["image_features"], o["text_features"]], -1) for o in outs])


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Every non-adapter parameter, under the plain model's names."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.named_parameters()
        if "lora_" not in k
    }


def _perturb(model) -> None:
    """Non-zero LoRA B (and DoRA magnitudes), as after training."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _steps(model, batch, n: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn, losses = itc_loss(), []
    model.train()
    for _ in range(n):
        loss = loss_fn(**model(**batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("targets", [("text",), ("vision",), ("audio",), ALL])
def test_only_lora_parameters_train(targets):
    model = apply_lora(_model(), targets=targets)
    names = lora_layers(model)
    assert len(names) == sum(LAYERS[t] for t in targets)
    assert all(n.startswith(targets) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = trainable_summary(model)
    assert summary["lora_layers"] == len(names) and 0 < summary["fraction"] < 0.2
    assert {m for m, row in summary["per_module"].items() if row["trainable"]} == set(targets)


def test_keep_trainable_and_bad_targets():
    model = apply_lora(_model(), targets=("text",), keep_trainable=("text_proj", "logit_scale"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable and "text_proj.up.weight" in trainable
    assert not any(n.startswith("vision") for n in trainable)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(_model(), targets=("decoder",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(_model())


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_starts_as_the_base_model(use_dora):
    batch, base = _batch(), _model()
    model = apply_lora(copy.deepcopy(base), targets=ALL, use_dora=use_dora)
    assert torch.allclose(_outputs(model, batch), _outputs(base, batch), atol=1e-5)


def test_training_moves_outputs_not_base_weights():
    batch = _batch()
    model = apply_lora(_model(), targets=ALL)
    before, weights = _outputs(model, batch), _base_weights(model)
    _steps(model, batch["image"], 3)
    assert not torch.allclose(_outputs(model, batch), before, atol=1e-4)
    after = _base_weights(model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(use_dora):
    batch = _batch()
    model = apply_lora(_model(), targets=ALL, use_dora=use_dora)
    weights = _base_weights(model)
    _perturb(model)
    unmerged = _outputs(model, batch)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert torch.allclose(_outputs(model, batch), unmerged, atol=1e-5)
    unmerge_lora(model)
    restored = _base_weights(model)
    assert all(torch.allclose(weights[k], restored[k], atol=1e-6) for k in weights)
    assert torch.allclose(_outputs(model, batch), unmerged, atol=1e-5)


def test_unload_gives_a_plain_model_and_adapters_round_trip():
    batch = _batch()
    model = apply_lora(_model(), targets=("text", "vision"), r=4)
    _perturb(model)
    tuned = _outputs(model, batch)
    adapters = lora_state_dict(model)
    assert adapters and all("lora_" in k for k in adapters)
    fresh = load_lora_state_dict(apply_lora(_model(), targets=("text", "vision"), r=4), adapters)
    assert torch.allclose(_outputs(fresh, batch), tuned, atol=1e-6)
    merge_lora(model, unload=True)
    assert not lora_layers(model)
    assert model.state_dict().keys() == _model().state_dict().keys()
    assert torch.allclose(_outputs(model, batch), tuned, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_itc_loss_decreases_with_lora(use_dora):
    model = apply_lora(_model(), targets=("text", "vision"), use_dora=use_dora)
    losses = _steps(model, _batch(8)["image"], 20)
    assert losses[-1] < 0.25 * losses[0], losses
