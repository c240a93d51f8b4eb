"""The server on an exported folder (autoglm_phone/serve/exported.py, docs/SERVE.md), against the
eager server on the same weights, both driven by the real ``openai`` client.

One FP32 export of a small random model per format: ONNX in the default suite, ExecuTorch under
``slow`` (61 s against 552 s to export this model on the shared 2-core CPU; the serving code is
the same for both, ``ExportedModel`` runs either). The model: test_serve's tiny model (a memory
decoder, as the preset) with ``segment_len=32``, so a prompt with an image spans two segments
and decoding writes more; decoder matrices at std 0.1 as in test_export_generation, so
greedy answers are not one repeated token. Its MoE layer has ``capacity_factor = num_experts /
top_k``: an expert then holds every token of a call, so the exported (capacity-bound) layer
computes what the eager server's dropless one does.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest
import torch
from conftest import SHALLOW, compose_config
from test_serve import MODEL, audio_part, clip, image_part, png

from autoglm_phone.data.instructions import format_chat
from autoglm_phone.serve import Engine, Prompt, ServeSettings, create_app, load_backend
from autoglm_phone.serve.background import BackgroundServer as Server

openai = pytest.importorskip("openai")
pytest.importorskip("executorch")
pytest.importorskip("onnxruntime")

SHAPES = dict(max_text_len=16, audio_seconds=0.5)
SEGMENT = 32


@pytest.fixture(scope="module", params=["onnx", pytest.param("executorch", marks=pytest.mark.slow)])
def folders(request, tokenizer, tmp_path_factory):
    """The saved model folder and its exported folder (in the format ``request.param``)."""
    from autoglm_phone import AutoGLMModel
    from autoglm_phone.export import export_model

    text = {
        **SHALLOW["text"],
        "moe": {"layers": [1], "capacity_factor": 2.0},  # 4 experts, top 2
        "memory": {"enabled": True, "segment_len": SEGMENT, "num_slots": 4},
    }
    torch.manual_seed(0)
    model = AutoGLMModel.from_pretrained(
        "autoglm-phone-tiny", {**SHALLOW, "text": text}, tokenizer=tokenizer
    ).eval()
    with torch.no_grad():
        for name, p in model.text.named_parameters():
            if p.dim() >= 2 and "memory_init" not in name:
                p.normal_(0.0, 0.1)
    root = tmp_path_factory.mktemp(f"served_{request.param}")
    saved = model.save_pretrained(root / "model", tokenizer=tokenizer)
    out = root / "exported"
    export_model(model, out, format=request.param, tokenizer=tokenizer, source=saved, **SHAPES)
    return saved, out


def _server(backend, max_batch_size=8):
    engine = Engine(backend, max_batch_size=max_batch_size, batch_wait_s=0.05)
    server = Server(create_app(engine, ServeSettings(model_name=MODEL)))
    server.engine = engine
    return server


@pytest.fixture(scope="module")
def servers(folders):
    """(eager, exported) servers, each with its ``engine``."""
    saved, exported = folders
    seconds = SHAPES["audio_seconds"]
    eager = _server(load_backend(saved, max_text_len=SHAPES["max_text_len"], audio_seconds=seconds))
    served = _server(load_backend(exported))
    yield eager, served
    for s in (eager, served):
        s.stop()
        s.engine.close()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat(server, content, **kw):
    return _client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def test_the_entry_picks_the_exported_backend_and_its_limits(folders):
    """serve.py's build on an exported folder: the exported backend, one request at a time, the
    context from the manifest; what cannot hold is refused at start-up by name."""
    from autoglm_phone.app.serve import build
    from autoglm_phone.serve.exported import ExportedBackend

    _, exported = folders
    _, engine = build(compose_config("serve", [f"ckpt_path={exported}", "max_batch_size=4"]))
    backend = engine.backend
    assert isinstance(backend, ExportedBackend) and engine.max_batch_size == 1
    # a memory decoder: the prompt goes segment by segment; the context defaults to max_seq_len
    window = backend.model.config.text.max_seq_len
    assert backend.context_window == window and backend.max_prompt_length == window - 1
    _, engine = build(compose_config("serve", [f"ckpt_path={exported}", "context_window=100"]))
    assert (engine.backend.context_window, engine.backend.max_prompt_length) == (100, 99)
    assert backend.spec.num_samples == 8000 and backend.max_text_len == 16
    for override, match in [
        ("device=cuda", "runs on the CPU"),
        ("max_text_len=32", "exported with 16"),
        ("audio_seconds=1.0", "exported with 0.5 s"),
    ]:
        with pytest.raises(SystemExit, match=match):
            build(compose_config("serve", [f"ckpt_path={exported}", override]))


def test_a_changed_or_incomplete_folder_is_refused_at_start(folders, tmp_path):
    from autoglm_phone.app.serve import build
    from autoglm_phone.export import ExportedModel
    from autoglm_phone.serve.exported import ExportedBackend

    _, exported = folders
    changed = shutil.copytree(exported, tmp_path / "changed")
    decode = ExportedModel.load(exported).manifest["methods"]["decode"]["file"]
    with (changed / decode).open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(SystemExit, match=rf"{decode}: does not match manifest\.json"):
        build(compose_config("serve", [f"ckpt_path={changed}"]))
    model = ExportedModel.load(exported)
    del model.runners["decode"]
    with pytest.raises(ValueError, match=r"needs the methods \['decode'\]"):
        ExportedBackend(model)


def test_chat_with_image_and_audio_is_the_eager_answer(servers):
    """Greedy: the same text, finish reason and token counts as the eager server; sampled with
    a seed: the same draw (the engine's sampler on logits equal to ~1e-5)."""
    eager, served = servers
    contents = [
        [image_part(png(seed=0)), {"type": "text", "text": "Describe the image."}],
        [image_part(png(seed=1)), audio_part(clip()), {"type": "text", "text": "A sound?"}],
        "a red circle on the left",
    ]
    for content in contents:
        ref = _chat(eager, content, max_tokens=24, temperature=0)
        got = _chat(served, content, max_tokens=24, temperature=0)
        assert got.choices[0].message.content == ref.choices[0].message.content
        assert got.choices[0].finish_reason == ref.choices[0].finish_reason
        assert got.usage == ref.usage
    assert len(set(ref.choices[0].message.content.split())) > 3, "degenerate decoding tests little"
    kw = dict(max_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    assert (
        _chat(served, contents[0], **kw).choices[0].message.content
        == _chat(eager, contents[0], **kw).choices[0].message.content
    )


def test_streaming_and_concurrent_requests_one_at_a_time(servers):
    """Streamed deltas add up to the non-streamed answer; concurrent streams are each answered
    as alone, decoded one by one (the exported decoder takes batch 1)."""
    _, served = servers
    content = [image_part(png(seed=2)), {"type": "text", "text": "What colour?"}]
    plain = _chat(served, content, max_tokens=12, temperature=0)
    stream = _client(served).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        plain.choices[0].message.content
    )
    assert chunks[-1].usage == plain.usage
    questions = [f"what is {'red ' * i}?" for i in range(3)]
    alone = [
        _chat(served, q, max_tokens=8, temperature=0).choices[0].message.content for q in questions
    ]

    async def one(aclient, q):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(aclient, q) for q in questions))

    assert asyncio.run(main()) == alone
    assert served.engine.stats["max_batch"] == 1


