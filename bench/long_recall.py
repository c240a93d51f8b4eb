"""Synthetic long-range recall: can a key-value pair seen a thousand tokens ago be recalled?

Each sequence starts with ``--pairs`` key-value pairs ``k v`` at random places in its first
segment, then random filler tokens, and ends with one query ``Q k`` per pair (in random order),
whose next token must be the pair's value. Loss and accuracy count only those value tokens, so
chance is 1/16 (16 values). Three models of the same size train on the same batches for the same
steps, with the same curriculum over the number of segments (as RMT's, ``--curriculum``):

- ``memory``: ``GLMDecoder`` with memory (segments of ``--segment-len``, carried memory slots);
- ``no_memory``: the same model with ``memory.carry=False`` (independent segments);
- ``full``: ``GLMDecoder`` without memory: full causal attention over the whole sequence.

Default: 1024 tokens in 16 segments of 64, 800 steps of batch 8; ``--quick``: 512 tokens, same
steps. Longer sequences (``--seq-len 8192``) or segments (``--segment-len 256``) need more steps
than the defaults (docs/MEMORY.md).

    PYTHONPATH=. python bench/long_recall.py [--quick] [--seq-len 8192] [--out outputs/bench]

writes ``long_recall.json`` and ``long_recall.png`` (accuracy vs steps) to ``--out``
(``long_recall_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.config import DecoderConfig, MemoryConfig
from autoglm_phone.models.glm import GLMDecoder

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


@dataclass
class RecallTask:
    """Token layout: 0 pad, 1 query marker, then keys, values and filler tokens."""

    seq_len: int = 2048
    segment_len: int = 256
    pairs: int = 2
    keys: int = 16
    values: int = 16
    filler: int = 32

    QUERY = 1

    @property
    def vocab_size(self) -> int:
        return 2 + self.keys + self.values + self.filler

    def batch(
        self, batch_size: int, gen: torch.Generator, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, T)`` and next-token targets ``(B, T)``, ``IGNORE`` except on values."""
        b, t, n = batch_size, seq_len or self.seq_len, self.pairs
        k0, v0, f0 = 2, 2 + self.keys, 2 + self.keys + self.values
        ids = torch.randint(f0, f0 + self.filler, (b, t), generator=gen)
        targets = torch.full((b, t), IGNORE)
        keys = torch.argsort(torch.rand(b, self.keys, generator=gen), dim=1)[:, :n] + k0  # (B, n)
        vals = torch.randint(v0, v0 + self.values, (b, n), generator=gen)
        # pairs at distinct even offsets inside the first segment
        where = torch.argsort(torch.rand(b, self.segment_len // 2, generator=gen), dim=1)[:, :n] * 2
        rows = torch.arange(b)[:, None]
        ids[rows, where], ids[rows, where + 1] = keys, vals
        # queries "Q k v" at the very end, pairs in random order
        order = torch.argsort(torch.rand(b, n, generator=gen), dim=1)
        q = t - 3 * n + 3 * torch.arange(n)  # (n,) query marker positions
        ids[:, q], ids[:, q + 1] = self.QUERY, keys.gather(1, order)
        ids[:, q + 2] = vals.gather(1, order)
        targets[:, q + 1] = ids[:, q + 2]  # logits at the key predict the value
        return ids, targets


def build_models(task: RecallTask, args: argparse.Namespace) -> dict[str, nn.Module]:
    mem = MemoryConfig(
        enabled=True,
        segment_len=task.segment_len,
        num_slots=args.slots,
        bptt_segments=args.bptt or math.ceil(task.seq_len / task.segment_len),
        read_bias=args.read_bias,
        write_bias=args.write_bias,
        gate_bias=args.gate_bias,
        chrono_segments=args.chrono,
    )
    cfg = DecoderConfig(
        vocab_size=task.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads // 2,
        max_seq_len=max([task.seq_len, *args.eval_lens]),
        memory=mem,
    )
    models = {}
    torch.manual_seed(args.seed)
    models["memory"] = GLMDecoder(cfg)
    for name, change in (("no_memory", {"carry": False}), ("full", {"enabled": False})):
        other = DecoderConfig(**{**asdict(cfg), "memory": {**asdict(mem), **change}})
        models[name] = GLMDecoder(other)
        models[name].load_state_dict(models["memory"].state_dict(), strict=False)  # same init
    return models


def seq_len_at(step: int, task: RecallTask, args: argparse.Namespace) -> int:
    """Curriculum over the number of segments (as RMT's): the first half of the first
    ``--curriculum`` fraction of the steps at 2 segments, the second half growing linearly to
    the full length, then the full length."""
    full = math.ceil(task.seq_len / task.segment_len)
    hold = args.curriculum * args.steps / 2
    if step >= 2 * hold or full <= 2:
        return task.seq_len
    grown = 2 + int((full - 1) * max(0.0, step - hold) / hold)
    return min(task.seq_len, grown * task.segment_len)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    model.eval()
    hits = total = loss = 0.0
    for ids, targets in data:
        logits = model(ids)  # (B, T, V)
        keep = targets != IGNORE
        hits += (logits[keep].argmax(-1) == targets[keep]).sum().item()
        loss += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        total += keep.sum().item()
    model.train()
    return {"accuracy": hits / total, "loss": loss / total}


def train(
    name: str, model: nn.Module, task: RecallTask, args: argparse.Namespace
) -> dict[str, object]:
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every model
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    eval_data = [task.batch(args.batch, eval_gen) for _ in range(args.eval_batches)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    curve, start, cpu_start = [], time.perf_counter(), time.process_time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, eval_data)
            curve.append({"step": step, **metrics})
            elapsed = time.perf_counter() - start
            print(
                f"{name:>9} step {step:4d}  acc {metrics['accuracy']:.3f}  "
                f"loss {metrics['loss']:.3f}  {elapsed:.0f}s",
                flush=True,
            )
        if step == args.steps:
            break
        ids, targets = task.batch(args.batch, gen, seq_len_at(step, task, args))
        logits = model(ids)  # (B, T, V)
        keep = targets != IGNORE
        loss = F.cross_entropy(logits[keep], targets[keep])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {
        "final_accuracy": curve[-1]["accuracy"],
        "best_accuracy": max(c["accuracy"] for c in curve),
        "final_loss": curve[-1]["loss"],
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - cpu_start,  # robust to a busy machine
        "params": sum(p.numel() for p in model.parameters()),
        "curve": curve,
    }


def plot(results: dict[str, dict], chance: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        steps = [c["step"] for c in res["curve"]]
        ax.plot(steps, [c["accuracy"] for c in res["curve"]], marker="o", ms=3, label=name)
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set(xlabel="training step", ylabel="recall accuracy", ylim=(0, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller, faster version")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024)")
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--read-bias", type=float, default=None, help="memory logit bias at init")
    p.add_argument("--write-bias", type=float, default=None, help="own-chunk write bias at init")
    p.add_argument("--gate-bias", type=float, default=None, help="write keep-gate bias at init")
    p.add_argument(
        "--chrono", type=int, default=0, help="chrono init of the keep-gate over N segments"
    )
    p.add_argument("--bptt", type=int, default=0, help="bptt_segments; 0: all the segments")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--filler", type=int, default=32, help="distinct filler tokens")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--curriculum", type=float, default=0.75, help="fraction of steps before the full length"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--models", default="memory,no_memory,full")
    p.add_argument(
        "--eval-lens",
        default="",
        help="comma-separated longer lengths to evaluate the trained models at, e.g. 4096,8192",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 cores)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--name", default=None, help="file stem of the JSON/PNG written to --out")
    p.add_argument("--save", action="store_true", help="also write each model's weights (.pt)")
    p.add_argument(
        "--load", default=None, help="evaluate saved weights (--save's {name}_{model}.pt stem)"
    )
    p.add_argument(
        "--init",
        default=None,
        help="train on from saved weights (a --save stem): RMT's staged curriculum over length",
    )
    args = p.parse_args(argv)
    if args.load and args.init:
        p.error("--load evaluates saved weights, --init trains on from them: give one")
    args.seq_len = args.seq_len or (512 if args.quick else 1024)
    args.steps = args.steps or 800
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    args.eval_lens = [int(n) for n in args.eval_lens.split(",") if n]
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = RecallTask(
        seq_len=args.seq_len, segment_len=args.segment_len, pairs=args.pairs, filler=args.filler
    )
    models = build_models(task, args)
    results = {}
    stem = args.name or ("long_recall_quick" if args.quick else "long_recall")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if args.load:  # no training: the weights a --save run wrote
            path = args.out / f"{args.load}_{name}.pt"
            models[name].load_state_dict(torch.load(path, weights_only=True))
            results[name] = {"loaded": str(path)}
            continue
        if args.init:  # the previous stage of the curriculum (a shorter length)
            path = args.out / f"{args.init}_{name}.pt"
            models[name].load_state_dict(torch.load(path, weights_only=True))
        results[name] = train(name, models[name], task, args)
        if args.init:
            results[name]["init"] = path.name
        if args.save:  # to re-evaluate later, e.g. at other lengths
            torch.save(models[name].state_dict(), args.out / f"{stem}_{name}.pt")
    # length generalisation: the trained models on longer sequences than they were trained on
    for length in args.eval_lens:
        gen = torch.Generator().manual_seed(args.seed + 3)
        data = [task.batch(args.batch, gen, length) for _ in range(args.eval_batches)]
        for name, res in results.items():
            res.setdefault("eval_lengths", {})[str(length)] = evaluate(models[name], data)
            acc = res["eval_lengths"][str(length)]["accuracy"]
            print(f"{name:>9} at {length} tokens: acc {acc:.3f}", flush=True)
    chance = 1 / task.values
    print(
        f"\n{task.seq_len} tokens, segments of {task.segment_len}, {task.pairs} pairs, "
        f"{args.steps} steps of batch {args.batch} (chance {chance:.3f})\n"
    )
    trained = {name: res for name, res in results.items() if "loaded" not in res}
    print(
        "| model | final acc | best acc | final loss | wall s | CPU s |\n|---|---|---|---|---|---|"
    )
    for name, res in trained.items():
        print(
            f"| {name} | {res['final_accuracy']:.3f} | {res['best_accuracy']:.3f} | "
            f"{res['final_loss']:.3f} | {res['train_seconds']:.0f} | "
            f"{res['train_cpu_seconds']:.0f} |"
        )
    if args.eval_lens:
        lens = [str(n) for n in args.eval_lens]
        print(f"\nrecall at other lengths (trained at {task.seq_len} unless --load)\n")
        print("| model | " + " | ".join(lens) + " |\n|---|" + "---|" * len(lens))
        for name, res in results.items():
            accs = (f"{res['eval_lengths'][n]['accuracy']:.3f}" for n in lens)
            print(f"| {name} | " + " | ".join(accs) + " |")
    report = {
        "task": asdict(task),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "chance": chance,
        "results": results,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    title = f"recall after {task.seq_len} tokens ({task.seq_len // task.segment_len} segments)"
    if trained:
        plot(trained, chance, args.out / f"{stem}.png", title)
    print(f"wrote {args.out / stem}.json and .png")
    return report


if __name__ == "__main__":
    main()
