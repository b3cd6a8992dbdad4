"""Export a PyTorch model to one ONNX file, atomically.

Input ``input`` ``(N, C, H, W)``, output ``logits``; the batch axis is dynamic
unless a fixed batch size is asked for. Uses the TorchScript-based exporter, which
produces every opset from 9 to its newest quickly and deterministically.

``precision="fp16"`` writes fp16 weights and compute behind fp32 input and output (a
Cast after the input and one before the output): the file a strongly typed TensorRT
build makes an fp16 engine of, and that ONNX Runtime runs on any device. It is
exported from a half-precision copy of the module, so its graph is the fp32 graph's
with the same operators, not a rewrite of the ONNX file.

The exporter shares bitwise-equal weights between layers through ``Identity`` nodes (the
all-zero biases of an untrained model, say). Every layer gets its own initializer back
(:func:`unshare_initializers`): with those nodes in the way ONNX Runtime's CPU provider
keeps an fp16 file's convolutions on its slow fp16 kernels instead of casting them to its
fp32 ones, so a model whose weights happen to repeat ran slower than one whose do not.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .errors import RSDError
from .io import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")


class HalfWithFloatIO(nn.Module):
    """``model`` in fp16 behind fp32 input and output: what an fp16 ONNX file holds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()  # a copy: .half() converts in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def unshare_initializers(graph) -> int:
    """Replace every ``Identity`` of an initializer by a copy of it under the node's output
    name, in place; returns how many were replaced. The computation is unchanged."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    shared = [n for n in graph.node
              if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs]
    for node in shared:
        array = numpy_helper.to_array(initializers[node.input[0]])
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
    if any(a.g.node or a.graphs for n in graph.node for a in n.attribute):
        return len(shared)  # subgraphs may read a source too: keep every one
    used = {i for n in graph.node for i in n.input} | outputs
    for name in {n.input[0] for n in shared} - used:  # a source only the Identities read
        graph.initializer.remove(initializers[name])
    return len(shared)


def max_opset() -> int:
    """The newest opset the installed PyTorch exporter can produce."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, int, int],
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
    precision: str = "fp32",
) -> None:
    """Write ``model`` (eval mode, on CPU) to ``path`` as ONNX.

    ``batch=None`` makes the batch axis dynamic; an int fixes it. ``metadata`` goes
    into the model's ``metadata_props``. ``precision``: "fp32", or "fp16" for fp16
    weights and compute with fp32 input and output (``model`` itself is left as it is).
    """
    import onnx

    if not 9 <= opset <= max_opset():
        raise RSDError(
            f"opset {opset} cannot be produced by this PyTorch (supported: 9 to {max_opset()})"
        )
    if batch is not None and batch < 1:
        raise RSDError(f"batch size must be positive (got {batch})")
    if precision not in PRECISIONS:
        raise RSDError(f"an exported ONNX file is {' or '.join(PRECISIONS)}, not {precision!r}")
    model = model.eval()
    name = type(model).__name__  # the model's, also when wrapped for fp16
    p = next(model.parameters())
    dtype = p.dtype
    if precision == "fp16":
        model, dtype = HalfWithFloatIO(model).eval(), torch.float32
    example = torch.zeros(batch or 1, *input_shape, dtype=dtype, device=p.device)
    dynamic = None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except torch.onnx.OnnxExporterError as e:  # the model, at this input, not our code
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
            raise RSDError(f"PyTorch's ONNX exporter cannot export {name} at input "
                           f"{tuple(input_shape)} (opset {opset}): {first}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    unshare_initializers(proto.graph)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "rsd-deploy"
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))

