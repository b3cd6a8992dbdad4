"""Training-step speed of the fast RSD block against the literal per-branch reference.

One step = forward, cross-entropy, backward of resnet32 in the RSD form at batch 64
(32x32 inputs) on the CPU. The networks run in interleaved rounds so that machine drift
hits all alike; we report medians and ratios. Goal (issue 2): the fast block at least
1.3x faster than the reference.

* fast: the library's RSDConv (stacked convolutions, fused BN + drop + sum);
* reference: the literal per-branch block (tests/reference.py);
* conv_only: the fast network with each block reduced to its three convolutions and
  the sum of their outputs, no BatchNorm and no drop. It does the same convolutions as
  the fast block and nothing else the method needs, so its step time bounds what any
  implementation built on these convolutions can reach;
* conv_stats: conv_only plus the one read of every branch output that BatchNorm's batch
  statistics need (computed exactly as the fused op does), without normalising,
  dropping or BN's backward: a tighter bound;
* plain: the conv+BN network the RSD form trains in place of.

Both RSD networks do the same floating-point work (counted with ``torch.utils.flop_counter``).

    python benchmarks/block_speed.py [--rounds 30] [--threads 2] [--drop 0.2]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the per-branch reference lives beside the tests

import rsd_deploy  # noqa: E402
from reference import to_reference  # noqa: E402
from rsd_deploy import RSDConv, set_branch_drop  # noqa: E402
from rsd_deploy.branch_norm import _branch_view, _moments  # noqa: E402
from rsd_deploy.io import atomic_path, write_json  # noqa: E402
from rsd_deploy.models import create  # noqa: E402


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def step_gflops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        step(model, x, y)
    return counter.get_total_flops() / 1e9


def _branch_sum(block: RSDConv, parts: list[torch.Tensor]) -> torch.Tensor:
    square, vertical, horizontal = parts
    return sum(square.split(block.out_channels, dim=1), vertical + horizontal)


def _convolutions_and_sum(block: RSDConv, x: torch.Tensor) -> torch.Tensor:
    return _branch_sum(block, block._conv_outputs(x, None))  # the fast block's own convs


def _convolutions_statistics_and_sum(block: RSDConv, x: torch.Tensor) -> torch.Tensor:
    parts = block._conv_outputs(x, None)
    with torch.no_grad():  # the batch statistics, computed exactly as the fused op does
        _moments([_branch_view(z, block.groups, block.out_channels) for z in parts])
    return _branch_sum(block, parts)


def bound_network(model: torch.nn.Module, forward) -> torch.nn.Module:
    """A copy of ``model`` whose RSD blocks run ``forward`` (a bound: no BN, no drop)."""
    bound = copy.deepcopy(model)
    for m in bound.modules():
        if isinstance(m, RSDConv):
            m.forward = types.MethodType(forward, m)
    return bound


def networks(model: str, drop: float) -> dict[str, torch.nn.Module]:
    """The five networks compared, in training mode: fast, reference, the two bounds, plain."""
    torch.manual_seed(0)
    fast = create(model, num_classes=100, form="rsd").train()
    set_branch_drop(fast, drop)
    return {
        "fast": fast,
        "reference": to_reference(fast).train(),
        "conv_only": bound_network(fast, _convolutions_and_sum).train(),
        "conv_stats": bound_network(fast, _convolutions_statistics_and_sum).train(),
        "plain": create(model, num_classes=100, form="plain").train(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drop", type=float, default=0.2, help="branch-drop rate (student pass)")
    ap.add_argument("--channels-last", action="store_true",
                    help="feed every network channels-last inputs (oneDNN's faster layout on CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    nets = networks(args.model, args.drop)
    x = torch.randn(args.batch, 3, 32, 32)
    layout = "channels_last" if args.channels_last else "nchw"
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(args.warmup + args.rounds):
        for name, net in nets.items():
            t = step(net, x, y)
            if r >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    gflops = {k: step_gflops(net, x, y) for k, net in nets.items()}
    bound = med["reference"] / med["conv_only"]
    bound_stats = med["reference"] / med["conv_stats"]
    result = {
        "benchmark": "rsd block training step (forward + backward)",
        "model": args.model,
        "batch": args.batch,
        "drop_rate": args.drop,
        "layout": layout,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "rsd_deploy": rsd_deploy.__version__},
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "speedup_fast_vs_reference": med["reference"] / med["fast"],
        "ratio_rsd_fast_vs_plain": med["fast"] / med["plain"],
        "ratio_rsd_reference_vs_plain": med["reference"] / med["plain"],
        "goal_speedup": 1.3,
        "step_gflops": gflops,
        "bound_speedup_conv_only_vs_reference": bound,
        "bound_speedup_conv_stats_vs_reference": bound_stats,
        "times_s": times,
    }
    result["goal_met"] = result["speedup_fast_vs_reference"] >= 1.3
    md = (
        f"# RSD block speed: {args.model}, batch {args.batch}, {args.threads} threads, drop {args.drop}, "
        f"{layout} inputs\n\n"
        "| network | median step (ms) | min (ms) |\n|---|---:|---:|\n"
        + "".join(f"| {k} | {med[k] * 1e3:.1f} | {min(times[k]) * 1e3:.1f} |\n" for k in nets)
        + f"\nfast vs per-branch reference: **{result['speedup_fast_vs_reference']:.2f}x faster** "
        f"(goal >= 1.3x: {'met' if result['goal_met'] else 'NOT met'})  \n"
        f"RSD training form / plain conv+BN: fast {result['ratio_rsd_fast_vs_plain']:.2f}x, "
        f"reference {result['ratio_rsd_reference_vs_plain']:.2f}x  \n"
        f"FLOPs per step (forward + backward): fast {gflops['fast']:.1f} G, reference "
        f"{gflops['reference']:.1f} G, plain {gflops['plain']:.1f} G ({gflops['fast'] / gflops['plain']:.2f}x)  \n"
        f"Bound: the same convolutions and the branch sum alone (conv_only, no BN, no drop) are "
        f"**{bound:.2f}x** faster than the reference, and **{bound_stats:.2f}x** with the one read of the "
        f"branch outputs that batch statistics need (conv_stats); the fast block reaches "
        f"{100 * (med['reference'] / med['fast'] - 1) / max(bound - 1, 1e-9):.0f}% of the first headroom\n"
    )
    stem = f"block_speed_{args.model}_b{args.batch}_drop{args.drop}" + ("_cl" if args.channels_last else "")
    write_json(args.out / f"{stem}.json", result)
    with atomic_path(args.out / f"{stem}.md") as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
