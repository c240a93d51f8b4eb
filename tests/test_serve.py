"""The OpenAI-compatible server (autoglm_phone.serve, docs/SERVE.md), started in-process with
uvicorn on a free port and driven by the real clients: ``openai`` (sync, async, streaming),
langchain-openai's ``ChatOpenAI``, and raw ``httpx`` where the wire format itself is checked."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from autoglm_phone.data.decode import decode_audio, decode_image
from autoglm_phone.data.instructions import format_chat, format_conversation, split_reasoning
from autoglm_phone.serve import EagerBackend, Engine, MediaLimits, ServeSettings, create_app
from autoglm_phone.serve.background import BackgroundServer as Server
from autoglm_phone.serve.text import TextStream

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-test"
LIMITS = MediaLimits(max_image_pixels=128 * 128, max_audio_seconds=2.0, max_media=3)


# -- servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend(tiny, tokenizer):
    return EagerBackend(tiny, tokenizer, context_window=256)


@pytest.fixture(scope="module")
def long_backend(tiny, tokenizer):
    """The same model never stopping on end-of-text: every request runs to its max_tokens."""
    return EagerBackend(tiny, tokenizer, stop_token_ids=())


def _serve(engine, **settings):
    defaults = dict(model_name=MODEL, limits=LIMITS, max_body_bytes=2**20)
    server = Server(create_app(engine, ServeSettings(**{**defaults, **settings})))
    return server


@pytest.fixture(scope="module")
def server(backend):
    engine = Engine(backend, max_batch_size=8, batch_wait_s=0.05, max_queue=16)
    s = _serve(engine)
    s.engine = engine
    yield s
    s.stop()
    engine.close()


@pytest.fixture(scope="module")
def long_server(long_backend):
    engine = Engine(long_backend, max_batch_size=4, batch_wait_s=0.01, max_queue=2)
    s = _serve(engine)
    s.engine = engine
    yield s
    s.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# -- media ---------------------------------------------------------------------------------------
def png(size=(64, 64), seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def clip(seconds=1.0, fmt="WAV", rate=16000, seed=0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (440 + 100 * seed) * t).astype("float32")
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


def image_part(data: bytes, mime="image/png") -> dict:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: bytes, fmt="wav") -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt},
    }


def chat_body(content, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def direct_answer(model, tokenizer, question, image=None, audio=None, max_tokens=8) -> str:
    """The model's own greedy answer (``AutoGLMModel.generate``), for parity."""
    ids = torch.tensor(
        [
            tokenizer(
                format_chat(
                    question,
                    media=[m for m, x in (("image", image), ("audio", audio)) if x is not None],
                )
            )["input_ids"]
        ]
    )
    images = None if image is None else decode_image(image, 64)[None]
    wave = None if audio is None else decode_audio(audio, 16000, 16000)[None]
    out = model.generate(images=images, audio=wave, input_ids=ids, max_new_tokens=max_tokens)[0]
    eos = model.cfg.special_tokens.eos
    row = out.tolist()
    row = row[: row.index(eos)] if eos in row else row
    return tokenizer.decode(row, skip_special_tokens=True)


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of an event stream, JSON-decoded (``[DONE]`` kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- the library -----------------------------------------------------------------------------------
def test_conversation_format_and_reasoning_split():
    assert format_conversation([("user", "Hi?", ("image",))]) == format_chat("Hi?")
    text = format_conversation(
        [
            ("system", "Be brief.", ()),
            ("user", "Q1", ()),
            ("assistant", "A1", ()),
            ("user", "Q2", ("audio",)),
        ],
        thinking=True,
    )
    assert (
        text
        == "<|system|>\nBe brief.<|user|>\nQ1<|assistant|>\nA1<|user|>\n<|audio|>Q2<|assistant|>\n<think>"
    )
    assert split_reasoning("I see red.</think>\nred", thinking=True) == ("I see red.", "red")
    assert split_reasoning("<think>hm</think>red", thinking=False) == ("hm", "red")
    assert split_reasoning("cut short", thinking=True) == ("cut short", "")
    assert split_reasoning("red", thinking=False) == ("", "red")
    assert split_reasoning("abc</th", thinking=True, final=False) == ("abc", "")  # held back
    with pytest.raises(ValueError, match="media belong to user turns"):
        format_conversation([("assistant", "x", ("image",))])


@pytest.mark.parametrize("thinking", [True, False])
def test_text_stream_deltas_add_up_to_the_final_split(tokenizer, thinking):
    """Token by token, with a stop string and a </think> split across tokens."""
    text = ("<think>" if not thinking else "") + "a red circle</think>\na dog barks STOP twice"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["STOP"], thinking=thinking)
    reasoning, content = "", ""
    for token in ids:
        r, c = stream.push(token)
        reasoning, content = reasoning + r, content + c
        if stream.stopped:
            break
    r, c = stream.finish()
    assert (reasoning + r, content + c) == ("a red circle", "a dog barks ")
    assert stream.stopped


