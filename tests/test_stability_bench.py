"""benchmarks/stability.py on a few steps: the runaway it documents, and its compact record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "stability.py"


@pytest.fixture
def stab():
    with benchmark_module("stability") as module:
        yield module


def test_rsd_logits_run_away_at_the_papers_lr_and_the_record_is_compact(stab, tmp_path):
    """At lr 0.05 with no stabiliser, RSD's first-step gradient is several times the
    baseline's and its logits leave the baseline's range within 5 steps (digits, seed 0);
    the written JSON keeps steps 1-20 and every 5th after, the summary from every step."""
    stab.main(["--out", str(tmp_path), "--steps", "26", "--grid", "digits",
               "--settings", "baseline lr 0.05,rsd lr 0.05"])
    runs = {r["label"]: r for r in json.loads((tmp_path / "stability.json").read_text())}
    base, rsd = runs["baseline lr 0.05"], runs["rsd lr 0.05"]
    assert rsd["summary"]["grad_norm_step1"] > 4 * base["summary"]["grad_norm_step1"]
    assert rsd["summary"]["head_grad_norm_step1"] > 8 * base["summary"]["head_grad_norm_step1"]
    assert max(rsd["series"]["logit_absmax"][:5]) > 10 * max(base["series"]["logit_absmax"][:5])
    assert rsd["summary"]["logit_absmax_runaway_step"] <= 5
    assert rsd["series"]["step"] == list(range(1, 21)) + [25]
    assert (tmp_path / "stability_table.md").read_text().count("| rsd lr 0.05 | ") == 8  # steps 1-5, 10, 20; summary
    assert (tmp_path / "stability.png").stat().st_size > 0
    assert not (tmp_path / "partial.json").exists()
