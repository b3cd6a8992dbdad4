"""Graph audit: does an exported ONNX graph hold exactly the plain architecture?

The reference is the architecture's own deploy form (:meth:`RunInfo.build_model
<rsd_deploy.run.RunInfo.build_model>` with ``form="deploy"``: the zoo's plain network
with convs carrying bias, or a torchvision/timm model with every conv+BN pair folded)
exported the same way (same opset, same batch axis). A fused
graph must have as many Conv nodes as the reference, no BatchNormalization node,
and no Add node beyond the reference's. The reference's Adds are the
architecture's own: residual additions, and, in pre-activation networks such as
DenseNet, the shift of each standalone BN kept as a per-channel affine (Mul + Add).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from .onnx import export_onnx

#: Operators whose count depends on weight values rather than on the architecture:
#: PyTorch's exporter turns initializers with equal values (e.g. the ones and zeros of a
#: freshly built per-channel affine) into Identity nodes of one shared tensor.
#: ``export_onnx`` undoes that, but a file from another exporter may still have them.
VALUE_DEPENDENT = ("Identity",)


def op_histogram(model: Any) -> dict[str, int]:
    """Operator counts of an ONNX model (a ``ModelProto`` or a path), sorted by name."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


def reference_histogram(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    opset: int,
    batch: int | None,
) -> dict[str, int]:
    """Operator counts of ``model`` (an architecture's deploy form), exported like the audited graph."""
    with tempfile.TemporaryDirectory(prefix="rsd-audit-") as tmp:
        path = Path(tmp) / "reference.onnx"
        export_onnx(model, path, input_shape=input_shape, batch=batch, opset=opset)
        return op_histogram(path)


def audit(graph: dict[str, int], reference: dict[str, int]) -> dict[str, Any]:
    """Compare a fused graph's histogram with the plain architecture's.

    Returns the per-rule results and ``passed``; ``identical`` says whether the two
    histograms agree on every operator but :data:`VALUE_DEPENDENT` ones (expected,
    reported, not required).
    """
    conv, ref_conv = graph.get("Conv", 0), reference.get("Conv", 0)
    bn = graph.get("BatchNormalization", 0)
    add, ref_add = graph.get("Add", 0), reference.get("Add", 0)
    rules = {
        "conv_equal": {"passed": conv == ref_conv, "graph": conv, "reference": ref_conv},
        "no_batchnorm": {"passed": bn == 0, "graph": bn, "reference": 0},
        "no_extra_add": {"passed": add <= ref_add, "graph": add, "reference": ref_add},
    }
    ops = sorted((set(graph) | set(reference)) - set(VALUE_DEPENDENT))
    diff = {op: graph.get(op, 0) - reference.get(op, 0) for op in ops if graph.get(op, 0) != reference.get(op, 0)}
    return {
        "passed": all(r["passed"] for r in rules.values()),
        "rules": rules,
        "identical": not diff,
        "difference": diff,  #: graph minus reference, per operator that differs
    }


def failure_message(result: dict[str, Any], what: str = "graph") -> str:
    """One line naming the audit rules ``result`` broke."""
    broken = [
        f"{rule} ({r['graph']} in the {what}, {r['reference']} in the plain architecture)"
        for rule, r in result["rules"].items() if not r["passed"]
    ]
    return f"graph audit failed: {', '.join(broken)}"

