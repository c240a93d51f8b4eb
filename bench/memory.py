"""Peak memory and time per token of the whole model, memory-augmented decoder vs full attention.

The model is the ``autoglm-phone-tiny`` preset (:class:`~autoglm_phone.models.autoglm.
AutoGLMModel`: vision and audio towers, adapters, the GLM decoder), built twice: ``memory``
(``text.memory.enabled``, segments of ``--segment-len`` tokens, recomputed per segment in
backward) and ``full`` (memory off, full attention; it gets the memory model's other weights).
Its input at ``T`` tokens is multimodal: an image block and an audio block from the towers, then
text tokens filling the length (the last ``--response`` of them the scored response). Measures:

- ``forward``: ``model.prefix_lm`` under ``torch.no_grad()`` (logits ``(B, T, V)``),
- ``train step``: the towers, ``model.prefix_lm``, ``prefix_lm_loss`` and backward,
- ``generate 64``: ``model.stream`` of ``--new-tokens`` tokens after that ``T``-token prompt
  (greedy, no stop token); its time per token is per new token, after the prefill.

Each (length, model, measure) runs in a fresh subprocess: build the model and its input, warm up
the same measure on a short input (lazily loaded code and the allocator's first arenas), then
free what the warm-up left (``gc``, glibc's ``malloc_trim``), reset the kernel's RSS high-water
mark (``/proc/self/clear_refs``) and take the current RSS as the baseline; the peak is the
high-water mark (``VmHWM``) after the measure minus that baseline. Where the mark cannot be reset
it falls back to ``ru_maxrss`` after the warm-up as the baseline (``"hwm_reset": false`` in the
JSON). On CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before. Generation
also reports ``decode_state_mib``: the bytes of the KV caches it allocated plus the memory slots
(deterministic, independent of the allocator).

    PYTHONPATH=. python bench/memory.py [--quick] [--max-full-len 8192] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere

from autoglm_phone.losses.lm import prefix_lm_loss  # noqa: E402
from autoglm_phone.models import generation, memory  # noqa: E402
from autoglm_phone.models.autoglm import AutoGLMModel  # noqa: E402

PRESET = "autoglm-phone-tiny"
MODELS = ("full", "memory")
MEASURES = {"forward": "forward", "train": "train step", "generate": "generate 64"}
MARKERS = {"begin_of_image": 1, "end_of_image": 2, "begin_of_audio": 3, "end_of_audio": 4}
SEED_CLAIM = "memory-augmented attention uses 76% of full attention's memory at 2048 tokens"
TARGET = "generating 64 tokens after an 8192-token prompt peaks at <= 20% of full attention's"
CLAIMS = (  # (tokens, measure, bound on the ratio, what): printed beside the table
    (2048, "train", 0.76, f"seed's claim: {SEED_CLAIM}"),
    (8192, "generate", 0.20, f"issue's target: {TARGET}"),
)
MIB = 2**20


def build(name: str, args: argparse.Namespace, seq_len: int) -> AutoGLMModel:
    """The preset with memory on (``memory``) or off (``full``), the same weights where shared."""

    def make(enabled: bool) -> AutoGLMModel:
        torch.manual_seed(0)
        text = {
            "vocab_size": args.vocab,
            "max_seq_len": seq_len + args.new_tokens,
            "memory": {
                "enabled": enabled,
                "segment_len": args.segment_len,
                "num_slots": args.slots,
                "checkpoint_segments": True,
            },
        }
        return AutoGLMModel.from_pretrained(
            PRESET, config={"text": text, "special_tokens": MARKERS}
        )

    model = make(True)
    if name == "full":  # the memory model's weights without the memory ones
        full = make(False)
        full.load_state_dict(model.state_dict(), strict=False)
        model = full
    return model.to(args.device)


def make_batch(model: AutoGLMModel, seq_len: int, args: argparse.Namespace) -> dict:
    """One image, one second of audio and text tokens up to ``seq_len`` decoder positions."""
    g = torch.Generator().manual_seed(1)
    a = model.cfg.adapter
    media_len = sum(k + int(a.summary_token) + 2 for k in (a.image_tokens, a.audio_tokens))
    n = seq_len - media_len
    if n <= args.response:
        raise ValueError(f"{seq_len} tokens leave no prompt after {media_len} media positions")
    ids = torch.randint(len(MARKERS) + 1, args.vocab, (1, n), generator=g)
    loss_mask = torch.zeros(1, n, dtype=torch.bool)
    loss_mask[:, -args.response :] = True
    batch = {
        "images": torch.randn(1, 3, model.cfg.vision.img_size, model.cfg.vision.img_size),
        "audio": torch.randn(1, model.cfg.audio.sample_rate, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids, dtype=torch.bool),
        "loss_mask": loss_mask,
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def media_blocks(model: AutoGLMModel, batch: dict) -> list[torch.Tensor]:
    """The image and audio blocks ``(B, K + 2, C)`` from the towers."""
    media = {"image": batch["images"], "audio": batch["audio"]}
    return [model.media_block(name, model.embed_media(name, x)) for name, x in media.items()]


def prefix_logits(model: AutoGLMModel, batch: dict) -> tuple[torch.Tensor, ...]:
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    return model.prefix_lm(media_blocks(model, batch), ids, mask, loss_mask)


def run_forward(model: AutoGLMModel, batch: dict, args: argparse.Namespace) -> dict:
    model.eval()
    with torch.no_grad():
        prefix_logits(model, batch)
    return {}


def run_train(model: AutoGLMModel, batch: dict, args: argparse.Namespace) -> dict:
    model.train()
    loss, _ = prefix_lm_loss(*prefix_logits(model, batch))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {}


@contextlib.contextmanager
def tracked_caches() -> Iterator[list]:
    """Collect every KV cache generation allocates (the full model's ``KVCache``, the memory
    model's ``SegmentKVCache``) while the block runs."""
    made: list = []
    from_config = generation.KVCache.from_config.__func__
    seg_init = memory.SegmentKVCache.__init__

    def track_full(cls, *a, **kw):  # noqa: ANN001, ANN202
        made.append(from_config(cls, *a, **kw))
        return made[-1]

    def track_segment(self, *a, **kw):  # noqa: ANN001, ANN202
        seg_init(self, *a, **kw)
        made.append(self)

    generation.KVCache.from_config = classmethod(track_full)
    memory.SegmentKVCache.__init__ = track_segment
    try:
        yield made
    finally:
        generation.KVCache.from_config = classmethod(from_config)
        memory.SegmentKVCache.__init__ = seg_init


def cache_bytes(cache: object) -> int:
    """Bytes of a ``KVCache`` (its layers' ``k``/``v``) or ``SegmentKVCache`` (``k``/``v``)."""
    parts = getattr(cache, "layers", [cache])
    return sum(t.numel() * t.element_size() for p in parts for t in (p.k, p.v))


def run_generate(model: AutoGLMModel, batch: dict, args: argparse.Namespace) -> dict:
    model.eval()
    text = model.cfg.text
    with tracked_caches() as caches:
        steps = model.stream(
            batch["images"],
            batch["audio"],
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=args.new_tokens,
            stop_token_ids=(),
        )
        start = time.perf_counter()
        next(steps)  # the prefill and the first token
        prefill = time.perf_counter() - start
        n = 1 + sum(1 for _ in steps)
    decode = time.perf_counter() - start - prefill
    slots = text.num_layers * text.memory.num_slots * text.hidden_size if text.memory.enabled else 0
    state = sum(map(cache_bytes, caches)) + slots * model.text.norm.weight.element_size()
    return {
        "new_tokens": n,
        "prefill_s": prefill,
        "decode_s_per_token": decode / max(n - 1, 1),
        "decode_state_mib": state / MIB,
    }


RUNNERS: dict[str, Callable[[AutoGLMModel, dict, argparse.Namespace], dict]] = {
    "forward": run_forward,
    "train": run_train,
    "generate": run_generate,
}


def _proc_status(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


class Meter:
    """Peak memory above a baseline taken by :meth:`start` (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.hwm_reset = False
        self.base = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / MIB
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the warm-up's freed heap back
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            self.hwm_reset = True
            self.base = _proc_status("VmRSS")
        except OSError:  # no resettable mark: the high-water mark so far is the baseline
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB - self.base
        if self.hwm_reset:
            return _proc_status("VmHWM") - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def measure(name: str, seq_len: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One (model, length, measure) in this process: peak MiB above the baseline, seconds."""
    torch.set_num_threads(args.threads)
    model = build(name, args, seq_len)
    batch = make_batch(model, seq_len, args)
    run = RUNNERS[mode]
    warm = args.segment_len + 64  # two segments for the memory model
    run(model, make_batch(model, warm, args), args)
    meter = Meter(args.device)
    meter.start()
    start = time.perf_counter()
    extra = run(model, batch, args)
    seconds = time.perf_counter() - start
    per_token = extra.pop("decode_s_per_token", seconds / seq_len)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mib": meter.peak(),
        "baseline_mib": meter.base,
        "hwm_reset": meter.hwm_reset or meter.cuda,
        "seconds": seconds,
        "s_per_token": per_token,
        **extra,
    }


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per (tokens, measure): both models' peaks, their ratio and time per token."""
    table = [
        "| tokens | measure | full MiB | memory MiB | ratio memory/full | full s/token | "
        "memory s/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        for mode, label in MEASURES.items():
            got = {r["model"]: r for r in rows if (r["seq_len"], r["mode"]) == (seq_len, mode)}
            if "memory" not in got and "full" not in got:
                continue
            full, mem = got.get("full"), got.get("memory")
            ratio = ratio_of(rows, seq_len, mode)
            ratio = "-" if ratio is None else f"{ratio:.3f}"
            table.append(
                f"| {seq_len} | {label} | {_cell(full, 'peak_mib', '.1f')} | "
                f"{_cell(mem, 'peak_mib', '.1f')} | {ratio} | {_cell(full, 's_per_token', '.2e')} "
                f"| {_cell(mem, 's_per_token', '.2e')} |"
            )
    return table


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None or key not in row:
        return (row or {}).get("status", "not run")
    return format(row[key], fmt)


def ratio_of(rows: list[dict], seq_len: int, mode: str) -> float | None:
    """Memory's peak over full attention's at one (length, measure); None if either is missing."""
    got = {
        r["model"]: r["peak_mib"]
        for r in rows
        if (r["seq_len"], r["mode"]) == (seq_len, mode) and "peak_mib" in r
    }
    return got["memory"] / max(got["full"], 1e-9) if len(got) == 2 else None


def standing(rows: list[dict]) -> list[str]:
    """The seed's claim and the issue's target beside what this run measured."""
    lines = []
    for seq_len, mode, bound, text in CLAIMS:
        ratio = ratio_of(rows, seq_len, mode)
        if ratio is None:
            got = "not measured in this run"
        else:
            got = f"{ratio:.3f} ({'within' if ratio <= bound else 'above'} {bound:.0%})"
        lines.append(f"- {text}; here ({MEASURES[mode]}, {seq_len} tokens): {got}.")
    return lines


def run_fresh(
    name: str, seq_len: int, mode: str, argv: list[str], mmap_threshold: int
) -> dict[str, float]:
    """:func:`measure` in a fresh Python process (its own high-water mark)."""
    cmd = [sys.executable, __file__, *argv, "--worker", name, str(seq_len), mode]
    env = dict(os.environ)
    if mmap_threshold > 0:  # glibc: a fixed threshold returns freed big blocks to the system
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"status": f"failed ({tail[0][:60]})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "memory.json")
    p.add_argument("--seq-lens", default="2048,4096,8192,16384")
    p.add_argument("--quick", action="store_true", help="2048 and 4096 tokens only")
    p.add_argument(
        "--max-full-len",
        type=int,
        default=16384,
        help="longest length full attention runs at; longer ones are reported 'not run'",
    )
    p.add_argument("--modes", default=",".join(MEASURES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--vocab", type=int, default=409)
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--response", type=int, default=64, help="scored text tokens at the end")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each measurement")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the workers, so RSS tracks live "
        "tensors instead of freed heap memory malloc keeps (0: malloc's default)",
    )
    p.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "SEQ_LEN", "MODE"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens = "2048,4096"
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        name, seq_len, mode = args.worker
        print(json.dumps(measure(name, int(seq_len), mode, args)))
        return {}
    rows, begin = [], time.perf_counter()
    for seq_len in map(int, args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            for name in args.models.split(","):
                if name == "full" and seq_len > args.max_full_len:
                    res = {"status": "not run"}
                else:
                    res = run_fresh(name, seq_len, mode, argv, args.mmap_threshold)
                rows.append({"model": name, "seq_len": seq_len, "mode": mode, **res})
                got = (
                    f"{res['peak_mib']:8.1f} MiB {res['seconds']:7.1f} s"
                    if "seconds" in res
                    else res["status"]
                )
                print(f"{name:>6} {seq_len:5d} {mode:>8}: {got}", flush=True)
    table = markdown_table(rows)
    notes = standing(rows)
    print("\n".join(table + [""] + notes))
    report = {
        "device": args.device,
        "preset": PRESET,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "rows": rows,
        "table": table,
        "seed_claim": SEED_CLAIM,
        "standing": notes,
        "wall_s": time.perf_counter() - begin,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
