"""benchmarks/rsd_step_speed.py's cost dial: the RSD step at 1, 2 and 3 KxK branches per block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def speed():
    with benchmark_module("rsd_step_speed") as module:
        yield module


def test_the_dial_times_every_branch_count_against_the_plain_step(speed, tmp_path):
    name = str(tmp_path / "dial")  # an absolute stem: the results go there, not to benchmarks/results
    argv = ["--model", "resnet20", "--batch-size", "4", "--input-size", "8", "--num-classes", "10",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--kxk-branches", "1,2,3", "--name", name]
    assert speed.main(argv) == 0
    r = json.loads(Path(f"{name}.json").read_text())
    rows = r["by_kxk_branches"]
    assert list(rows) == ["1", "2", "3"]
    # Each KxK branch adds the same convolution work: the FLOP ratio rises by equal steps, and
    # even one branch (plus Kx1, 1xK, two passes, 3B rows) costs more than the plain step.
    f = [rows[k]["flop_ratio"] for k in ("1", "2", "3")]
    assert 1 < f[0] < f[1] < f[2] and f[2] - f[1] == pytest.approx(f[1] - f[0], rel=0.05)
    assert all(v["expected_s"] > 0 and v["ratio"] == pytest.approx(v["expected_s"] / r["plain_step_s"], rel=0.02)
               for v in rows.values())
    assert "| RSD, 1 KxK branch |" in Path(f"{name}.md").read_text()


@pytest.mark.parametrize("bad", ["0", "1,1", "4", "2,5"])
def test_bad_branch_counts_are_refused(speed, bad, capsys):
    assert speed.main(["--kxk-branches", bad]) == 2
    assert capsys.readouterr().err.startswith("error: --kxk-branches")