# -- endpoints with the real clients ---------------------------------------------------------------
def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_with_image_and_audio_equals_the_models_own_answer(client, tiny, tokenizer):
    image, audio = png(), clip()
    content = [image_part(image), audio_part(audio), {"type": "text", "text": "What is the sound?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
    )
    expected = direct_answer(tiny, tokenizer, "What is the sound?", image, audio)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.model == MODEL and out.id.startswith("chatcmpl-")
    # prompt: 1 image block + 1 audio block + the chat text
    n_text = len(
        tokenizer(format_chat("What is the sound?", media=("image", "audio")))["input_ids"]
    )
    assert out.usage.prompt_tokens > n_text
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stream_wire_format_and_usage(server):
    body = chat_body(
        [image_part(png(seed=1)), {"type": "text", "text": "Describe the image."}],
        max_tokens=6,
        temperature=0,
    )
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    for include_usage in (True, False):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={**body, "stream": True, **extra},
            timeout=60,
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        usage = [c for c in chunks if "usage" in c]
        finishing = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
        assert len(finishing) == 1
        assert finishing[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        if include_usage:
            assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
            assert usage[0]["usage"] == plain["usage"]
        else:
            assert usage == [] and all(c["choices"] for c in chunks)
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text == plain["choices"][0]["message"]["content"]


def test_openai_streaming_equals_non_streamed(client):
    messages = [
        {
            "role": "user",
            "content": [
                image_part(png(seed=2)),
                {"type": "text", "text": "What colour are the shapes?"},
            ],
        }
    ]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_eight_concurrent_streams_equal_their_sequential_answers(server, client):
    """Async client; the engine batches them (max batch seen > 1) and each row still gets
    exactly its own greedy answer."""
    questions = [f"Q{i}: what is {'red ' * i}?" for i in range(8)]
    contents = [
        [image_part(png(seed=i))] * (i % 2) + [{"type": "text", "text": q}]
        for i, q in enumerate(questions)
    ]
    sequential = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": c}], max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
        for c in contents
    ]
    before = server.engine.stats["max_batch"]
    server.engine.stats["max_batch"] = 0

    async def one(aclient, content):
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(aclient, c) for c in contents))

    assert asyncio.run(main()) == sequential
    assert server.engine.stats["max_batch"] > 1
    server.engine.stats["max_batch"] = max(before, server.engine.stats["max_batch"])


def test_langchain_chat_openai_with_image_and_audio(server, client):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    content = [
        image_part(png(seed=3)),
        audio_part(clip(seed=1)),
        {"type": "text", "text": "How many beeps?"},
    ]
    llm = ChatOpenAI(
        model=MODEL,
        base_url=server.url + "/v1",
        api_key="x",
        temperature=0,
        max_tokens=8,
        max_retries=0,
    )
    expected = (
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
        )
        .choices[0]
        .message.content
    )
    assert llm.invoke([HumanMessage(content=content)]).content == expected
    streamed = "".join(str(c.content) for c in llm.stream([HumanMessage(content=content)]))
    assert streamed == expected


