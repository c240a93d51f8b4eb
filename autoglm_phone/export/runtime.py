"""``ExportedModel``: run an exported folder with ``AutoGLMModel``'s call shapes.

``ExportedModel.load(folder)`` checks every file against ``manifest.json`` (size and sha256;
a changed file is refused by name), then loads each method through the ExecuTorch Python runtime
(``executorch.runtime``) or ONNX Runtime, as the manifest's ``format`` says. Inputs are checked
(type, shape, dtype, sample rate, text length) with errors naming the argument; audio at another
rate is resampled exactly as the eager tower does (:func:`~autoglm_phone.models.towers.resample`).

The artifacts take one item per call (fixed shapes, ``methods.py``); a batch runs row by row.
With MoE text layers that is what eager ``encode_text`` computes for a batch of one: the expert
capacity is shared by the tokens of one call, so an eager batch can route differently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.export.manifest import read_manifest
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
    """The retrieval side of an exported model: ``encode_image``, ``encode_audio``,
    ``encode_text``, ``embed_media`` (and ``embed_image`` / ``embed_audio``), as on
    :class:`~autoglm_phone.models.autoglm.AutoGLMModel`; ``tokenizer`` if one was exported."""

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
        if method not in self.runners:
            raise ValueError(
                f"{self.folder}: method {method!r} was not exported (has: {sorted(self.runners)})"
            )
        outs = [self.runners[method](list(row)) for row in rows]
        return [torch.cat(parts) for parts in zip(*outs, strict=True)]

    def _media(self, modality: str, media: torch.Tensor, sample_rate: int | None) -> list:
        prepare = {"image": self._images, "audio": self._wave}
        if modality not in prepare:
            raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(prepare)}")
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
        length, vocab = self.shapes["max_text_len"], self.config.text.vocab_size
        if input_ids.shape[1] > length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the text encoder was exported for at "
                f"most {length} (export max_text_len)"
            )
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}), got values outside")
        pad = length - input_ids.shape[1]
        ids = torch.nn.functional.pad(
            input_ids.long(), (0, pad), value=self.config.text.pad_token_id
        )
        mask = torch.nn.functional.pad(attention_mask.bool(), (0, pad), value=False)
        return ids, mask
