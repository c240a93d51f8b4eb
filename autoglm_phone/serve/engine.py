"""The serving engine: a model behind a bounded queue, with dynamic batching of generation.

One worker thread owns the model. Requests wait in a bounded queue (full: 503); the worker takes
the first, waits up to ``batch_wait_s`` for more (up to ``max_batch_size``), and decodes them as
one left-padded batch through :meth:`Backend.start`, sampling each row its own way (greedy, or
temperature / top-p with its own seeded generator). Between decode steps it checks every row: a
client that went away (``Job.cancel``), a deadline passed, the end-of-text token, a stop string or
``max_tokens`` ends that row there, within one step; the batch ends when its last row does.
Embedding calls (:meth:`Engine.call`) run between decode steps, so they never wait for a batch
to finish. Requests arriving during a batch wait for the next one (dynamic, not continuous,
batching: a batch is not joined mid-way).

Every MoE layer is made dropless (``capacity_factor = 0``) by :class:`EagerBackend`: with a
capacity limit one request's tokens could push another's out of an expert, so an answer would
depend on what else is in its batch.

A :class:`Backend` is what the engine needs from a model; :class:`EagerBackend` wraps an
:class:`~autoglm_phone.models.autoglm.AutoGLMModel`, :class:`~autoglm_phone.serve.exported.
ExportedBackend` an exported folder (one request at a time: its artifacts take batch 1);
:func:`~autoglm_phone.serve.backends.load_backend` picks one for a path.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from autoglm_phone.models.autoglm import MODALITY_TABLE, AutoGLMModel
from autoglm_phone.models.generation import sample_next_token
from autoglm_phone.serve.errors import APIError, internal, overloaded, timed_out
from autoglm_phone.serve.media import MediaSpec
from autoglm_phone.serve.text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A tokenized chat prompt and its media, in the order their blocks go before the text."""

    ids: list[int]
    media: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # ("image"|"audio", x)


class Decoding(Protocol):
    """A batch being decoded: next-token ``logits`` ``(B, V)``, then ``advance(tokens (B,))``."""

    @property
    def logits(self) -> torch.Tensor: ...

    def advance(self, tokens: torch.Tensor) -> None: ...


class Backend(Protocol):
    """What the engine and the app need from a model runtime."""

    tokenizer: Any
    context_window: int  # prompt + generated tokens, at most
    max_prompt_length: int  # prompt positions (media blocks and text), at most
    max_batch_size: int | None  # generation requests decoded together, at most (None: any)
    spec: MediaSpec  # the media the model takes
    stop_token_ids: tuple[int, ...]
    device: torch.device

    def prompt_length(self, prompt: Prompt) -> int: ...

    def start(self, prompts: Sequence[Prompt], max_new_tokens: int) -> Decoding: ...

    def embed_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]: ...

    def embed_media(self, modality: str, media: Sequence[torch.Tensor]) -> torch.Tensor: ...


