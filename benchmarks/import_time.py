"""Import time of ``import rsd_deploy`` for two checkouts, side by side, in fresh interpreters.

    python benchmarks/import_time.py BEFORE_ROOT AFTER_ROOT [--runs 5]

Runs are interleaved (before, after, before, ...) so machine load hits both alike.
Per run: the cumulative time ``python -X importtime`` reports for ``rsd_deploy``,
and the wall clock of the whole interpreter; medians and ranges are printed as
a Markdown table, with the optional modules each checkout loaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

OPTIONAL = ("onnxruntime", "matplotlib", "sklearn", "tensorrt", "onnx")
CODE = f"import sys, rsd_deploy; print([m for m in {OPTIONAL!r} if m in sys.modules])"


def one_run(root: str) -> tuple[float, float, str]:
    """``(importtime ms, wall ms, optional modules loaded)`` of one fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", CODE], env=env,
                         capture_output=True, text=True, check=True)
    wall = (time.perf_counter() - start) * 1e3
    line = next(ln for ln in out.stderr.splitlines() if ln.rstrip().endswith("| rsd_deploy"))
    return int(line.split("|")[1]) / 1e3, wall, out.stdout.strip()


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, str]]] = {"before": [], "after": []}
    for _ in range(args.runs):
        for key in results:
            results[key].append(one_run(getattr(args, key)))
    print("| code | `import rsd_deploy`, -X importtime (ms): median (min-max) "
          "| interpreter wall (ms): median (min-max) | optional modules loaded |")
    print("|---|---|---|---|")
    for key, runs in results.items():
        imp, wall = ([r[i] for r in runs] for i in (0, 1))
        print(f"| {key} ({getattr(args, key)}) | {_cell(imp)} | {_cell(wall)} | {runs[-1][2]} |")


if __name__ == "__main__":
    main()
