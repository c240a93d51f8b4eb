"""Export for device, the generation side: ``ExportedModel.generate`` on exported ``embed`` /
``prefill`` / ``decode`` (/ ``memory_write``) against eager ``AutoGLMModel.generate``.

A small random model (the tiny preset's towers at depth 1, a 2-layer decoder whose layer 1 is
MoE). Its decoder matrices are drawn at std 0.1, not the preset's 0.02: at 0.02 greedy decoding
collapses onto one repeated token, and token-for-token equality would test little (0.1 gives
30-50 distinct tokens in 64). The memory model has ``segment_len=16``, so a prompt with both
media (two 19-position blocks and the text) spans 3 segments, one medium 2, and decoding writes
4 more.
"""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("onnxruntime")

from autoglm_phone.export import ExportedModel, NotExportable, export_model  # noqa: E402
from autoglm_phone.export.manifest import read_manifest  # noqa: E402
from autoglm_phone.models.generation import sample_next_token  # noqa: E402

NEW_TOKENS = 64
SHAPES = dict(max_text_len=12, audio_seconds=0.25, prompt_len=64, cache_len=128)
MEDIA = ("image", "audio", "generate")


def _model(tokenizer, memory: bool):
    from autoglm_phone import AutoGLMModel

    text = {"num_layers": 2, "moe": {"layers": [1]}, "memory": {"enabled": memory}}
    if memory:
        text["memory"].update(segment_len=16, num_slots=4)
    torch.manual_seed(0)
    model = AutoGLMModel.from_pretrained(
        "autoglm-phone-tiny",
        {"vision": {"depth": 1}, "audio": {"depth": 1}, "text": text},
        tokenizer=tokenizer,
    ).eval()
    with torch.no_grad():
        for name, p in model.text.named_parameters():
            if p.dim() >= 2 and "memory_init" not in name:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def memory_model(tokenizer):
    return _model(tokenizer, memory=True)


@pytest.fixture(scope="module")
def dense_model(tokenizer):
    return _model(tokenizer, memory=False)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """20 multimodal prompts: image + audio + text, image + text, audio + text and text alone,
    five of each, over different media and questions."""
    g = torch.Generator().manual_seed(1)
    images, wave = torch.rand(10, 3, 64, 64, generator=g), 0.2 * torch.randn(10, 4000, generator=g)
    questions = [
        "describe the picture",
        "what is it",
        "a dog barks twice on the left",
        "how many beeps do you hear",
        "what colour is the shape",
    ]
    enc = [tokenizer([q], return_tensors="pt") for q in questions]
    text = [dict(input_ids=e["input_ids"], attention_mask=e["attention_mask"]) for e in enc]
    out = []
    for i in range(5):
        out.append(dict(images=images[i : i + 1], audio=wave[i : i + 1], **text[i]))
        out.append(dict(images=images[5 + i : 6 + i], **text[(i + 1) % 5]))
        out.append(dict(audio=wave[5 + i : 6 + i], **text[(i + 2) % 5]))
        out.append(dict(**text[(i + 3) % 5]))
    return out


def _export(model, tokenizer, tmp_path_factory, fmt="executorch", precision="fp32"):
    folder = tmp_path_factory.mktemp(f"gen_{fmt}_{precision}")
    export_model(
        model, folder, format=fmt, precision=precision, tokenizer=tokenizer, methods=MEDIA, **SHAPES
    )
    return folder


@pytest.fixture(scope="module")
def memory_pte(memory_model, tokenizer, tmp_path_factory):
    return ExportedModel.load(_export(memory_model, tokenizer, tmp_path_factory), num_threads=1)


def _with_logits(model, exported, prompt, **kwargs):
    """Eager and exported ``generate`` on ``prompt``, each with the logits ``(N, V)`` it chose
    every token from (recorded at ``sample_next_token``, which both call)."""
    from autoglm_phone.export import runtime
    from autoglm_phone.models import glm

    def recording(into):
        def sample(logits, **kw):
            into.append(logits)
            return sample_next_token(logits, **kw)

        return sample

    eager_logits, exported_logits = [], []
    with (
        patch.object(glm, "sample_next_token", recording(eager_logits)),
        patch.object(runtime, "sample_next_token", recording(exported_logits)),
    ):
        ref = model.generate(**prompt, **kwargs)
        got = exported.generate(**prompt, **kwargs)
    return ref, got, torch.cat(eager_logits), torch.cat(exported_logits)


