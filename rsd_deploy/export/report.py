"""The export report for people: a short table of the checks, the audit and the artifacts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REPORT_FILE = "report.json"


def format_report(report: Mapping[str, Any]) -> str:
    """A short table of the checks, the audit and the artifacts."""
    rows = [("check", "max abs", "max rel", "top-1", "result")]
    for ch in report["checks"]:
        if "max_abs" in ch:
            rows.append((ch["name"], f"{ch['max_abs']:.2e}", f"{ch['max_rel']:.2e}",
                         f"{ch['top1_agreement']:.4f}", "ok" if ch["passed"] else "FAIL"))
        else:
            rows.append((ch["name"], "", "", "", "ok" if ch["passed"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(r, widths, strict=True)).rstrip() for r in rows]
    if "audit" in report:
        a = report["audit"]
        rules = a["rules"]
        lines.append(
            f"audit: Conv {rules['conv_equal']['graph']}/{rules['conv_equal']['reference']}, "
            f"BatchNormalization {rules['no_batchnorm']['graph']}, "
            f"Add {rules['no_extra_add']['graph']}/{rules['no_extra_add']['reference']} "
            f"(fused/plain architecture); histogram "
            f"{'identical to' if a['identical'] else 'differs from'} the plain architecture's"
        )
        if "unfused_minus_fused" in a:
            diff = ", ".join(f"{op} {n:+d}" for op, n in a["unfused_minus_fused"].items())
            lines.append(f"unfused graph vs fused: {diff or 'same operators'}")
    int8 = report.get("int8")
    if int8:
        cal = int8["calibration"]
        lines.append(
            f"int8: top-1 {int8['fp32_top1']:.2f}% fp32 -> {int8['int8_top1']:.2f}% int8 (drop "
            f"{int8['top1_drop']:.2f} points, at most {int8['max_top1_drop']:g}; agreement "
            f"{int8['top1_agreement']:.4f}; {int8['images']} validation images); {cal['format']} format, "
            f"{cal['method']} calibration on {cal['images']}"
        )
    trt = report.get("tensorrt")
    if trt:
        lines.append(f"tensorrt: {trt['status']}" + (
            f" ({trt['precision']}, batch {trt['min_batch']}..{trt['max_batch']}{_layer_summary(trt)})"
            if trt["status"] == "built" else ""))
    lines.append(f"inputs: {report.get('verification_inputs', '-')}")
    written = [*report.get("artifacts", {}), REPORT_FILE]
    lines.append(f"wrote {', '.join(written)} to {report['out_dir']}")
    return "\n".join(lines)


def _layer_summary(trt: Mapping[str, Any]) -> str:
    """The engine's convolution layers per datatype ("; convolutions fp16 19"), if recorded."""
    convs = (trt.get("layer_precisions") or {}).get("convolution") or {}
    return "; convolutions " + ", ".join(f"{dtype} {n}" for dtype, n in convs.items()) if convs else ""
