"""Peak memory of the memory-augmented decoder vs the same decoder with full causal attention.

For each sequence length and mode, one fresh subprocess builds one model, records its baseline and
then the peak of:

- ``grad forward``: a forward with gradients enabled (what training keeps for backward),
- ``train step``: that forward, the LM loss and backward (read in the same process, after it),
- ``infer``: a forward under ``torch.no_grad()`` (its own process).

On CPU the measure is peak RSS (``resource.getrusage``, a high-water mark) minus the process's
RSS peak after building the model and its input and a warm-up of the same mode on two segments
(which puts lazily loaded autograd/checkpointing code, ~100 MiB, into the baseline); on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward.

Models: ``full`` is ``GLMDecoder`` (causal attention over the whole sequence), ``memory`` is
``MemoryGLMDecoder`` of the same size with per-segment recomputation in backward
(``checkpoint_segments``), ``memory_store`` the same without it.

    PYTHONPATH=. python bench/memory.py [--device cpu|cuda] [--out outputs/bench/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere

from autoglm_phone.config import DecoderConfig, MemoryConfig  # noqa: E402
from autoglm_phone.models.glm import GLMDecoder  # noqa: E402
from autoglm_phone.models.memory import MemoryGLMDecoder  # noqa: E402

MODELS = ("full", "memory", "memory_store")
MODES = ("train", "infer")


def build(name: str, args: argparse.Namespace, seq_len: int) -> torch.nn.Module:
    memory = MemoryConfig(
        enabled=True, segment_len=args.segment_len, num_slots=args.slots, bptt_segments=args.bptt
    )
    cfg = DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=max(1, args.heads // 2),
        max_seq_len=seq_len,
        memory=memory,
    )
    if name == "full":
        return GLMDecoder(cfg)
    model = MemoryGLMDecoder(cfg)
    model.checkpoint_segments = name == "memory"
    return model


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(name: str, seq_len: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one configuration in this process; peaks in MiB above the post-build baseline."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    model = build(name, args, seq_len).to(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, seq_len), device=args.device)
    # warm-up on two segments in the same mode, so lazily loaded code (autograd, checkpointing)
    # and the allocator's first arenas are in the baseline, not in the peak
    warmup = ids[:, : 2 * args.segment_len]
    if mode == "infer":
        with torch.no_grad():
            model.eval()(warmup)
    else:
        model(warmup).sum().backward()
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20

        def peak() -> float:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        base = _rss_mib()

        def peak() -> float:
            return _rss_mib() - base

    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    start = time.perf_counter()
    if mode == "infer":
        model.eval()
        with torch.no_grad():
            model(ids)
        result["peak_mib"] = peak()
    else:
        logits = model(ids)  # (B, T, V)
        result["grad_forward_peak_mib"] = peak()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        del logits
        loss.backward()
        result["peak_mib"] = peak()
    result["seconds"] = time.perf_counter() - start
    return result


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per (tokens, measure): full, memory, their ratio, memory without recompute."""
    table = [
        "| tokens | measure | full MiB | memory MiB | ratio memory/full | memory, no recompute |",
        "|---|---|---|---|---|---|",
    ]
    measures = (
        ("grad forward", "train", "grad_forward_peak_mib"),
        ("train step", "train", "peak_mib"),
        ("infer", "infer", "peak_mib"),
    )
    for seq_len in sorted({r["seq_len"] for r in rows}):
        for label, mode, key in measures:
            peak = {
                r["model"]: r[key] for r in rows if (r["seq_len"], r["mode"]) == (seq_len, mode)
            }
            if "full" not in peak or "memory" not in peak:
                continue
            store = f"{peak['memory_store']:.1f}" if "memory_store" in peak else "-"
            table.append(
                f"| {seq_len} | {label} | {peak['full']:.1f} | {peak['memory']:.1f} | "
                f"{peak['memory'] / max(peak['full'], 1e-9):.3f} | {store} |"
            )
    return table


def run_fresh(
    name: str, seq_len: int, mode: str, argv: list[str], mmap_threshold: int
) -> dict[str, float]:
    cmd = [sys.executable, __file__, *argv, "--worker", name, str(seq_len), mode]
    env = dict(os.environ)
    if mmap_threshold > 0:  # glibc: a fixed threshold returns freed big blocks to the system
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "memory.json")
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--bptt", type=int, default=2)
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        name, seq_len, mode = args.worker
        print(json.dumps(measure(name, int(seq_len), mode, args)))
        return {}
    rows = []
    for seq_len in map(int, args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            for name in args.models.split(","):
                if mode == "infer" and name == "memory_store":
                    continue  # recomputation only changes what backward keeps
                res = run_fresh(name, seq_len, mode, argv, args.mmap_threshold)
                rows.append({"model": name, "seq_len": seq_len, "mode": mode, **res})
                print(
                    f"{name:>12} {seq_len:5d} {mode:>5}: {res['peak_mib']:8.1f} MiB "
                    f"{res['seconds']:6.1f} s",
                    flush=True,
                )
    table = markdown_table(rows)
    print("\n".join(table))
    report = {
        "device": args.device,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