# -- the eager model ---------------------------------------------------------------------------
def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts for ``/v1/embeddings`` as token ids ``(N, T)`` and mask ``(N, T)``, padded to the
    longest and cut at ``max_len`` (the length the text encoder was trained or exported at)."""
    tok = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
    return tok["input_ids"], tok["attention_mask"].bool()


class _EagerDecoding:
    def __init__(self, model: AutoGLMModel, hidden: torch.Tensor, step: Callable) -> None:
        self.model, self.hidden, self.step = model, hidden, step

    @property
    def logits(self) -> torch.Tensor:
        return self.model.text.lm_head(self.hidden).float()  # (B, V)

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor) -> None:
        self.hidden = self.step(self.model.text.embed_tokens(tokens[:, None]))  # (B, C)


class EagerBackend:
    """An :class:`AutoGLMModel` in eval mode, on CPU or a GPU.

    ``max_text_len`` is the caption length embeddings are tokenized to (the training data's
    ``data.max_text_len``), ``audio_seconds`` the clip length audio is cropped or padded to
    (``data.audio_seconds``), ``context_window`` defaults to the decoder's ``max_seq_len``.
    """

    def __init__(
        self,
        model: AutoGLMModel,
        tokenizer: Any,
        *,
        max_text_len: int = 32,
        audio_seconds: float = 1.0,
        context_window: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        for module in model.modules():
            if hasattr(module, "capacity_factor"):  # MoE layers: see the module docstring
                module.capacity_factor = 0.0
        cfg = model.cfg
        self.device = next(model.parameters()).device
        self.max_text_len = max_text_len
        self.context_window = context_window or cfg.text.max_seq_len
        self.max_prompt_length = self.context_window - 1
        self.max_batch_size = None
        self.spec = MediaSpec(
            image_size=cfg.vision.img_size,
            sample_rate=cfg.audio.sample_rate,
            num_samples=round(cfg.audio.sample_rate * audio_seconds),
        )
        eos = cfg.special_tokens.eos
        default = () if eos is None else (eos,)
        self.stop_token_ids = tuple(default if stop_token_ids is None else stop_token_ids)
        self.embed_dim = cfg.embed_dim

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu", **kwargs: Any) -> EagerBackend:
        """A training checkpoint or saved folder (:func:`autoglm_phone.load_model`); a
        checkpoint's data settings give ``max_text_len`` and ``audio_seconds``."""
        from autoglm_phone.checkpoint import load_model

        loaded = load_model(path, device=device)
        if loaded.tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer; the server needs one")
        data = (loaded.hparams or {}).get("data") or {}
        for key in ("max_text_len", "audio_seconds"):
            if data.get(key) is not None:
                kwargs.setdefault(key, data[key])
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    def media_tokens(self, modality: str) -> int:
        """Decoder positions one item takes: the adapter's tokens and the two markers."""
        return getattr(self.model, MODALITY_TABLE[modality].adapter).num_tokens + 2

    def prompt_length(self, prompt: Prompt) -> int:
        return len(prompt.ids) + sum(self.media_tokens(kind) for kind, _ in prompt.media)

    @torch.no_grad()
    def _embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """``(P, C)``: the media blocks (images, then audio, each in request order), the text."""
        blocks = []
        for name in MODALITY_TABLE:
            items = [x for kind, x in prompt.media if kind == name]
            if items:
                media = torch.stack(items).to(self.device)  # (n, ...)
                block = self.model.media_block(name, self.model.embed_media(name, media))
                blocks += list(block.split(1))  # n x (1, K + 2, C)
        ids = torch.tensor([prompt.ids], device=self.device)  # (1, T)
        embeds, _, _ = self.model.assemble(blocks, ids)  # (1, P, C)
        return embeds[0]

    @torch.no_grad()
    def start(self, prompts: Sequence[Prompt], max_new_tokens: int) -> _EagerDecoding:
        rows = [self._embed_prompt(p) for p in prompts]  # (P_i, C) each
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])  # (B, P, C) left-padded
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0] :] = r
            mask[i, width - r.shape[0] :] = True
        hidden, step = self.model.text.begin_decode(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, mode="prefix"
        )
        return _EagerDecoding(self.model, hidden, step)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Unit vectors ``(N, E)`` in the shared space, tokenized as the training data is; and
        the number of tokens read."""
        ids, mask = tokenize_texts(self.tokenizer, texts, self.max_text_len)
        z = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return z, int(mask.sum())

    @torch.no_grad()
    def embed_media(self, modality: str, media: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model.encode_media(modality, torch.stack(list(media)).to(self.device))


# -- the engine --------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


class Job:
    """One generation request. The worker posts events to ``events`` on the request's loop:
    ``("delta", reasoning, content)``, then ``("done", finish_reason)`` or ``("error", APIError)``.
    """

    def __init__(
        self,
        prompt: Prompt,
        prompt_tokens: int,
        max_tokens: int,
        sampling: Sampling,
        text: TextStream,
        timeout_s: float,
    ) -> None:
        self.prompt, self.prompt_tokens, self.max_tokens = prompt, prompt_tokens, max_tokens
        self.sampling, self.text = sampling, text
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._generator: torch.Generator | None = None  # set by the worker for a seeded request
        self._cancelled = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        """The client is gone: the worker drops this row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is closed: the server has stopped
            pass

    def _delta(self, reasoning: str, content: str) -> None:
        if reasoning or content:
            self._post(("delta", reasoning, content))

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if reason in ("stop", "length"):
            self._delta(*self.text.finish())
            self._post(("done", reason))

    def _fail(self, error: APIError) -> None:
        self.finish_reason = "error"
        self._post(("error", error))