def test_without_memory_the_cache_and_prompt_length_bound_requests(folders):
    """A decoder without memory (one prefill, a static cache): prompt + generated tokens within
    cache_len + 1, the prompt within prompt_len; longer requests get a 400 naming the limit.
    (The folder's manifest read as a dense export's; no token is generated.)"""
    import copy

    from autoglm_phone.export import ExportedModel
    from autoglm_phone.serve.exported import ExportedBackend

    model = copy.copy(ExportedModel.load(folders[1]))
    model.config = copy.deepcopy(model.config)
    model.config.text.memory.enabled = False
    model.shapes = {**model.shapes, "prompt_len": 24, "cache_len": 40}
    backend = ExportedBackend(model)
    assert (backend.context_window, backend.max_prompt_length) == (41, 24)
    with pytest.raises(ValueError, match="at most 41 tokens"):
        ExportedBackend(model, context_window=42)
    server = _server(backend)
    try:
        prompt = "a red circle on the left " * 4
        n = backend.prompt_length(
            Prompt(backend.tokenizer(format_chat(prompt, media=()))["input_ids"])
        )
        assert 24 < n < 41
        with pytest.raises(openai.BadRequestError, match="prompts of at most 24"):
            _chat(server, prompt, max_tokens=1)
        with pytest.raises(openai.BadRequestError, match=r"context window \(41\)"):
            _chat(server, "hi", max_tokens=40)
    finally:
        server.stop()
        server.engine.close()


def test_embeddings_equal_the_eager_ones(servers):
    eager, served = servers
    texts = ["a red circle on the left", "a dog barks twice"]
    media = [image_part(png(seed=4)), audio_part(clip(seconds=0.5, seed=2))]
    vectors = []
    for server in servers:
        body = {"model": MODEL, "input": [*texts, *media]}
        r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60).json()
        assert [d["index"] for d in r["data"]] == [0, 1, 2, 3]
        vectors.append(np.array([d["embedding"] for d in r["data"]]))
        usage = r["usage"]
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-4)
    assert usage["prompt_tokens"] > 0
    z = _client(served).embeddings.create(model=MODEL, input=texts[0]).data[0].embedding
    np.testing.assert_allclose(z, vectors[0][0], atol=1e-4)
