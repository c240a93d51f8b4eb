"""bench/export.py's generation rows: time to first token and decode tokens/s for eager and
transformers' ``Glm4ForCausalLM`` on the same dense weights (in this process, no export), the
roofline arithmetic and table; the exported rows end to end are ``slow`` (a lowering)."""

from __future__ import annotations

import pytest
import torch

from bench import export as bench


@pytest.fixture(scope="module")
def dense(tokenizer, tmp_path_factory):
    """The bench's dense-decoder model at the quick depth, saved, and its ``save_glm4`` folder."""
    from autoglm_phone.models.convert import save_glm4

    work = tmp_path_factory.mktemp("decode_bench")
    model = bench.dense_model(True, tokenizer)
    return (
        model,
        model.save_pretrained(work / "dense", tokenizer=tokenizer),
        save_glm4(model.text, work / "glm4"),
    )


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_dense_model_is_what_glm4_runs(dense):
    model, _, _ = dense
    cfg = model.cfg.text
    assert cfg.moe.num_experts == 0 and not cfg.memory.enabled
    assert cfg.num_layers == bench.SHALLOW["text"]["num_layers"]


def test_decode_child_times_eager_and_transformers(dense, one_thread):
    model, model_dir, glm4_dir = dense
    timed = bench.decode_child(model_dir, glm4_dir, [], rounds=1, audio_samples=4000)
    prompt = bench.multimodal_prompt(model.cfg.vision.img_size, 4000)
    with torch.no_grad():
        blocks = [  # each block: <begin> media tokens <end>
            model.embed_media(m, prompt[key]).shape[1] + 2
            for m, key in (("image", "images"), ("audio", "audio"))
        ]
    assert timed["prompt_positions"] == sum(blocks) + bench.QUESTION_TOKENS
    assert set(timed["rows"]) == {"eager", "transformers"}
    for row in timed["rows"].values():
        assert 0 < row["ttft_ms"] < 60_000 and 0 < row["ms_per_token"] < 10_000
    assert timed["rows"]["eager"]["same_tokens_as_eager"]


def test_decode_row_roofline_and_table():
    eager = {"ttft_ms": 30.0, "ms_per_token": 4.0, "same_tokens_as_eager": True}
    fast = {"ttft_ms": 10.0, "ms_per_token": 2.0, "same_tokens_as_eager": True}
    bandwidth = 10e9  # bytes/s: 10 MB take 1 ms
    rows = {
        "eager": bench.decode_row(eager, 40_000_000, bandwidth, eager),
        "executorch_int4": bench.decode_row(fast, 5_000_000, bandwidth, eager),
    }
    assert rows["eager"]["roofline_ms"] == pytest.approx(4.0)
    assert rows["eager"]["roofline_fraction"] == pytest.approx(1.0)
    int4 = rows["executorch_int4"]
    assert int4["tokens_per_s"] == pytest.approx(500.0)
    assert int4["decode_vs_eager"] == pytest.approx(2.0)
    assert int4["ttft_vs_eager"] == pytest.approx(3.0)
    assert int4["roofline_fraction"] == pytest.approx(0.25)  # 0.5 ms floor / 2 ms
    decode = {
        "decoder": {"layers": 2, "hidden": 256, "vocab": 320, "parameters": 1_000_000},
        "prompt_positions": 54,
        "question_tokens": 16,
        "new_tokens": 64,
        "state_bytes": {"executorch_int4": 2**20},
        "profiles": {
            "executorch_int4": {
                "execute_ms": 2.0,
                "delegate_ms": 1.5,
                "portable_ms": 0.5,
                "top_ms": {"index_put.out": 0.25},
            }
        },
        "rows": rows,
    }
    text = bench.table({"decode": decode}, bandwidth)
    assert "| executorch_int4 | 10.0 | 3.00 | 500 | 2.00 | 2.00 |" in text
    assert "| 25.0 | True |" in text and "executorch_int4 1.00 MiB" in text
    assert "execute 2.000 = XNNPACK 1.500 + portable ops 0.500; top: index_put.out 0.250" in text


def test_state_bytes_counts_the_caches_and_slots_only():
    inputs = [
        {"name": "input_ids", "shape": [1, 1], "dtype": "int64"},
        {"name": "position", "shape": [1], "dtype": "int64"},
        {"name": "k_cache", "shape": [2, 1, 2, 128, 64], "dtype": "float16"},
        {"name": "v_cache", "shape": [2, 1, 2, 128, 64], "dtype": "float16"},
    ]
    assert bench.state_bytes(inputs) == 2 * (2 * 2 * 128 * 64) * 2


@pytest.mark.slow
def test_exported_fp32_decodes_eagers_tokens(tokenizer, tmp_path, monkeypatch):
    """The whole decode part at FP32 only: export, the timing child, the rows (~2 min here)."""
    pytest.importorskip("executorch")
    monkeypatch.setattr(bench, "DECODE_PRECISIONS", ("fp32",))
    got = bench.decode_bench(True, tokenizer, tmp_path, bench.memory_bandwidth(1 << 24))
    assert set(got["rows"]) == {"eager", "transformers", "executorch_fp32"}
    row = got["rows"]["executorch_fp32"]
    assert row["same_tokens_as_eager"]
    assert 0 < row["roofline_fraction"] < 1.5 and row["weight_bytes"] > 0
    assert got["state_bytes"]["executorch_fp32"] > 0
