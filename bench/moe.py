"""Benchmark the MoE FFN: sorted dispatch vs a dense reference vs an equal-active-size SwiGLU.

    PYTHONPATH=. python bench/moe.py [--quick] [--device cpu|cuda] [--out outputs/bench/moe.json]
                                     [--dtype float32|bfloat16] [--threads N]

For each (tokens, experts, top-k) setting, times forward + backward steps of the four variants
round-robin (one warm-up step each, then the median over rounds, so load from other processes
hits all four alike):

  (a) ``dense_ref``  every expert on every token, combined with the top-k gates
                     (``MoEFeedForward.forward_dense``);
  (b) ``capacity``   sorted dispatch into a static ``(E, capacity, C)`` buffer, factor 1.25;
  (c) ``dropless``   the same dispatch sized to the busiest expert (one host sync);
  (d) ``dense_active`` a ``glm.SwiGLU`` with intermediate size ``k * F``: the MoE's active
                     expert parameters per token (the router's ``C * E`` aside),

and reports tokens/s, ratios against (a) and (d) from the same run, the bytes autograd saves
for backward (any device) and the peak allocated memory (CUDA only). It also measures the
fraction of assignments dropped at capacity factors 1.0 / 1.25 / 2.0 for randomly initialised
routers on Gaussian inputs. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from autoglm_phone.config import MoEConfig
from autoglm_phone.models.glm import SwiGLU
from autoglm_phone.models.moe import MoEFeedForward

FULL = {"hidden": 256, "ffn": 512, "settings": [(4096, 8, 1), (4096, 8, 2), (4096, 16, 2)]}
QUICK = {"hidden": 128, "ffn": 256, "settings": [(1024, 8, 1), (1024, 8, 2), (2048, 16, 2)]}
DROP_FACTORS = (1.0, 1.25, 2.0)


def saved_activation_bytes(forward: Callable[[], torch.Tensor], module: nn.Module) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in ``forward()``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_setting(
    tokens: int, experts: int, top_k: int, hidden: int, ffn: int, device: str, dtype, rounds: int
) -> list[dict]:
    """Time the four variants round-robin, so load from other processes hits them alike."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=top_k, capacity_factor=1.25)
    moe = MoEFeedForward(hidden, ffn, cfg).to(device, dtype)
    dropless = MoEFeedForward(hidden, ffn, replace(cfg, capacity_factor=0.0)).to(device, dtype)
    dropless.load_state_dict(moe.state_dict())
    dense = SwiGLU(hidden, top_k * ffn).to(device, dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    variants = {
        "dense_ref": (moe.forward_dense, moe),
        "capacity": (moe, moe),
        "dropless": (dropless, dropless),
        "dense_active": (dense, dense),
    }

    def make_step(fn: Callable, module: nn.Module) -> tuple[Callable, Callable]:
        def forward() -> torch.Tensor:
            loss = fn(x).float().square().mean()
            aux = getattr(module, "aux_loss", None)
            return loss + aux if isinstance(aux, torch.Tensor) and aux.requires_grad else loss

        def step() -> None:
            forward().backward()
            module.zero_grad(set_to_none=True)

        return forward, step

    rows, steps = {}, {}
    for name, (fn, module) in variants.items():
        forward, step = make_step(fn, module)
        steps[name] = step
        step()  # warm-up
        peak = None
        if x.device.type == "cuda":
            _sync(x.device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            _sync(x.device)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        with torch.no_grad():
            fn(x)
        rows[name] = {
            "tokens": tokens,
            "experts": experts,
            "top_k": top_k,
            "variant": name,
            "expert_gflop": expert_gflop(name, module, tokens, hidden, ffn, top_k),
            "saved_mib": saved_activation_bytes(forward, module) / 2**20,
            "peak_mib": peak,
            "times": [],
        }
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(x.device)
            start = time.perf_counter()
            step()
            _sync(x.device)
            rows[name]["times"].append(time.perf_counter() - start)
    for r in rows.values():
        r["seconds"] = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / r["seconds"]
    for r in rows.values():
        r["speed_vs_dense_ref"] = rows["dense_ref"]["seconds"] / r["seconds"]
        r["speed_vs_dense_active"] = rows["dense_active"]["seconds"] / r["seconds"]
    return list(rows.values())


def expert_gflop(name: str, module: nn.Module, tokens: int, hidden: int, ffn: int, k: int) -> float:
    """Forward + backward (3x forward) FLOPs of the expert matmuls, padding rows included."""
    if name == "dense_active":
        rows = tokens * k
    elif name == "dense_ref":
        rows = tokens * module.num_experts
    else:  # the (E, capacity, C) buffer of the last call
        rows = module.num_experts * int(module.stats["capacity"])
    return 3 * 2 * rows * 3 * hidden * ffn / 1e9


@torch.no_grad()
def drop_fractions(
    tokens: int, experts: int, top_k: int, hidden: int, device: str, seeds: int = 5
) -> dict[str, float]:
    """Mean dropped fraction of assignments over ``seeds`` random routers and inputs."""
    out = {}
    for factor in DROP_FACTORS:
        total = 0.0
        for seed in range(seeds):
            torch.manual_seed(seed)
            cfg = MoEConfig(num_experts=experts, top_k=top_k, capacity_factor=factor)
            layer = MoEFeedForward(hidden, 8, cfg).to(device)  # expert width is irrelevant here
            layer(torch.randn(tokens, hidden, device=device))
            total += layer.stats["dropped_fraction"].item()
        out[str(factor)] = total / seeds
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~1 minute on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/moe.json"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 on an oversubscribed machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    rounds = 5 if args.quick else 10
    hidden, ffn = preset["hidden"], preset["ffn"]

    rows = []
    for tokens, experts, top_k in preset["settings"]:
        rows += bench_setting(tokens, experts, top_k, hidden, ffn, args.device, dtype, rounds)
    drops = {
        f"{t},{e},{k}": drop_fractions(t, e, k, hidden, args.device)
        for t, e, k in preset["settings"]
    }

    machine = {
        "device": args.device,
        "cuda_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.machine(),
        "torch": torch.__version__,
    }
    print(f"hidden {hidden}, expert ffn {ffn}, {args.dtype}, {machine}\n")
    print(
        "| tokens | E | k | variant | expert GFLOP | ms/step | tokens/s | vs dense_ref "
        "| vs dense_active | saved MiB | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['experts']} | {r['top_k']} | {r['variant']} "
            f"| {r['expert_gflop']:.2f} | {1e3 * r['seconds']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['speed_vs_dense_ref']:.2f}x | {r['speed_vs_dense_active']:.2f}x "
            f"| {r['saved_mib']:.1f} | {_fmt(r['peak_mib'], '.1f')} |"
        )
    print("\nDropped fraction of assignments, random router (mean of 5 seeds):\n")
    print("| tokens, E, k | " + " | ".join(f"factor {f}" for f in DROP_FACTORS) + " |")
    print("|---|" + "---|" * len(DROP_FACTORS))
    for key, fracs in drops.items():
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in fracs.values()) + " |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "hidden": hidden,
        "expert_ffn": ffn,
        "machine": machine,
        "throughput": rows,
        "drop_fraction": drops,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