def test_thinking_reasoning_apart_also_when_cut_short(long_server):
    """enable_thinking opens the answer with <think>; a model that never closes it within
    max_tokens has everything as reasoning_content (streamed and not) and an empty answer."""
    c = openai.OpenAI(base_url=long_server.url + "/v1", api_key="x", max_retries=0)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the image."}],
        max_tokens=6,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    out = c.chat.completions.create(**kw)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "length"
    assert msg.content == "" and msg.reasoning_content
    chunks = [ch for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
    reasoning = "".join(
        getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks
    )
    assert reasoning == msg.reasoning_content
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    off = c.chat.completions.create(**{**kw, "extra_body": {}})
    assert getattr(off.choices[0].message, "reasoning_content", None) is None


# -- embeddings ------------------------------------------------------------------------------------
def test_embeddings_text_image_audio(server, client, tiny, tokenizer, backend):
    texts = ["a red circle on the left", "a dog barks twice"]
    out = client.embeddings.create(model=MODEL, input=texts)
    got = torch.tensor([d.embedding for d in out.data])
    tok = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ref = tiny.encode_text(tok["input_ids"], tok["attention_mask"].bool())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the extension: image and audio parts in the same list, in the same space
    image, audio = png(seed=4), clip(seed=2)
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": MODEL, "input": [texts[0], image_part(image), audio_part(audio)]},
    ).json()
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    with torch.no_grad():
        ref_image = tiny.encode_media("image", decode_image(image, 64)[None])[0]
        ref_audio = tiny.encode_media("audio", decode_audio(audio, 16000, 16000)[None])[0]
    torch.testing.assert_close(
        torch.tensor(r["data"][1]["embedding"]), ref_image, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(r["data"][2]["embedding"]), ref_audio, atol=1e-5, rtol=1e-5
    )
    b64 = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": MODEL, "input": texts[0], "encoding_format": "base64"},
    ).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vec, got[0].numpy(), atol=1e-6)


# -- disconnects, queue, timeout -----------------------------------------------------------------
def _wait(predicate, seconds=20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_disconnect_stops_generation_and_the_next_request_is_served(long_server):
    engine = long_server.engine
    cancelled, steps = engine.stats["cancelled"], engine.stats["decode_steps"]
    body = chat_body("Describe the image.", max_tokens=4000, temperature=0, stream=True)
    with httpx.stream("POST", long_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # the role chunk and a few deltas
        assert any("content" in line for line in got)
    assert _wait(lambda: engine.stats["cancelled"] == cancelled + 1 and not engine.running)
    ran = engine.stats["decode_steps"] - steps
    assert ran < 4000  # stopped long before max_tokens
    time.sleep(0.2)
    assert engine.stats["decode_steps"] - steps == ran  # and nothing runs after
    # a non-streamed request whose client gives up is cancelled the same way
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            long_server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5
        )
    assert _wait(lambda: engine.stats["cancelled"] == cancelled + 2 and not engine.running)
    out = httpx.post(
        long_server.url + "/v1/chat/completions",
        json={**body, "stream": False, "max_tokens": 3},
        timeout=60,
    ).json()
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"


def test_full_queue_answers_503(long_server):
    """max_queue=2: one request decoding, two waiting, the fourth is refused."""
    engine = long_server.engine
    body = chat_body("Describe the image.", max_tokens=4000, temperature=0, stream=True)
    url = long_server.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        streams = []
        try:
            for _ in range(3):
                s = http.stream("POST", url, json=body)
                streams.append(s)
                r = s.__enter__()
                assert r.status_code == 200
                if not engine.running:
                    assert _wait(lambda: bool(engine.running))
            refused = httpx.post(url, json=body, timeout=60)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_overloaded"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert _wait(lambda: not engine.running and engine._jobs.empty())


def test_timeout_after_streaming_started_sends_an_error_event(long_backend):
    engine = Engine(long_backend, max_batch_size=2)
    s = _serve(engine, request_timeout_s=0.5)
    try:
        body = chat_body("Describe the image.", max_tokens=5000, stream=True)
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "timeout"
        assert "choices" in events[0]
    finally:
        s.stop()
        engine.close()


# -- errors ----------------------------------------------------------------------------------------
TEXT = {"type": "text", "text": "What shape are they?"}
ERRORS = {
    "bad base64": (
        chat_body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, TEXT]),
        400,
        "invalid_base64",
        "messages[0].content[0].image_url",
    ),
    "not an image": (
        chat_body([image_part(b"not an image at all"), TEXT]),
        400,
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    "gif": (
        chat_body([image_part(png(fmt="GIF"), "image/gif"), TEXT]),
        400,
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    "too many pixels": (
        chat_body([image_part(png(size=(200, 200))), TEXT]),
        400,
        "image_too_large",
        "messages[0].content[0].image_url",
    ),
    "http url": (
        chat_body(
            [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}, TEXT]
        ),
        400,
        "url_not_allowed",
        "messages[0].content[0].image_url",
    ),
    "not audio": (
        chat_body([audio_part(b"RIFF....garbage"), TEXT]),
        400,
        "invalid_audio",
        "messages[0].content[0].input_audio.data",
    ),
    "audio format": (
        chat_body([audio_part(clip(), "aac"), TEXT]),
        400,
        "invalid_audio_format",
        "messages[0].content[0].input_audio.format",
    ),
    "format mismatch": (
        chat_body([audio_part(clip(fmt="FLAC"), "wav"), TEXT]),
        400,
        "invalid_audio",
        "messages[0].content[0].input_audio.format",
    ),
    "audio too long": (
        chat_body([audio_part(clip(seconds=3.0)), TEXT]),
        400,
        "audio_too_long",
        "messages[0].content[0].input_audio.data",
    ),
    "too many media": (
        chat_body([image_part(png())] * 4 + [TEXT]),
        400,
        "too_many_media",
        "messages[0].content[3]",
    ),
    "prompt over context": (chat_body("red " * 400), 400, "context_length_exceeded", "messages"),
    "prompt over context, streaming": (
        chat_body("red " * 400, stream=True),
        400,
        "context_length_exceeded",
        "messages",
    ),
    "max_tokens over context": (
        chat_body("hi", max_tokens=1000),
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    "unknown model": ({**chat_body("hi"), "model": "gpt-4o"}, 404, "model_not_found", "model"),
    "n=2": (chat_body("hi", n=2), 400, "unsupported_parameter", "n"),
    "tools": (
        chat_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "unsupported_parameter",
        "tools",
    ),
    "no messages": ({"model": MODEL}, 400, "invalid_request", "messages"),
    "bad temperature": (chat_body("hi", temperature=5), 400, "invalid_request", "temperature"),
    "media in a system message": (
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": [image_part(png())]},
                {"role": "user", "content": "hi"},
            ],
        },
        400,
        None,
        "messages[0].content[0]",
    ),
}


