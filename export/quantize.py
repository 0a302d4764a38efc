"""int8 pass: ONNX Runtime's dynamic quantisation of the frozen MatMul weights, adapters kept fp32.

Left alone, ``quantize_dynamic`` also quantises the LoRA MatMuls and folds their
inputs away (research.md); every node that reads an adapter input — directly or
through the LoRA branch — is excluded, so the adapters stay trainable graph inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from edgeft.manifest import Manifest


def adapter_nodes(model: onnx.ModelProto, manifest: Manifest) -> list[str]:
    """Names of the nodes downstream of an adapter input, up to and including the Add that joins the base path."""
    adapter_inputs = {t.name for t in manifest.adapter.tensors}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found, stack = set(), list(adapter_inputs)
    while stack:
        tensor = stack.pop()
        for node in consumers.get(tensor, []):
            if node.name in found:
                continue
            found.add(node.name)
            if node.op_type != "Add":  # the Add joins the frozen path: stop there
                stack += list(node.output)
    return sorted(found)


def quantize_int8(src: Path, dst: Path, manifest: Manifest | None, per_channel: bool = False,
                  reduce_range: bool = False, keep_fp32: list[str] | None = None) -> list[str]:
    """Quantise ``src`` into ``dst``; returns the excluded node names. ``keep_fp32``: more node names left fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    exclude = (adapter_nodes(model, manifest) if manifest is not None else []) + list(keep_fp32 or [])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + graph cleanup recommended before quantising; optional
            quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
            source = prepared
        except Exception:
            source = src
        quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=per_channel, reduce_range=reduce_range, nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
    return exclude
