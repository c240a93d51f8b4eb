"""``ExportedModel``: run an exported folder with ``AutoGLMModel``'s call shapes.

``ExportedModel.load(folder)`` checks every file against ``manifest.json`` (size and sha256;
a changed file is refused by name), then loads each method through the ExecuTorch Python runtime
(``executorch.runtime``) or ONNX Runtime, as the manifest's ``format`` says. Inputs are checked
(type, shape, dtype, sample rate, text length) with errors naming the argument; audio at another
rate is resampled exactly as the eager tower does (:func:`~autoglm_phone.models.towers.resample`).

``generate`` assembles each row's prompt (media blocks and text, as ``AutoGLMModel.
build_prefix``), runs ``prefill`` and then ``decode`` per token, holding the decoder's state (KV
cache, memory slots) between calls: the artifacts take it as inputs and return it
(``generation.py``).

The artifacts take one item per call (fixed shapes, ``methods.py``); a batch runs row by row.
With MoE text layers that is what eager ``encode_text`` computes for a batch of one: the expert
capacity is shared by the tokens of one call, so an eager batch can route differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.export.manifest import read_manifest
from autoglm_phone.models.autoglm import MODALITY_TABLE
from autoglm_phone.models.generation import check_generation_args, sample_next_token
from autoglm_phone.models.towers import check_wave, resample

Runner = Callable[[list[torch.Tensor]], list[torch.Tensor]]
_executorch_threads: int | None = None  # the process-wide thread pool size once a .pte loaded


def _load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernel library (``embedding_byte`` for 8-bit embeddings)
    with the runtime: the Python bindings link only the portable and optimized kernels. An app
    links it like any kernel library (docs/EXPORT.md)."""
    import ctypes

    import executorch

    for root in executorch.__path__:
        lib = Path(root) / "lib" / "libexecutorch_kernels_quantized.so"
        if lib.is_file():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # registers on load; once per process
            return


def _executorch_runner(path: Path, method: str, num_threads: int | None) -> Runner:
    """A ``.pte`` method. The thread pool is process-wide and must be sized before the first
    program loads (resizing it after a load crashed the next call), so a later load that asks
    for another size is refused."""
    global _executorch_threads
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if _executorch_threads is None:
        _load_quantized_kernels()
        if num_threads is not None:
            portable_lib._unsafe_reset_threadpool(num_threads)
        _executorch_threads = portable_lib._threadpool_get_thread_count()
    elif num_threads is not None and num_threads != _executorch_threads:
        raise ValueError(
            f"num_threads={num_threads}: this process already runs ExecuTorch on "
            f"{_executorch_threads} threads, and the pool cannot change once a program is loaded"
        )
    loaded = Runtime.get().load_program(path).load_method(method)
    return lambda inputs: list(loaded.execute(inputs))


def _onnx_runner(path: Path, method: str, num_threads: int | None) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


RUNNERS: dict[str, Callable[[Path, str, int | None], Runner]] = {
    "executorch": _executorch_runner,
    "onnx": _onnx_runner,
}