def _no_internals(text: str) -> None:
    assert "Traceback" not in text and str(ROOT) not in text and "site-packages" not in text
    assert ".py" not in text


@pytest.mark.parametrize("name", list(ERRORS))
def test_invalid_requests_get_openai_error_bodies(server, name):
    body, status, code, param = ERRORS[name]
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    _no_internals(r.text)


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "red " * 400}], stream=True
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_bodies_over_the_limit_get_413_with_or_without_content_length(server):
    url = server.url + "/v1/chat/completions"
    big = json.dumps(chat_body("x" * (2**20 + 10))).encode()
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked():  # no Content-Length: transfer-encoding chunked
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    _no_internals(r.text)


def test_api_key(backend):
    engine = Engine(backend)
    s = _serve(engine, api_key="sk-secret")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-secret", max_retries=0)
        assert good.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).choices
    finally:
        s.stop()
        engine.close()


def test_serve_entry_config_builds_the_server_for_a_saved_folder(tiny, tokenizer, tmp_path):
    """conf/serve.yaml -> app/serve.build: a saved folder served under the configured name and
    key; a missing path and a broken exported folder are refused by name (exported folders:
    tests/test_serve_exported.py)."""
    from conftest import compose_config

    from autoglm_phone.app.serve import build

    folder = tiny.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    cfg = compose_config(
        "serve", [f"ckpt_path={folder}", "model_name=mine", "api_key=k", "max_batch_size=2"]
    )
    app, engine = build(cfg)
    assert engine.max_batch_size == 2 and engine.backend.context_window == tiny.cfg.text.max_seq_len
    s = Server(app)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["mine"]
        out = c.chat.completions.create(
            model="mine", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert out.usage.completion_tokens <= 2
    finally:
        s.stop()
        engine.close()
    with pytest.raises(SystemExit, match="nothing to serve"):
        build(compose_config("serve", [f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="exported folder"):
        build(compose_config("serve", [f"ckpt_path={tmp_path / 'exported'}"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_server_on_a_gpu_answers_as_on_the_cpu(backend, client, tiny, tokenizer):
    """The same weights on cuda: greedy chat answers and embeddings equal the CPU server's."""
    import copy

    gpu = EagerBackend(copy.deepcopy(tiny).cuda(), tokenizer, context_window=256)
    engine = Engine(gpu, max_batch_size=4)
    s = _serve(engine)
    try:
        g = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        content = [image_part(png(seed=5)), {"type": "text", "text": "Describe the image."}]
        kw = dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8)
        assert (
            g.chat.completions.create(**kw).choices[0].message.content
            == client.chat.completions.create(**kw).choices[0].message.content
        )
        on_gpu = g.embeddings.create(model=MODEL, input=["a red circle"]).data[0].embedding
        on_cpu = client.embeddings.create(model=MODEL, input=["a red circle"]).data[0].embedding
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)
    finally:
        s.stop()
        engine.close()