def _check_parity(model, exported, prompts):
    for i, prompt in enumerate(prompts):
        ref, got, ref_logits, got_logits = _with_logits(
            model, exported, prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=()
        )
        assert got.shape == ref.shape == (1, NEW_TOKENS), i
        assert torch.equal(got, ref), (i, ref, got)
        assert len(set(ref[0].tolist())) > 8, "degenerate decoding tests little"
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=2e-4)


def test_memory_moe_pte_generates_as_eager(memory_model, memory_pte, prompts):
    """FP32 .pte, memory decoder (prompts of up to 3 segments, decoding writes 4 more) with an
    MoE layer: 64 greedy tokens equal to eager on 20 prompts, logits within 2e-4 + 1e-4 relative
    (measured 1.2e-4 at most: XNNPACK sums in another order)."""
    _check_parity(memory_model, memory_pte, prompts)


@pytest.fixture(scope="module")
def dense_onnx(dense_model, tokenizer, tmp_path_factory):
    folder = _export(dense_model, tokenizer, tmp_path_factory, fmt="onnx")
    return ExportedModel.load(folder, num_threads=1)


def test_dense_moe_onnx_generates_as_eager(dense_model, dense_onnx, prompts):
    """Without memory (one prefill, a static KV cache of 128 slots), ONNX FP32; the first 8
    prompts (two of each kind)."""
    _check_parity(dense_model, dense_onnx, prompts[:8])


@pytest.mark.slow
def test_dense_moe_pte_generates_as_eager(dense_model, tokenizer, tmp_path_factory, prompts):
    folder = _export(dense_model, tokenizer, tmp_path_factory)
    _check_parity(dense_model, ExportedModel.load(folder, num_threads=1), prompts)


def test_generation_stops_and_samples_as_eager(memory_model, memory_pte, prompts):
    """A stop token ends a row (and pads it in a batch), and seeded sampling of one row draws
    the same tokens as eager."""
    prompt = prompts[0]
    first = memory_model.generate(**prompt, max_new_tokens=8, stop_token_ids=())[0]
    stop = int(first[5])  # a token met on the way
    ref = memory_model.generate(**prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=(stop,))
    got = memory_pte.generate(**prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=(stop,))
    assert torch.equal(got, ref) and got.shape[1] <= 6
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    ref = memory_model.generate(**prompt, **kwargs, generator=torch.Generator().manual_seed(3))
    got = memory_pte.generate(**prompt, **kwargs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)


def test_generation_batches_row_by_row(memory_model, memory_pte, prompts):
    """A batch of two: each row as eager generates it alone; the shorter one padded."""
    a, b = prompts[0], prompts[4]  # both image + audio + text
    batch = {k: torch.cat([a[k], b[k]]) for k in ("images", "audio")}
    ids = [a["input_ids"][0], b["input_ids"][0]]
    width = max(len(i) for i in ids)
    pad = memory_model.cfg.text.pad_token_id
    batch["input_ids"] = torch.stack(
        [torch.cat([torch.full((width - len(i),), pad), i]) for i in ids]
    )
    batch["attention_mask"] = batch["input_ids"] != pad
    stop = int(memory_model.generate(**a, max_new_tokens=4, stop_token_ids=())[0, 3])
    got = memory_pte.generate(**batch, max_new_tokens=16, stop_token_ids=(stop,))
    for row, prompt in zip(got, (a, b), strict=True):
        ref = memory_model.generate(**prompt, max_new_tokens=16, stop_token_ids=(stop,))[0]
        assert torch.equal(row[: len(ref)], ref)
        assert (row[len(ref) :] == pad).all()


