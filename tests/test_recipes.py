"""Every experiment trains; the objectives learn; fine-tuning recipes freeze, thaw and merge as
they say; distillation is zero between identical models; eval.py reports the fused metrics.
The checkpoint they start from is the session's ``base_ckpt`` (conftest.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_DATA, compose_config
from lightning.pytorch.callbacks import Callback
from test_configs import EXPERIMENTS, compose_train

from autoglm_phone.app import evaluate
from autoglm_phone.app.eval_tasks import (
    RERANK_WEIGHTS,
    captioning_scores,
    fit_rerank_weight,
    rerank_metrics,
)
from autoglm_phone.app.evaluate import load_checkpoint
from autoglm_phone.app.module import lr_ratio_lookup, read_model_state
from autoglm_phone.app.train import build, run
from autoglm_phone.models.lora import lora_layers

EXPECTED = {  # experiment -> losses it must log for each modality
    "itc_pretrain": ["itc"],
    "itm_mlm_pretrain": ["itc", "itm", "mlm"],
    "caption_sft": ["lm"],
    "caption_sft_thinking": ["lm"],
    "lora_finetune": ["lm"],
    "freeze_then_unfreeze": ["itc"],
    "distill": ["itc", "distill"],
    "long_context_sft": ["episode"],
}


# vision and audio towers at depth 1 where only the text side is under test
SHALLOW_TOWERS = ["model.vision.depth=1", "model.audio.depth=1"]


def _cfg(experiment: str, out, cache_dir, *extra: str):
    return compose_train(
        [
            f"experiment={experiment}",
            "logger=csv",
            "logger.name=none",
            f"paths.output_dir={out}",
            f"paths.cache_dir={cache_dir}",
            "trainer.enable_progress_bar=false",
            *SMALL_DATA,
            *extra,
        ]
    )


def test_every_recipe_has_an_expectation():
    assert sorted(EXPECTED) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, base_run, tmp_path, cache_dir):
    base_ckpt = base_run["ckpt_path"]
    extra = ["trainer.fast_dev_run=2"]
    if experiment in (
        "caption_sft",
        "caption_sft_thinking",
        "lora_finetune",
        "freeze_then_unfreeze",
    ):
        extra.append(f"init_from={base_ckpt}")
    if experiment == "distill":
        extra.append(f"objective.distill.teacher_ckpt={base_ckpt}")
    cfg = _cfg(experiment, tmp_path, cache_dir, *extra)
    if experiment == "itm_mlm_pretrain":  # the session's base run is this very run
        result = base_run
    else:
        result = run(cfg)
    metrics = result["metrics"]
    for modality in cfg.data.modalities:  # image and audio; episode for long_context_sft
        for loss in EXPECTED[experiment]:
            value = metrics[f"train/{loss}_{modality}"]
            assert math.isfinite(value) and value >= 0, (loss, modality, value)
    state = torch.load(result["ckpt_path"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 2


def test_objectives_learn_on_a_fixed_batch(tmp_path, cache_dir):
    """ITC, ITM, MLM and the prefix LM all fall when one small batch is fitted."""
    cfg = _cfg(
        "itm_mlm_pretrain",
        tmp_path,
        cache_dir,
        "objective.lm_weight=1.0",
        "data.instructions=true",
        "data.batch_size=8",
        "model.vision.depth=2",
        "model.text.moe.capacity_factor=0",  # dropless: the losses depend on this batch only
    )
    built = build(cfg)
    module = built.module
    batch = next(iter(built.datamodule._loader("audio", "train", shuffle=False)))
    opt = torch.optim.AdamW(module.parameters(), lr=3e-4)
    torch.manual_seed(0)
    history = []
    for _ in range(60):
        losses, _, _ = module._objectives(batch)
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        module._total(losses).backward()
        opt.step()
    first, last = history[0], history[-1]
    for name in ("itc", "mlm", "lm"):  # 2.5 -> 0.2, 6.1 -> 2.3, 6.1 -> 0.5 when written
        assert last[name] < 0.7 * first[name], (name, first[name], last[name])
    # ITM sees 1 positive : 2 negatives, so knowing only that prior gives H(1/3) = 0.637 nats;
    # fresh hard negatives each step make it slower than the rest (0.64 -> ~0.5 by step 55)
    prior = math.log(3) - 2 / 3 * math.log(2)
    late = sum(h["itm"] for h in history[-5:]) / 5
    assert late < prior - 0.05, [round(h["itm"], 3) for h in history]


def test_lr_ratios_scale_the_named_parts(tmp_path, cache_dir):
    cfg = _cfg(
        "itc_pretrain",
        tmp_path,
        cache_dir,
        "+optim.lr_ratios.vision=3.0",
        "+optim.lr_ratios.vision_adapter=0.5",
        "trainer.fast_dev_run=2",
        "model.vision.depth=1",
    )
    built = build(cfg)
    built.trainer.fit(built.module, datamodule=built.datamodule)
    groups = built.trainer.optimizers[0].param_groups
    initial = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    for name, p in built.module.model.named_parameters():
        ratio = {"vision": 3.0, "vision_adapter": 0.5}.get(name.split(".")[0], 1.0)
        assert initial[id(p)] == pytest.approx(3e-4 * ratio), name
    # one schedule for all: every group is at the same share of its initial LR
    assert len({round(g["lr"] / g["initial_lr"], 9) for g in groups}) == 1
    ratio_of = lr_ratio_lookup({"vision": 3.0, "vision.vit.blocks": 0.5}, built.module.model)
    assert ratio_of("vision.vit.blocks.0.mlp.fc1.weight") == 0.5  # the longest prefix wins
    assert ratio_of("vision.vit.cls_token") == 3.0 and ratio_of("vision_proj.up.weight") == 1.0
    with pytest.raises(ValueError, match="visoin"):
        lr_ratio_lookup({"visoin": 2.0}, built.module.model)
    with pytest.raises(ValueError, match="must be > 0"):
        lr_ratio_lookup({"vision": 0.0}, built.module.model)


def test_freeze_then_unfreeze(tmp_path, cache_dir, base_ckpt):
    """Epoch 0: the ViT is frozen; from epoch 1 its top 2 blocks train, the rest never do."""
    cfg = _cfg(
        "freeze_then_unfreeze",
        tmp_path,
        cache_dir,
        f"init_from={base_ckpt}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0",
        "finetune.unfreeze.blocks=2",
        "finetune.unfreeze.epoch=1",
    )
    built = build(cfg)
    vit = built.module.model.vision.vit
    snapshot = {k: v.clone() for k, v in vit.state_dict().items()}
    after_epoch0 = {}

    class AfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                after_epoch0.update({k: v.clone() for k, v in vit.state_dict().items()})

    built.trainer.callbacks.append(AfterFirstEpoch())
    built.trainer.fit(built.module, datamodule=built.datamodule)
    final = vit.state_dict()
    assert all(torch.equal(after_epoch0[k], snapshot[k]) for k in snapshot)  # frozen in epoch 0
    depth = len(vit.blocks)
    for k in snapshot:
        upper = k.startswith((f"blocks.{depth - 1}.", f"blocks.{depth - 2}.", "norm."))
        changed = not torch.equal(final[k], snapshot[k])
        assert changed == upper, k
    text = built.module.model.text.embed_tokens.weight
    assert text.requires_grad  # the rest of the model trained throughout


def test_lora_finetune_trains_adapters_only_and_eval_merges(tmp_path, cache_dir, base_ckpt):
    result = run(
        _cfg(
            "lora_finetune", tmp_path, cache_dir, f"init_from={base_ckpt}", "trainer.fast_dev_run=2"
        )
    )
    base, _ = read_model_state(base_ckpt)
    tuned, hp = read_model_state(result["ckpt_path"])
    assert hp["finetune"]["lora"] and any("lora_A" in k for k in tuned)
    for key, value in tuned.items():
        plain = key.replace(".base_layer", "")
        if "lora_" in key:
            continue
        if key.startswith(("vision_adapter", "audio_adapter")):
            continue  # kept trainable on purpose
        assert torch.equal(value, base[plain]), f"{key} changed but should be frozen"
    model, _, _ = load_checkpoint(result["ckpt_path"])
    assert not lora_layers(model)  # merged for evaluation
    merged = model.text.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged, base["text.layers.0.self_attn.q_proj.weight"])


def test_distill_is_zero_between_identical_models(tmp_path, cache_dir, base_ckpt):
    """Student = teacher (same config, same weights): the KL term vanishes."""
    _, hp = read_model_state(base_ckpt)
    cfg = _cfg(
        "itc_pretrain",
        tmp_path,
        cache_dir,
        f"init_from={base_ckpt}",
        f"objective.distill.teacher_ckpt={base_ckpt}",
        "objective.distill.weight=1.0",
    )
    built = build(cfg)
    module = built.module.eval()
    module.load_teacher()
    batch = next(iter(built.datamodule._loader("audio", "val", shuffle=False)))
    with torch.no_grad():
        losses, _, _ = module._objectives(batch)
    assert losses["distill"].abs().item() < 1e-5
    module.model.logit_scale.data += 1.0  # a different student: the KL is positive
    with torch.no_grad():
        losses, _, _ = module._objectives(batch)
    assert losses["distill"].item() > 1e-3


def test_eval_reports_fused_metrics(base_ckpt, cache_dir, tmp_path):
    out = tmp_path / "metrics.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={base_ckpt}",
            f"output_json={out}",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
            "tasks=[itm,rerank,mlm,perplexity,captioning]",
            "rerank_k=4",
        ],
    )
    evaluate.run(cfg)
    fused = json.loads(out.read_text())["fused"]
    for m in ("image", "audio"):
        assert 0 <= fused[f"{m} itm"]["balanced_accuracy"] <= 100
        assert 0 <= fused[f"{m} mlm"]["unigram_baseline"] <= 100
        assert fused[f"{m} perplexity"]["perplexity"] > 1
        assert fused[f"{m} captioning"]["num_items"] > 0
        rerank = fused[f"{m}->text itm-rerank@4"]
        # re-ranking only reorders the ITC top 4, so recall at 5 and 10 cannot change
        assert rerank["R@5"] == rerank["itc_R@5"] and rerank["R@10"] == rerank["itc_R@10"]
        assert rerank["itm_weight"] in RERANK_WEIGHTS  # fitted on the validation split


def test_rerank_weight_is_fitted_to_what_the_itm_head_knows():
    keys = [0, 1, 2, 3]
    itc = torch.tensor([[1.0, 2.0, 0.0, 0.0]]).repeat(4, 1)  # ITC ranks item 1 first for all
    top = itc.topk(2, dim=1).indices  # (4, 2): items 1 then 0

    def direction(itm: torch.Tensor) -> dict:
        return {"itc": itc, "top": top, "itm": itm, "query_keys": keys, "gallery_keys": keys}

    right = (top == torch.tensor(keys)[:, None]).float() * 8 - 4  # ITM log-odds: +4 on the match
    scores = {"a->b": direction(right)}
    weight = fit_rerank_weight(scores)
    assert weight > 0
    report = rerank_metrics(scores, weight)["a->b itm-rerank@2"]
    assert report["itc_R@1"] == 25.0 and report["R@1"] == 50.0  # queries 0 and 1 fixed
    assert report["itm_weight"] == weight
    # an ITM head that prefers the wrong candidate is given no say
    assert fit_rerank_weight({"a->b": direction(-right)}) == 0.0


def test_captioning_scores_parse_answers():
    answers = [
        ("two small red circles at the top", "two small red circles at the top"),
        ("two small red squares at the top", "two small red circles at the top"),
        ("a purple elephant", "two small red circles at the top"),
    ]
    scores = captioning_scores("image", answers)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["shape_accuracy"] == pytest.approx(100 / 3)
    assert scores["colour_accuracy"] == pytest.approx(200 / 3)
    assert scores["unparsable"] == pytest.approx(100 / 3)


def test_separate_text_encoder_splits_itc_from_the_fused_objectives(tmp_path, cache_dir):
    """``model.text_encoder_layers``: ITC's gradient reaches the text encoder and never the
    decoder; ITM and MLM reach the decoder and never the text encoder (ALBEF's split)."""
    cfg = _cfg(
        "itm_mlm_pretrain",
        tmp_path,
        cache_dir,
        "model.text_encoder_layers=1",
        "data.batch_size=8",
        "model.vision.depth=1",
    )
    built = build(cfg)
    module, m = built.module, built.module.model
    assert len(m.text_encoder.layers) == 1 and m.itc_text_tower is m.text_encoder
    assert m.text_encoder.cfg.moe.num_experts == 0 and m.text_encoder.cfg.tie_word_embeddings
    built.datamodule.setup("fit")
    batch = next(iter(built.datamodule.train_dataloader()))
    batch = (batch[0] if isinstance(batch, tuple) else batch)["audio"]
    losses, _, _ = module._objectives(batch)
    for name, reaches, spared in (
        ("itc", m.text_encoder, m.text),
        ("itm", m.text, m.text_encoder),
        ("mlm", m.text, m.text_encoder),
    ):
        module.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reaches.parameters())
        assert all(p.grad is None for p in spared.parameters()), name
    module.zero_grad(set_to_none=True)
    module._total(losses).backward()  # MoE terms of this step only (no stale decoder graph)
    # and the whole recipe runs, saves and evaluates with the split
    result = run(
        _cfg(
            "itm_mlm_pretrain",
            tmp_path / "run",
            cache_dir,
            "model.text_encoder_layers=1",
            "trainer.fast_dev_run=2",
            *SHALLOW_TOWERS,
        )
    )
    trained, _, hp = load_checkpoint(result["ckpt_path"])
    assert hp["model"]["text_encoder_layers"] == 1 and trained.text_encoder is not None
    # ITC alone never runs the decoder: no MoE statistics to log, and it still trains
    itc = run(
        _cfg(
            "itc_pretrain",
            tmp_path / "itc",
            cache_dir,
            "model.text_encoder_layers=1",
            "trainer.fast_dev_run=2",
            *SHALLOW_TOWERS,
        )
    )
    assert math.isfinite(itc["metrics"]["train/itc_image"])
    # captioning from the split weights with the preset (no text encoder) leaves the encoder out
    sft = run(
        _cfg(
            "caption_sft",
            tmp_path / "sft",
            cache_dir,
            f"init_from={result['ckpt_path']}",
            "trainer.fast_dev_run=2",
            *SHALLOW_TOWERS,
        )
    )
    tuned, _ = read_model_state(sft["ckpt_path"])
    assert not any(k.startswith("text_encoder.") for k in tuned)
