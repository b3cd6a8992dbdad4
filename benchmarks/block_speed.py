"""Training-step speed of the fast RSD block against the literal per-branch reference.

One step = forward, cross-entropy, backward of resnet32 in the RSD form at batch 64
(32x32 inputs) on the CPU. Three networks run in interleaved rounds (fast, reference,
plain conv+BN) so that machine drift hits all alike; we report medians and ratios.
Goal (issue 2): the fast block at least 1.3x faster than the reference.

Both RSD networks do the same floating-point work (counted with ``torch.utils.flop_counter``);
the profiler's share of convolution time in each step says how much any rearrangement of
the non-convolution work (BatchNorm, branch drop, sums) could gain at most.

    python benchmarks/block_speed.py [--rounds 30] [--threads 2] [--drop 0.2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the per-branch reference lives beside the tests

from reference import to_reference  # noqa: E402

import rsd_deploy  # noqa: E402
from rsd_deploy import set_branch_drop  # noqa: E402
from rsd_deploy.io import atomic_path, write_json  # noqa: E402
from rsd_deploy.models import create  # noqa: E402


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


#: Profiler events that are convolution arithmetic (forward and both backward products).
CONV_OPS = frozenset({"aten::mkldnn_convolution", "aten::convolution_backward",
                      "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"})


def step_gflops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        step(model, x, y)
    return counter.get_total_flops() / 1e9


def conv_share(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> float:
    """Fraction of a step's self CPU time spent in convolution kernels."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / total


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
    torch.manual_seed(0)
    fast = create(args.model, num_classes=100, form="rsd").train()
    set_branch_drop(fast, args.drop)
    nets = {
        "fast": fast,
        "reference": to_reference(fast).train(),
        "plain": create(args.model, num_classes=100, form="plain").train(),
    }
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
    share = {k: conv_share(net, x, y) for k, net in nets.items()}
    # If the fast block's non-convolution work cost nothing, its step would still take its
    # convolution time: the most it could gain over the reference.
    ceiling = med["reference"] / (med["fast"] * share["fast"])
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
        "conv_time_share": share,
        "ceiling_speedup_without_non_conv_work": ceiling,
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
        f"Convolution share of the step (profiler): fast {100 * share['fast']:.0f}%, reference "
        f"{100 * share['reference']:.0f}%, plain {100 * share['plain']:.0f}%; with every non-convolution "
        f"operation of the fast step removed it would be at most **{ceiling:.2f}x** faster than the reference\n"
    )
    stem = f"block_speed_{args.model}_b{args.batch}_drop{args.drop}" + ("_cl" if args.channels_last else "")
    write_json(args.out / f"{stem}.json", result)
    with atomic_path(args.out / f"{stem}.md") as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