def test_manifest_records_the_generation_methods(memory_pte):
    manifest = memory_pte.manifest
    assert manifest["shapes"]["prompt_len"] == manifest["shapes"]["cache_len"] == 16
    prefill = manifest["methods"]["prefill"]
    assert [(s["name"], s["shape"], s["dtype"]) for s in prefill["inputs"]] == [
        ("inputs_embeds", [1, 16, 256], "float32"),
        ("length", [1], "int64"),
        ("filled", [1], "bool"),
        ("memory", [2, 1, 4, 256], "float32"),
    ]
    assert [s["name"] for s in manifest["methods"]["decode"]["outputs"]] == [
        "logits",
        "k_cache_out",
        "v_cache_out",
    ]
    assert {"embed.pte", "prefill.pte", "decode.pte", "memory_write.pte"} <= set(manifest["files"])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, p: m.generate(), ValueError, "needs images, audio or input_ids"),
        (lambda m, p: m.generate(**p, max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (lambda m, p: m.generate(**p, top_p=0.0), ValueError, "top_p"),
        (lambda m, p: m.generate(images=torch.rand(2, 3, 64, 64), input_ids=p["input_ids"]), ValueError, "different batch sizes"),
        (lambda m, p: m.generate(images=torch.rand(1, 3, 32, 32)), ValueError, r"\(batch, 3, 64, 64\)"),
        (lambda m, p: m.generate(input_ids=torch.full((1, 3), 10**6)), ValueError, r"token ids in \[0,"),
        (lambda m, p: m.generate(input_ids=p["input_ids"].float()), TypeError, "input_ids must be an integer"),
    ],
)  # fmt: skip
def test_generate_input_errors_name_the_culprit(memory_pte, prompts, call, error, match):
    with pytest.raises(error, match=match):
        call(memory_pte, prompts[0])


