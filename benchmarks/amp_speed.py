"""What bfloat16 autocast (``--amp`` on a CPU with bf16 instructions) gains per training step.

The plain conv+BN step and the RSD step (at every mix point; the expected step is the mean
of the per-point medians, as in ``rsd_step_speed.py``) are each timed in float32 and under
bfloat16 autocast, all kinds interleaved so machine noise hits them alike. Optionally
(``--train``) both methods are also trained on digits with and without ``--amp`` (same
seed and recipe) to show whether accuracy holds.

    python benchmarks/amp_speed.py                 # resnet32, batch 64, 2 threads
    python benchmarks/amp_speed.py --train         # plus the digits accuracy check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rsd_step_speed import make_step  # noqa: E402

from rsd_deploy.bench.report import cpu_model  # noqa: E402
from rsd_deploy.io import atomic_path, write_json  # noqa: E402
from rsd_deploy.training.evaluation import cpu_has_bf16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def time_steps(model: str, batch: int, size: int, classes: int, repeats: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    _, plain = make_step(model, "baseline", classes, x, y)
    rsd_model, rsd = make_step(model, "rsd", classes, x, y)
    points = list(range(rsd_model.num_mix_points))
    kinds = [("plain", None), *(("rsd", q) for q in points)]
    times: dict[tuple, list[float]] = {}
    for i in range(warmup + repeats):
        for amp in (False, True):
            for method, q in kinds:
                fn = plain if method == "plain" else (lambda q=q: rsd(q))
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    fn()
                if i >= warmup:
                    times.setdefault((method, q, amp), []).append(time.perf_counter() - start)
        print(f"  round {i + 1}/{warmup + repeats}", flush=True)
    out = {}
    for amp in (False, True):
        key = "bf16" if amp else "fp32"
        plain_s = statistics.median(times[("plain", None, amp)])
        rsd_s = statistics.mean(statistics.median(times[("rsd", q, amp)]) for q in points)
        out[key] = {"plain_step_s": round(plain_s, 4), "rsd_step_s": round(rsd_s, 4)}
    for method in ("plain", "rsd"):
        out[f"{method}_speedup"] = round(out["fp32"][f"{method}_step_s"] / out["bf16"][f"{method}_step_s"], 3)
    return out


def train_check(epochs: int) -> list[dict]:
    from rsd_deploy.training import TrainConfig, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("baseline", "rsd"):
            for amp in (False, True):
                config = TrainConfig(method=method, amp=amp, epochs=epochs, device="cpu").validate()
                start = time.perf_counter()
                run = train(config, Path(tmp) / f"{method}-{amp}")
                seconds = time.perf_counter() - start
                top1 = json.loads((run / "run.json").read_text())["metrics"]["val_top1"]
                rows.append({"method": method, "precision": "bf16" if amp else "fp32",
                             "val_top1": round(top1, 4), "seconds": round(seconds, 1)})
                print(f"  {method} {'bf16' if amp else 'fp32'}: top-1 {top1:.2%} in {seconds:.0f}s", flush=True)
    return rows


def markdown(r: dict) -> str:
    s = r["steps"]
    lines = [
        f"# bfloat16 autocast on the CPU: {r['model']}, batch {r['batch_size']}, {r['input_size']}px",
        "",
        f"CPU: {r['cpu']}, {r['threads']} threads, torch {r['torch']}. Median of {r['repeats']} interleaved "
        "steps; the RSD step is the mean over its mix points.",
        "",
        "| step | float32 (s) | bfloat16 autocast (s) | speed-up |",
        "|---|---|---|---|",
        f"| plain conv+BN | {s['fp32']['plain_step_s']} | {s['bf16']['plain_step_s']} | {s['plain_speedup']}x |",
        f"| RSD | {s['fp32']['rsd_step_s']} | {s['bf16']['rsd_step_s']} | {s['rsd_speedup']}x |",
    ]
    if r.get("training"):
        lines += ["", f"Accuracy on digits (resnet20, the quick start's defaults, {r['train_epochs']} epochs, seed 0):",
                  "", "| method | precision | val top-1 | seconds |", "|---|---|---|---|"]
        lines += [f"| {t['method']} | {t['precision']} | {100 * t['val_top1']:.1f} % | {t['seconds']} |"
                  for t in r["training"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train", action="store_true", help="also train both methods on digits with and without --amp")
    p.add_argument("--train-epochs", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="amp_speed")
    args = p.parse_args(argv)
    if not cpu_has_bf16():
        print("error: this CPU has no bfloat16 instructions", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = {"benchmark": "amp_speed", "model": args.model, "batch_size": args.batch_size,
              "input_size": args.input_size, "threads": args.threads, "repeats": args.repeats,
              "cpu": cpu_model(), "torch": torch.__version__,
              "steps": time_steps(args.model, args.batch_size, args.input_size, args.num_classes,
                                  args.repeats, args.warmup)}
    if args.train:
        result["train_epochs"] = args.train_epochs
        result["training"] = train_check(args.train_epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result)
    with atomic_path(args.out / f"{args.name}.md") as tmp:
        Path(tmp).write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
