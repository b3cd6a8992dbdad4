"""Cost of one full RSD training step against a plain conv+BN step of the same network.

One *step* is everything an optimizer step needs: forward, loss, backward, SGD update.
The RSD step is :class:`rsd_deploy.training.RSDStep` on the multi-branch form (student
pass with branch drop, teacher pass with the feature mixture on 3B rows after the mix
point, the six-term loss); the plain step is cross-entropy on the conv+BN form.

The cost of an RSD step depends on where the mixture falls (after the stem the teacher
runs the whole network on 3B rows; after the last stage only the head does), and the
mix point is drawn uniformly each step. So the RSD step is timed at every mix point, with
that point fixed, and the expected step is the mean over points of the per-point medians:
the same expectation as random draws, without their variance. All kinds are timed
interleaved (plain, point 0, point 1, ..., plain, ...) so machine noise hits them alike.
Floating-point operations of each step (forward and backward, counted by
``torch.utils.flop_counter``) give the ratio an equally efficient implementation would
reach. Goal (issue 3): at most 6x.

    python benchmarks/rsd_step_speed.py                  # resnet32, batch 64, 2 threads
    python benchmarks/rsd_step_speed.py --profile        # plus where the RSD step's time goes
    # any torchvision/timm CNN, restructured, mixed at its family's default points (issue 11)
    python benchmarks/rsd_step_speed.py --model torchvision:resnet18 --batch-size 32 \
        --input-size 64 --num-classes 10 --name rsd_step_speed_tv_resnet18
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsd_deploy.bench.report import cpu_model
from rsd_deploy.complexity import count_macs
from rsd_deploy.io import atomic_path, write_json
from rsd_deploy.restructure import restructure, with_square_branches
from rsd_deploy.run import ModelSource
from rsd_deploy.training import CEStep, MixDraw, RSDStep

RESULTS = Path(__file__).resolve().parent / "results"


def make_step(model_name: str, method: str, num_classes: int, x: torch.Tensor, y: torch.Tensor,
              kxk_branches: int = 3):
    """The model and a closure running one optimizer step; RSD steps take the mix point.

    The model and the mixture's permutation live on ``x``'s device; ``kxk_branches`` is the
    RSD form's KxK branches per block (``--kxk-branches`` of train).
    """
    torch.manual_seed(0)
    source = ModelSource.from_json(model_name)
    plain = source.create(num_classes=num_classes, in_channels=3, form="plain")
    if method != "rsd":
        model, step = plain, CEStep(plain)
    elif source.kind == "zoo":
        model = with_square_branches(source.create(num_classes=num_classes, in_channels=3, form="rsd"),
                                     kxk_branches)
        step = RSDStep(model)
    else:  # restructured, mixed at the family's default points
        model, _ = restructure(plain, num_square=kxk_branches)
        step = RSDStep(model, mix_points=source.default_mix_points(model, x.shape[-1]))
    model = model.train().to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1)).to(x.device)

    def run(point: int | None = None) -> None:
        opt.zero_grad(set_to_none=True)
        out = step(x, y) if point is None else step(x, y, draw=MixDraw(point, 0.5, idx))
        out.loss.backward()
        opt.step()

    run.step = step
    return model, run


def step_flops(run, point: int | None = None) -> int:
    """Floating-point operations (forward and backward) of one step."""
    with FlopCounterMode(display=False) as counter:
        run(point)
    return counter.get_total_flops()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_rsd(run, points: int, top: int = 8) -> list[dict]:
    """Self CPU time of the most expensive operators over one RSD step at each mix point."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for point in range(points):
            run(point)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
             "ms_per_step": round(e.self_cpu_time_total / 1000 / points, 1)} for e in events[:top]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also record the RSD step's top operators")
    p.add_argument("--name", default="rsd_step_speed", help="result file stem")
    p.add_argument("--kxk-branches", default="3",
                   help="KxK branches per block, or a list timed side by side (e.g. 1,2,3: the cost dial) [3]")
    args = p.parse_args(argv)
    counts = [int(k) for k in args.kxk_branches.split(",") if k.strip()]
    if not counts or any(k not in (1, 2, 3) for k in counts) or len(set(counts)) != len(counts):
        print(f"error: --kxk-branches takes distinct values of 1, 2, 3 (got {args.kxk_branches!r})", file=sys.stderr)
        return 2
    if len(counts) > 1:
        return dial(args, counts)

    torch.set_num_threads(args.threads)
    zoo = ModelSource.from_json(args.model).kind == "zoo"
    g = torch.Generator().manual_seed(0)
    s = args.input_size
    x = torch.randn(args.batch_size, 3, s, s, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    plain_model, plain = make_step(args.model, "baseline", args.num_classes, x, y)
    rsd_model, rsd = make_step(args.model, "rsd", args.num_classes, x, y, counts[0])
    names = rsd.step.mix_points
    points = list(range(len(names)))
    flops_plain = step_flops(plain)
    flops_rsd = [step_flops(rsd, q) for q in points]
    for _ in range(args.warmup):
        plain()
        for q in points:
            rsd(q)
    t_plain, t_rsd = [], {q: [] for q in points}
    for i in range(args.repeats):
        t_plain.append(timed(plain))
        for q in points:
            t_rsd[q].append(timed(lambda q=q: rsd(q)))
        print(f"  {i + 1}/{args.repeats}: plain {t_plain[-1]:.3f}s  rsd at points "
              + " ".join(f"{t_rsd[q][-1]:.3f}s" for q in points), flush=True)
    med_plain = statistics.median(t_plain)
    med_point = {q: statistics.median(t_rsd[q]) for q in points}
    med_rsd = statistics.mean(med_point.values())  # uniform draw of the mix point
    flops_expected = statistics.mean(flops_rsd)  # uniform draw of the mix point
    flop_ratio = flops_expected / flops_plain
    macs_plain = count_macs(plain_model, (3, s, s))
    macs_rsd = count_macs(rsd_model, (3, s, s))
    result = {
        "benchmark": "rsd_step_speed", "model": args.model, "kxk_branches": counts[0], "batch_size": args.batch_size,
        "input_size": s, "num_classes": args.num_classes, "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "plain_step_s": {"median": round(med_plain, 4), "all": [round(t, 4) for t in t_plain]},
        "rsd_step_s": {"expected": round(med_rsd, 4),
                       "by_mix_point": {str(q): {"median": round(med_point[q], 4),
                                                 "all": [round(t, 4) for t in t_rsd[q]]} for q in points}},
        "mix_points": list(names),
        "ratio": round(med_rsd / med_plain, 2), "goal": 6.0 if zoo else None,
        "step_gflops": {"plain": round(flops_plain / 1e9, 2),
                        "rsd_by_mix_point": {str(q): round(f / 1e9, 2) for q, f in zip(points, flops_rsd, strict=True)},
                        "rsd_expected": round(flops_expected / 1e9, 2)},
        "flop_ratio": round(flop_ratio, 2),
        "forward_macs_per_image": {"plain": macs_plain, "rsd_block_maths": macs_rsd,
                                   "block_ratio": round(macs_rsd / macs_plain, 2)},
        "machine": f"{cpu_model()} ({platform.machine()})",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.profile:
        result["rsd_top_ops"] = profile_rsd(rsd, len(points))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", result)
    md = [
        f"# RSD step vs plain step: {args.model}, batch {args.batch_size}, {s}x{s}, "
        f"{result['threads']} threads",
        "",
        "| step | median (s) | x plain | GFLOP (fwd+bwd) | x plain |",
        "|---|---:|---:|---:|---:|",
        f"| plain conv+BN (CE) | {med_plain:.3f} | 1.00 | {flops_plain / 1e9:.1f} | 1.00 |",
    ]
    md += [f"| RSD, mixture after `{names[q]}` (point {q}) | {med_point[q]:.3f} | "
           f"{med_point[q] / med_plain:.2f} | {flops_rsd[q] / 1e9:.1f} | {flops_rsd[q] / flops_plain:.2f} |"
           for q in points]
    md += [
        f"| **RSD, expected (uniform mix point)** | **{med_rsd:.3f}** | **{med_rsd / med_plain:.2f}** | "
        f"{flops_expected / 1e9:.1f} | {flop_ratio:.2f} |",
        "",
        f"**Ratio: {result['ratio']:.2f}x** "
        + (f"(goal <= 6x: {'met' if result['ratio'] <= 6 else 'NOT met'}; the paper's code: 10-13x). "
           if zoo else "")
        + f"The step's arithmetic alone is {flop_ratio:.2f}x a plain step "
        f"({min(flops_rsd) / flops_plain:.2f}x even at the cheapest mix point), so an implementation as "
        f"efficient per FLOP as the plain step would take {flop_ratio:.1f}x. "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up steps each; "
        f"recorded {result['date']} on {result['machine']}, torch {torch.__version__}.",
    ]
    if args.profile:
        md += ["", "Where the RSD step's time goes (self CPU time, one step at each mix point):", "",
               "| operator | share | ms/step |", "|---|---|---|"]
        md += [f"| {o['op']} | {100 * o['share']:.1f}% | {o['ms_per_step']} |" for o in result["rsd_top_ops"]]
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def dial(args: argparse.Namespace, counts: list[int]) -> int:
    """The RSD step at each KxK-branch count against the plain step, all in the same interleaved rounds."""
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s = args.input_size
    x = torch.randn(args.batch_size, 3, s, s, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    _, plain = make_step(args.model, "baseline", args.num_classes, x, y)
    steps = {k: make_step(args.model, "rsd", args.num_classes, x, y, k)[1] for k in counts}
    points = list(range(len(steps[counts[0]].step.mix_points)))
    flops_plain = step_flops(plain)
    flops = {k: statistics.mean(step_flops(steps[k], q) for q in points) for k in counts}
    for _ in range(args.warmup):
        plain()
        for k in counts:
            for q in points:
                steps[k](q)
    t_plain, t = [], {k: {q: [] for q in points} for k in counts}
    for i in range(args.repeats):
        t_plain.append(timed(plain))
        for k in counts:
            for q in points:
                t[k][q].append(timed(lambda k=k, q=q: steps[k](q)))
        print(f"  {i + 1}/{args.repeats}: plain {t_plain[-1]:.3f}s  " + "  ".join(
            f"k={k} {statistics.mean(t[k][q][-1] for q in points):.3f}s" for k in counts), flush=True)
    med_plain = statistics.median(t_plain)
    rows = {str(k): {"expected_s": round(statistics.mean(statistics.median(t[k][q]) for q in points), 4),
                     "gflops": round(flops[k] / 1e9, 2), "flop_ratio": round(flops[k] / flops_plain, 2)} for k in counts}
    for r in rows.values():
        r["ratio"] = round(r["expected_s"] / med_plain, 2)
    result = {"benchmark": "rsd_step_speed_dial", "model": args.model, "batch_size": args.batch_size,
              "input_size": s, "num_classes": args.num_classes, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "plain_step_s": round(med_plain, 4), "by_kxk_branches": rows,
              "machine": f"{cpu_model()} ({platform.machine()})", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", result)
    md = [f"# RSD step by KxK branches per block: {args.model}, batch {args.batch_size}, {s}x{s}, "
          f"{result['threads']} threads", "",
          "| step | expected s (uniform mix point) | x plain | GFLOP (fwd+bwd) | x plain |", "|---|---:|---:|---:|---:|",
          f"| plain conv+BN (CE) | {med_plain:.3f} | 1.00 | {flops_plain / 1e9:.1f} | 1.00 |"]
    md += [f"| RSD, {k} KxK branch{'es' if k > 1 else ''} | {r['expected_s']:.3f} | {r['ratio']:.2f} | "
           f"{r['gflops']:.1f} | {r['flop_ratio']:.2f} |" for k, r in ((int(k), r) for k, r in rows.items())]
    md += ["", f"{args.repeats} interleaved rounds after {args.warmup} warm-up steps, every mix point each round; "
           f"recorded {result['date']} on {result['machine']}, torch {torch.__version__}."]
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