def test_dense_limits_are_refused(dense_model, tokenizer, tmp_path):
    """Export refuses shapes a dense cache cannot hold; a memory-less model has no
    memory_write; the runtime refuses prompts and budgets past the exported shapes (checked
    before any method runs: no artifacts needed)."""
    with pytest.raises(NotExportable, match="prompt_len=64 and cache_len=32"):
        export_model(dense_model, tmp_path / "a", methods=("prefill",), prompt_len=64, cache_len=32)
    with pytest.raises(NotExportable, match="memory_write: this decoder has no memory"):
        export_model(dense_model, tmp_path / "b", methods=("memory_write",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_memory_refusals_name_the_setting(memory_model, tokenizer, tmp_path):
    with pytest.raises(NotExportable, match="decode needs memory_write"):
        export_model(memory_model, tmp_path / "a", methods=("prefill", "decode"))
    from dataclasses import replace

    from autoglm_phone import AutoGLMModel

    cfg = memory_model.cfg
    ablation = replace(cfg, text=replace(cfg.text, memory=replace(cfg.text.memory, carry=False)))
    with pytest.raises(NotExportable, match="carry=false"):
        export_model(AutoGLMModel(ablation), tmp_path / "b", methods=("generate",))


def test_runtime_refuses_prompts_past_the_export(dense_onnx):
    """A dense export's prompt (64 positions) and cache (128 slots) limits, and a method the
    folder lacks, named before anything runs."""
    ids = torch.arange(3, 68)[None]  # 65 tokens
    with pytest.raises(ValueError, match="export prompt_len"):
        dense_onnx.generate(input_ids=ids)
    with pytest.raises(ValueError, match="export cache_len"):
        dense_onnx.generate(input_ids=ids[:, :10], max_new_tokens=120)
    assert dense_onnx.generate(input_ids=ids[:, :10], max_new_tokens=119).shape[1] <= 119
    runners = dict(dense_onnx.runners)
    try:
        del dense_onnx.runners["image"]
        with pytest.raises(ValueError, match="method 'image' was not exported"):
            dense_onnx.generate(images=torch.rand(1, 3, 64, 64))
        del dense_onnx.runners["decode"]
        with pytest.raises(ValueError, match=r"generation needs the methods \['decode'\]"):
            dense_onnx.generate(input_ids=ids[:, :3])
    finally:
        dense_onnx.runners.update(runners)


@pytest.mark.slow  # ~6 min here: the whole tiny model exported, then both evaluated
def test_eval_runs_an_exported_folder_beside_its_checkpoint(base_ckpt, cache_dir, tmp_path, capsys):
    """``python eval.py exported=<folder>``: the export's manifest names its checkpoint, which is
    evaluated too; retrieval, perplexity and captioning printed side by side (ONNX FP32: the
    cheapest export of the whole model; the path is the same for .pte)."""
    import json

    from conftest import SMALL_DATA, compose_config

    from autoglm_phone.app import evaluate
    from autoglm_phone.app.export import run as export_run

    folder = tmp_path / "exported"
    export_run(
        compose_config("export", [f"ckpt_path={base_ckpt}", "format=onnx", f"out_dir={folder}"])
    )
    assert read_manifest(folder)["source"] == str(Path(base_ckpt).resolve())
    out = tmp_path / "metrics.json"
    cfg = compose_config(
        "eval",
        [
            f"exported={folder}",
            f"output_json={out}",
            "tasks=[perplexity,captioning,itm]",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    result = evaluate.run(cfg)
    printed = capsys.readouterr().out
    assert "beside exported" in printed and "not exported, skipped" in printed
    assert json.loads(out.read_text())["exported"]["folder"] == str(folder)
    eager, exported = result["retrieval"], result["exported"]["retrieval"]
    assert (
        set(exported) == set(eager) == {"image->text", "text->image", "audio->text", "text->audio"}
    )
    for name, metrics in eager.items():  # FP32 embeddings within ~1e-6: the same rankings
        assert abs(exported[name]["R@1"] - metrics["R@1"]) < 1e-6, name
    fused = result["exported"]["fused"]
    assert set(fused) == {
        f"{m} {t}" for m in ("image", "audio") for t in ("perplexity", "captioning")
    }
    for m in ("image", "audio"):
        ref = result["fused"][f"{m} perplexity"]["perplexity"]
        assert abs(fused[f"{m} perplexity"]["perplexity"] / ref - 1) < 0.05, (m, ref)
        assert (
            fused[f"{m} captioning"]["num_items"] == result["fused"][f"{m} captioning"]["num_items"]
        )

    # without its checkpoint the folder is evaluated alone, on the eval config's data
    # (retrieval only here: cheap)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(
        json.dumps({**manifest, "source": str(tmp_path / "gone")})
    )
    cfg = compose_config(
        "eval",
        [
            f"exported={folder}",
            f"output_json={tmp_path / 'alone.json'}",
            "tasks=[]",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
            *SMALL_DATA,
        ],
    )
    alone = evaluate.run(cfg)
    assert "the exported folder alone" in capsys.readouterr().out
    assert alone["retrieval"] == alone["exported"]["retrieval"]
    assert set(alone["retrieval"]) == set(eager) and alone["ckpt_path"] is None


@pytest.mark.slow
@pytest.mark.parametrize("precision,min_cos", [("fp16", 0.999), ("int4", 0.99)])
def test_low_precision_generation_stays_close(
    memory_model, tokenizer, tmp_path_factory, prompts, precision, min_cos
):
    """FP16 / INT4 .pte of the memory model: the logits of the first 8 greedy steps (fed the
    reference's tokens, so a flipped token does not compound) keep their cosine to the
    reference: eager FP32 for FP16; for INT4 the eager model with the same torchao weights
    (INT4 itself moves this random model's logits far: cosine 0.45-0.78 to FP32, eager alike, so
    the export is checked against what it quantised)."""
    from autoglm_phone.export.precision import get_precision, prepared

    reference = memory_model
    if precision == "int4":
        reference = prepared(memory_model, get_precision("int4"), 32)
    folder = _export(memory_model, tokenizer, tmp_path_factory, precision=precision)
    exported = ExportedModel.load(folder, num_threads=1)
    for prompt in (prompts[0], prompts[4]):  # image + audio + text
        ref, _, ref_logits, _ = _with_logits(
            reference, exported, prompt, max_new_tokens=8, stop_token_ids=()
        )
        (row,) = exported.build_prompts(**prompt)
        got = exported.continuation_logits(row, ref[0].tolist())
        cos = torch.nn.functional.cosine_similarity(got, ref_logits)
        assert cos.min() > min_cos, (precision, cos)