class ExportedModel:
    """An exported model with :class:`~autoglm_phone.models.autoglm.AutoGLMModel`'s call
    shapes: ``encode_image``, ``encode_audio``, ``encode_text``, ``embed_media`` (and
    ``embed_image`` / ``embed_audio``) and ``generate``, for the methods the folder holds;
    ``tokenizer`` if one was exported."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], runners: dict[str, Runner], tokenizer: Any
    ) -> None:
        self.folder, self.manifest, self.runners = folder, manifest, runners
        self.tokenizer = tokenizer
        self.config = MultiModalConfig.from_dict(manifest["model"])
        self.shapes = manifest["shapes"]

    @classmethod
    def load(cls, folder: str | Path, *, num_threads: int | None = None) -> ExportedModel:
        """Check and load ``folder``. ``num_threads``: the runtime's CPU threads (None: its
        default); for ExecuTorch it is set before any program loads."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        fmt = manifest["format"]
        if fmt not in RUNNERS:
            raise ValueError(f"{folder}: unknown format {fmt!r} in the manifest")
        runners = {
            name: RUNNERS[fmt](folder / entry["file"], name, num_threads)
            for name, entry in manifest["methods"].items()
        }
        tokenizer = None
        if manifest.get("tokenizer"):
            from autoglm_phone.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(folder / manifest["tokenizer"])
        return cls(folder, manifest, runners, tokenizer)

    # -- running -------------------------------------------------------------------------------
    def _run(self, method: str, rows: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """One call per row (each a tuple of ``(1, ...)`` inputs); outputs stacked over rows."""
        self._require(method)
        outs = [self.runners[method](list(row)) for row in rows]
        return [torch.cat(parts) for parts in zip(*outs, strict=True)]

    def _require(self, method: str) -> None:
        if method not in self.runners:
            raise ValueError(
                f"{self.folder}: method {method!r} was not exported (has: {sorted(self.runners)})"
            )

    def _media(self, modality: str, media: torch.Tensor, sample_rate: int | None) -> list:
        prepare = {"image": self._images, "audio": self._wave}
        if modality not in prepare:
            raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(prepare)}")
        self._require(modality)
        batch = prepare[modality](media, sample_rate)
        return self._run(modality, [(row[None],) for row in batch])

    def _images(self, images: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] or uint8 -> float32 (as ``VisionTower``)."""
        (spec,) = self.manifest["methods"]["image"]["inputs"]
        _, c, h, w = spec["shape"]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise ValueError(
                f"images must be (batch, {c}, {h}, {w}) as exported, got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
        return images.float()

    def _wave(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """``(B, n)`` mono at ``sample_rate`` -> float32 ``(B, clip)`` at the tower's rate."""
        wave = check_wave(wave)
        rate = self.shapes["sample_rate"]
        if sample_rate is not None:
            if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
                raise ValueError(
                    f"sample_rate must be a positive integer (Hz), got {sample_rate!r}"
                )
            wave = resample(wave, int(sample_rate), rate)
        n = self.shapes["audio_samples"]
        if wave.shape[1] != n:
            given = "" if sample_rate is None else f" after resampling {sample_rate} -> {rate} Hz"
            raise ValueError(
                f"audio must be {n} samples at {rate} Hz ({n / rate:g} s, the exported clip "
                f"length), got {wave.shape[1]}{given}; crop or zero-pad it"
            )
        return wave

    @staticmethod
    def _normalized(normalize: bool) -> None:
        if not normalize:
            raise ValueError(
                "the exported embeddings are unit vectors; normalize=False is not exported"
            )

    # -- AutoGLMModel's call shapes ------------------------------------------------------------
    def encode_media(
        self,
        modality: str,
        media: torch.Tensor,
        sample_rate: int | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Media in the shared contrastive space ``(B, E)``, unit vectors."""
        self._normalized(normalize)
        return self._media(modality, media, sample_rate)[0]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode_media("image", images, normalize=normalize)

    def encode_audio(
        self, wave: torch.Tensor, sample_rate: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        return self.encode_media("audio", wave, sample_rate, normalize)

    def embed_media(
        self, modality: str, media: torch.Tensor, sample_rate: int | None = None
    ) -> torch.Tensor:
        """Media -> decoder embeddings ``(B, K, C)``."""
        return self._media(modality, media, sample_rate)[1]

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_media("image", images)

    def embed_audio(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        return self.embed_media("audio", wave, sample_rate)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Right-padded ``input_ids`` ``(B, T)`` and ``attention_mask`` ``(B, T)``, ``T`` up to
        the exported length, -> ``(B, E)`` unit vectors."""
        self._normalized(normalize)
        ids, mask = self._text(input_ids, attention_mask)
        return self._run("text", [(i[None], m[None]) for i, m in zip(ids, mask, strict=True)])[0]

    def _text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked ids and mask, padded to the exported length: int64 and bool ``(B, L)``."""
        self._check_ids(input_ids, attention_mask)
        length = self.shapes["max_text_len"]
        if input_ids.shape[1] > length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the text encoder was exported for at "
                f"most {length} (export max_text_len)"
            )
        pad = length - input_ids.shape[1]
        ids = torch.nn.functional.pad(
            input_ids.long(), (0, pad), value=self.config.text.pad_token_id
        )
        mask = torch.nn.functional.pad(attention_mask.bool(), (0, pad), value=False)
        return ids, mask

    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Token ids ``(B, T)`` in the vocabulary and a same-shaped bool or 0/1 mask."""
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be (batch, tokens), got {tuple(t.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and input_ids "
                f"{tuple(input_ids.shape)} differ in shape"
            )
        if attention_mask.is_floating_point():
            raise TypeError(
                f"attention_mask must be bool or 0/1 integers, got {attention_mask.dtype}"
            )
        vocab = self.config.text.vocab_size
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}), got values outside")

    # -- generation: AutoGLMModel.generate's call shape ----------------------------------------
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """Decoder embeddings ``(n, C)`` of token ids, through ``embed`` in exported-length
        chunks."""
        size = self.shapes["prompt_len"]
        parts = []
        for start in range(0, len(ids), size):
            chunk = torch.tensor(ids[start : start + size], dtype=torch.long)
            padded = torch.nn.functional.pad(
                chunk, (0, size - len(chunk)), value=self.config.text.pad_token_id
            )
            (embeds,) = self._run("embed", [(padded[None],)])  # (1, P, C)
            parts.append(embeds[0, : len(chunk)])
        return torch.cat(parts) if parts else torch.zeros(0, self.config.text.hidden_size)

    def media_block(self, modality: str, tokens: torch.Tensor) -> torch.Tensor:
        """``<begin> tokens <end>``, as ``AutoGLMModel.media_block``: ``(B, K, C)`` ->
        ``(B, K + 2, C)``."""
        st = self.config.special_tokens
        m = MODALITY_TABLE[modality]
        marks = [getattr(st, m.begin), getattr(st, m.end)]
        if None in marks:
            raise ValueError(
                "the media marker ids are not set in the exported config (special_tokens): "
                "export a model built with its tokenizer"
            )
        begin, end = self.embed_tokens(marks)  # (C,) each
        b = tokens.shape[0]
        return torch.cat([begin.expand(b, 1, -1), tokens, end.expand(b, 1, -1)], dim=1)

    def build_prompts(
        self,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sample_rate: int | None = None,
    ) -> list[torch.Tensor]:
        """Each row's prompt of decoder embeddings ``(n_i, C)``, as ``AutoGLMModel.
        build_prefix`` assembles it (without the padding): ``<begin> media tokens <end>`` per
        modality given, in the table's order, then the row's real tokens of ``input_ids``."""
        media = {"image": images, "audio": audio}
        parts: list[list[torch.Tensor]] = []  # per modality, then text: (B, n, C)
        for name in MODALITY_TABLE:
            if media[name] is None:
                continue
            blocks = self.media_block(name, self.embed_media(name, media[name], sample_rate))
            parts.append(list(blocks))  # B x (K + 2, C)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            self._check_ids(input_ids, attention_mask)
            rows = [
                ids[mask.bool()].tolist()
                for ids, mask in zip(input_ids, attention_mask, strict=True)
            ]
            parts.append([self.embed_tokens(r) for r in rows])
        if not parts:
            raise ValueError("generate needs images, audio or input_ids")
        sizes = {len(p) for p in parts}
        if len(sizes) > 1:
            raise ValueError(
                f"images, audio and input_ids have different batch sizes {sorted(sizes)}"
            )
        return [torch.cat(row) for row in zip(*parts, strict=True)]

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        sample_rate: int | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """New tokens ``(B, N <= max_new_tokens)`` after the :meth:`build_prompts` prompt, as
        ``AutoGLMModel.generate``: GLM's prefix mode, ``stop_token_ids`` defaulting to the
        end-of-text token, a stopped row padded with ``pad_token_id``. Rows run one at a time
        (greedy is then what eager computes for each row alone; sampling draws per row)."""
        check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
        missing = [m for m in self.generation_methods() if m not in self.runners]
        if missing:
            raise ValueError(
                f"{self.folder}: generation needs the methods {missing}, which were not exported "
                "(export with methods=[..., generate])"
            )
        if stop_token_ids is None:
            eos = self.config.special_tokens.eos
            stop_token_ids = () if eos is None else (eos,)
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        prompts = self.build_prompts(images, audio, input_ids, attention_mask, sample_rate)
        rows = [
            self._generate_row(p, max_new_tokens, sampling, set(stop_token_ids), generator)
            for p in prompts
        ]
        width = max(len(r) for r in rows)
        pad = self.config.text.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)

    def generation_methods(self) -> tuple[str, ...]:
        memory = ("memory_write",) if self.config.text.memory.enabled else ()
        return ("embed", "prefill", "decode", *memory)

    def _state(self, method: str, name: str) -> torch.Tensor:
        """Zeros shaped as ``method``'s input ``name`` in the manifest (a fresh state)."""
        for spec in self.manifest["methods"][method]["inputs"]:
            if spec["name"] == name:
                return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        raise KeyError(f"{method} has no input {name!r}")

    def _generate_row(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        sampling: dict,
        stop: set[int],
        generator: torch.Generator | None,
    ) -> list[int]:
        """One prompt ``(n, C)``: prefill, then decode until a stop token or the budget."""
        logits, decode = self.begin_decode(prompt, max_new_tokens)
        tokens: list[int] = []
        for i in range(max_new_tokens):
            token = int(sample_next_token(logits, **sampling, generator=generator)[0])
            tokens.append(token)
            if token in stop or i == max_new_tokens - 1:
                break
            logits = decode(token)
        return tokens

    @torch.no_grad()
    def continuation_logits(
        self, prompt: torch.Tensor, continuation: Sequence[int]
    ) -> torch.Tensor:
        """Teacher forcing: the logits ``(len(continuation), V)`` that predict each token of
        ``continuation`` after ``prompt`` ``(n, C)`` (a :meth:`build_prompts` row; GLM's prefix
        mode over it, causal after), as eager ``prefix_lm`` scores a response."""
        if not continuation:
            raise ValueError("continuation is empty: nothing to score")
        logits, decode = self.begin_decode(prompt, len(continuation))
        rows = [logits]
        for token in continuation[:-1]:
            rows.append(decode(int(token)))
        return torch.cat(rows)

    @torch.no_grad()
    def begin_decode(
        self, prompt: torch.Tensor, max_new_tokens: int
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """For a caller-driven decoding loop (as ``GLMDecoder.begin_decode``): the prompt's
        (a :meth:`build_prompts` row ``(n, C)``) last logits ``(1, V)`` and ``decode(token)``,
        which feeds the next token id and returns its logits ``(1, V)``, for up to
        ``max_new_tokens`` tokens in all."""
        if self.config.text.memory.enabled:
            return self._prefill_memory(prompt, max_new_tokens)
        return self._prefill_cache(prompt, max_new_tokens)

    def _pad_prompt(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, C)`` -> right-padded ``(1, P, C)`` and ``length`` ``(1,)``."""
        size = self.shapes["prompt_len"]
        padded = torch.nn.functional.pad(prompt, (0, 0, 0, size - len(prompt)))
        return padded[None].float(), torch.tensor([len(prompt)])

    def _prefill_cache(self, prompt: torch.Tensor, max_new_tokens: int):
        """Without memory: the prompt in one ``prefill`` into the static cache."""
        n, size, slots = len(prompt), self.shapes["prompt_len"], self.shapes["cache_len"]
        if not 1 <= n <= size:
            raise ValueError(
                f"the prompt has {n} positions (media blocks and text); the export takes 1 to "
                f"{size} (export prompt_len)"
            )
        if n + max_new_tokens - 1 > slots:
            raise ValueError(
                f"prompt ({n}) + max_new_tokens ({max_new_tokens}) - 1 exceeds the exported KV "
                f"cache of {slots} slots (export cache_len)"
            )
        logits, k, v = self.runners["prefill"](list(self._pad_prompt(prompt)))
        state = {"k": k, "v": v, "position": n}

        def decode(token: int) -> torch.Tensor:
            inputs = [torch.tensor([[token]]), torch.tensor([state["position"]]), state["k"]]
            logits, state["k"], state["v"] = self.runners["decode"]([*inputs, state["v"]])
            state["position"] += 1
            return logits

        return logits, decode

    def _prefill_memory(self, prompt: torch.Tensor, max_new_tokens: int):
        """With memory: the prompt segment by segment through ``prefill``, the slots carried;
        decoding fills one segment's cache and writes it to memory when full."""
        seg = self.shapes["prompt_len"]
        if len(prompt) < 1:
            raise ValueError("the prompt is empty")
        filled, memory = self._state("prefill", "filled"), self._state("prefill", "memory")
        for start in range(0, len(prompt), seg):
            chunk = self._pad_prompt(prompt[start : start + seg])
            logits, memory, filled, k, v = self.runners["prefill"]([*chunk, filled, memory])
        state = {"k": k, "v": v, "memory": memory, "filled": filled, "position": len(prompt) % seg}

        def decode(token: int) -> torch.Tensor:
            s = state
            ids, position = torch.tensor([[token]]), torch.tensor([s["position"]])
            logits, s["k"], s["v"] = self.runners["decode"](
                [ids, position, s["filled"], s["memory"], s["k"], s["v"]]
            )
            s["position"] += 1
            if s["position"] == seg:  # the segment is full: into memory, start an empty one
                (s["memory"],) = self.runners["memory_write"](
                    [s["filled"], s["memory"], s["k"], s["v"]]
                )
                s["filled"], s["position"] = torch.ones_like(s["filled"]), 0
            return logits

        return logits, decode