class _Call:
    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args, self.future = fn, args, Future()

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn(*self.args))
            except BaseException as e:  # handed to the awaiting request
                self.future.set_exception(e)


class Engine:
    """Runs a :class:`Backend` on one worker thread; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        max_queue: int = 64,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        limit = backend.max_batch_size
        if limit is not None and max_batch_size > limit:
            log.info("max_batch_size=%d: this backend decodes %d at a time", max_batch_size, limit)
            max_batch_size = limit
        self.backend = backend
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        # requests, batches, rows, decode_steps, cancelled, timeouts, max_batch
        self.stats: Counter = Counter()
        self.running: list[Job] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- requests ----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise a 503 when the queue is full (or the engine is closing)."""
        if self._closing:
            raise overloaded("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            raise overloaded() from None
        self.stats["requests"] += 1
        self._wake.set()

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker (between decode steps) and await its result."""
        call = _Call(fn, args)
        self._calls.put(call)
        self._wake.set()
        return await asyncio.wrap_future(call.future)

    # -- the worker --------------------------------------------------------------------------
    def _run_calls(self) -> None:
        while True:
            try:
                self._calls.get_nowait().run()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._closing:
            self._run_calls()
            try:
                first = self._jobs.get_nowait()
            except queue.Empty:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            batch = [first]
            end = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                left = end - time.monotonic()
                try:
                    batch.append(
                        self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
                    )
                except queue.Empty:
                    break
            batch = [j for j in batch if self._still_wanted(j)]
            if batch:
                try:
                    self._run(batch)
                except Exception:  # a bug, not a request error: fail the batch, keep serving
                    log.exception("decoding a batch failed")
                    for job in batch:
                        if job.finish_reason is None:
                            job._fail(internal())
                finally:
                    self.running = []
        for job in self._drain():
            job._fail(overloaded("the server is shutting down"))

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _still_wanted(self, job: Job) -> bool:
        if self._closing:
            job._fail(overloaded("the server is shutting down"))
            return False
        if job.cancelled:
            self.stats["cancelled"] += 1
            job._finish("cancelled")
            return False
        if time.monotonic() > job.deadline:
            self.stats["timeouts"] += 1
            job._fail(timed_out(job.timeout_s))
            return False
        return True

    def _sample(self, logits: torch.Tensor, batch: list[Job], rows: list[int]) -> torch.Tensor:
        """One token per row ``(B,)``: greedy rows by one argmax, sampled rows one by one."""
        tokens = logits.argmax(dim=-1)  # (B,)
        for i in rows:
            s = batch[i].sampling
            if s.temperature > 0:
                tokens[i] = sample_next_token(
                    logits[i : i + 1], do_sample=True, temperature=s.temperature,
                    top_p=s.top_p, generator=batch[i]._generator,
                )[0]  # fmt: skip
        return tokens

    def _run(self, batch: list[Job]) -> None:
        backend = self.backend
        self.running = batch
        for job in batch:
            if job.sampling.seed is not None:
                job._generator = torch.Generator(device=backend.device).manual_seed(
                    job.sampling.seed
                )
        decoding = backend.start([j.prompt for j in batch], max(j.max_tokens for j in batch))
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        stop_ids = set(backend.stop_token_ids)
        pad = next(iter(stop_ids), 0)
        live = list(range(len(batch)))
        while live:
            self._run_calls()
            tokens = self._sample(decoding.logits, batch, live)
            still = []
            for i in live:
                job = batch[i]
                if not self._still_wanted(job):
                    continue
                token = int(tokens[i])
                job.completion_tokens += 1
                if token in stop_ids:
                    job._finish("stop")
                    continue
                job._delta(*job.text.push(token))
                if job.text.stopped:
                    job._finish("stop")
                elif job.completion_tokens >= job.max_tokens:
                    job._finish("length")
                else:
                    still.append(i)
            live = still
            if live:
                done = torch.ones(len(batch), dtype=torch.bool, device=tokens.device)
                done[live] = False
                decoding.advance(tokens.masked_fill(done, pad))
                self.stats["decode_steps"] += 1
