"""Benchmark the MoE FFN: sorted dispatch vs a dense reference vs an equal-active-size SwiGLU,
and against transformers' ``MixtralSparseMoeBlock`` holding the same weights.

    PYTHONPATH=. python bench/moe.py [--quick] [--device cpu|cuda] [--out outputs/bench/moe.json]
                                     [--dtype float32|bfloat16] [--threads N]
                                     [--part all|variants|mixtral]

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
routers on Gaussian inputs.

The Mixtral comparison (hidden 512, expert FFN 1408, 8 experts, top-2, 2048 tokens; 1024 with
``--quick``) times forward + backward (input gradient included) of our layer in each mode and
dispatch (capacity 1.25 and dropless; ``auto``, which sorts on CPU, and ``static``, the export
path) and of the block with transformers' ``eager`` and ``grouped_mm`` experts, after checking
that every output matches the block's. The variants run interleaved, in a rotated order each
round; a ratio is the median over rounds of the block's time over ours in the same round.
Prints markdown tables and writes JSON.
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
from autoglm_phone.models.convert import mixtral_moe_block
from autoglm_phone.models.glm import SwiGLU
from autoglm_phone.models.moe import MoEFeedForward

FULL = {"hidden": 256, "ffn": 512, "settings": [(4096, 8, 1), (4096, 8, 2), (4096, 16, 2)]}
QUICK = {"hidden": 128, "ffn": 256, "settings": [(1024, 8, 1), (1024, 8, 2), (2048, 16, 2)]}
DROP_FACTORS = (1.0, 1.25, 2.0)
# transformers' MixtralSparseMoeBlock at the sizes of issue 16 (the first Mixtral-like MoE width)
MIXTRAL = {"hidden": 512, "ffn": 1408, "experts": 8, "top_k": 2, "tokens": 2048}
MIXTRAL_QUICK = {**MIXTRAL, "tokens": 1024}
OURS = {  # name: (capacity factor, dispatch)
    "capacity": (1.25, "auto"),
    "dropless": (0.0, "auto"),
    "capacity_static": (1.25, "static"),
    "dropless_static": (0.0, "static"),
}
MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm")


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

    rows, steps = {}, {}
    for name, (fn, module) in variants.items():
        forward, step = make_step(fn, module, x)
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
            "expert_gflop": expert_gflop(name, module, x, ffn, top_k),
            "saved_mib": saved_activation_bytes(forward, module) / 2**20,
            "peak_mib": peak,
            "times": [],
        }
    for name, times in round_robin(steps, rounds, x.device).items():
        rows[name]["times"] = times
    for r in rows.values():
        r["seconds"] = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / r["seconds"]
    for r in rows.values():
        r["speed_vs_dense_ref"] = rows["dense_ref"]["seconds"] / r["seconds"]
        r["speed_vs_dense_active"] = rows["dense_active"]["seconds"] / r["seconds"]
    return list(rows.values())


def make_step(fn: Callable, module: nn.Module, x: torch.Tensor) -> tuple[Callable, Callable]:
    """``forward()`` (the loss: mean square output, plus the router losses where they have a
    gradient) and ``step()``: forward + backward, then gradients cleared."""

    def forward() -> torch.Tensor:
        loss = fn(x).float().square().mean()
        aux = getattr(module, "aux_loss", None)
        return loss + aux if isinstance(aux, torch.Tensor) and aux.requires_grad else loss

    def step() -> None:
        forward().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return forward, step


def round_robin(
    steps: dict[str, Callable], rounds: int, device: torch.device, rotate: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each step, ``rounds`` times, interleaved so load from other processes
    hits them alike; ``rotate`` starts each round one variant later (no fixed neighbours)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)] if rotate else names:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def expert_gflop(name: str, module: nn.Module, x: torch.Tensor, ffn: int, k: int) -> float:
    """Forward + backward (3x forward) FLOPs of the expert matmuls, padding rows included."""
    tokens, hidden = x.shape
    if name == "dense_active":
        rows = tokens * k
    elif name == "dense_ref":
        rows = tokens * module.num_experts
    elif module.sorts(x):  # exactly the kept assignments
        rows = tokens * k - int(module.stats["dropped"])
    else:  # the (E, capacity, C) buffer of the last call
        rows = module.num_experts * int(module.stats["capacity"])
    return 3 * 2 * rows * 3 * hidden * ffn / 1e9


def bench_vs_mixtral(
    sizes: dict, routing: str, device: str, dtype: torch.dtype, rounds: int
) -> dict:
    """Our layer (each mode and dispatch) against ``MixtralSparseMoeBlock`` with its weights.

    ``routing="balanced"``: the freshly initialised router on Gaussian inputs (loads within ~10%);
    ``"skewed"``: inputs shifted by +0.5 and router row 0 raised by 0.05, so expert 0 is in every
    token's top-k (a collapsed router: the busiest expert holds all ``tokens`` assignments)."""
    tokens, hidden, ffn = sizes["tokens"], sizes["hidden"], sizes["ffn"]
    torch.manual_seed(0)
    modules: dict[str, nn.Module] = {}
    for name, (factor, dispatch) in OURS.items():
        cfg = MoEConfig(num_experts=sizes["experts"], top_k=sizes["top_k"])
        modules[name] = MoEFeedForward(
            hidden, ffn, replace(cfg, capacity_factor=factor), dispatch=dispatch
        ).to(device, dtype)
        if name != "capacity":
            modules[name].load_state_dict(modules["capacity"].state_dict())
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    if routing == "skewed":
        x += 0.5
        for name in OURS:
            modules[name].router.weight.data[0] += 0.05
    for impl in MIXTRAL_IMPLEMENTATIONS:
        modules[f"mixtral_{impl}"] = mixtral_moe_block(modules["dropless"], impl)
    x.requires_grad_()

    # every output checked before any timing: against the block where nothing is dropped, and
    # each static dispatch against its sorted twin (drops included)
    with torch.no_grad():
        outputs = {name: m(x) for name, m in modules.items()}
    dropped = {name: int(modules[name].stats["dropped"]) for name in OURS}
    max_diff = {n: (o - outputs["mixtral_eager"]).abs().max().item() for n, o in outputs.items()}
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for name, diff in max_diff.items():
        if dropped.get(name, 0) == 0 and not diff <= tol:
            raise AssertionError(f"{name} differs from MixtralSparseMoeBlock by {diff:.3g}")
    for name in ("capacity", "dropless"):
        diff = (outputs[f"{name}_static"] - outputs[name]).abs().max().item()
        if not diff <= tol:
            raise AssertionError(f"{name}_static differs from {name} by {diff:.3g}")

    steps = {}
    for name, module in modules.items():
        steps[name] = make_step(module, module, x)[1]
        steps[name]()  # warm-up
    times = round_robin(steps, rounds, x.device, rotate=True)
    rows = []
    for name, module in modules.items():
        ours = isinstance(module, MoEFeedForward)
        row = {
            "variant": name,
            "dispatch": ("sorted" if module.sorts(x) else "static") if ours else None,
            "dropped": dropped.get(name),
            "busiest_expert": int(module.stats["load"].max() * sizes["top_k"] * tokens)
            if ours
            else None,
            "max_abs_diff_vs_mixtral": max_diff[name],
            "times": times[name],
            "seconds": statistics.median(times[name]),
        }
        for impl in MIXTRAL_IMPLEMENTATIONS:  # per-round ratios: the load is shared within one
            ref = times[f"mixtral_{impl}"]
            ratios = [b / a for a, b in zip(times[name], ref, strict=True)]
            row[f"speed_vs_mixtral_{impl}"] = statistics.median(ratios)
            row[f"speed_vs_mixtral_{impl}_range"] = (min(ratios), max(ratios))
        rows.append(row)
    return {**sizes, "routing": routing, "rounds": rounds, "rows": rows}


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
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, ~3 minutes on a loaded 2-core CPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/moe.json"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 on an oversubscribed machine)"
    )
    parser.add_argument(
        "--part",
        default="all",
        choices=["all", "variants", "mixtral"],
        help="the dense/dispatch variants, the MixtralSparseMoeBlock comparison, or both",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    rounds = 5 if args.quick else 10
    hidden, ffn = preset["hidden"], preset["ffn"]

    rows, drops, mixtral = [], {}, None
    if args.part in ("all", "variants"):
        for tokens, experts, top_k in preset["settings"]:
            rows += bench_setting(tokens, experts, top_k, hidden, ffn, args.device, dtype, rounds)
        drops = {
            f"{t},{e},{k}": drop_fractions(t, e, k, hidden, args.device)
            for t, e, k in preset["settings"]
        }
    if args.part in ("all", "mixtral"):
        sizes = MIXTRAL_QUICK if args.quick else MIXTRAL
        mixtral = [
            bench_vs_mixtral(sizes, routing, args.device, dtype, rounds=5 if args.quick else 9)
            for routing in ("balanced", "skewed")
        ]

    machine = {
        "device": args.device,
        "cuda_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.machine(),
        "torch": torch.__version__,
    }
    print(f"{args.dtype}, {machine}\n")
    if rows:
        print_variants(rows, drops, hidden, ffn)
    for result in mixtral or []:
        print_mixtral(result)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "hidden": hidden,
        "expert_ffn": ffn,
        "machine": machine,
        "throughput": rows,
        "drop_fraction": drops,
        "vs_mixtral": mixtral,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def print_variants(rows: list[dict], drops: dict, hidden: int, ffn: int) -> None:
    print(f"hidden {hidden}, expert ffn {ffn}\n")
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


def print_mixtral(result: dict) -> None:
    print(
        f"\nvs transformers' MixtralSparseMoeBlock: hidden {result['hidden']}, expert ffn "
        f"{result['ffn']}, E={result['experts']}, k={result['top_k']}, {result['tokens']} tokens, "
        f"{result['routing']} routing, forward + backward, median of {result['rounds']} "
        "interleaved rounds "
        "(speed = block time / ours, per round; min-max in brackets)\n"
    )
    print(
        "| variant | dispatch | busiest expert | dropped | max abs diff | ms/step "
        "| vs mixtral eager | vs mixtral grouped_mm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        speeds = [
            f"{r[f'speed_vs_mixtral_{i}']:.2f}x ({r[f'speed_vs_mixtral_{i}_range'][0]:.2f}-"
            f"{r[f'speed_vs_mixtral_{i}_range'][1]:.2f})"
            for i in MIXTRAL_IMPLEMENTATIONS
        ]
        print(
            f"| {r['variant']} | {r['dispatch'] or 'n/a'} | {_fmt(r['busiest_expert'], 'd')} "
            f"| {_fmt(r['dropped'], 'd')} "
            f"| {r['max_abs_diff_vs_mixtral']:.1e} | {1e3 * r['seconds']:.0f} | "
            + " | ".join(speeds)
            + " |"
        )


if __name__ == "__main__":
    main()
