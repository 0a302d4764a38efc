"""Lossless int4: frozen weights that already lie on a 4-bit grid become MatMulNBits without rounding.

A GGUF model's Q4_1 and Q4_0 layers, dequantised to fp32 at export, are exactly d·q + m in every block of 32
values along the input dimension (q ∈ 0..15; Q4_0: m = −8d). ONNX Runtime's quantiser rounds them again onto
its own grid (round-to-nearest from each block's range), which cost SmolLM2-135M 12% perplexity
(docs/DEPLOY.md); recovering their own grid costs nothing: MatMulNBits takes a scale and a zero point per
block, and a float zero point −m/d reproduces every block to float32 rounding.

Recovery, per block of 32 (written here: no library recovers a quantisation grid from dequantised values):
Q4_1 puts the block's minimum at q = 0 and its maximum at q = 15, so d = (max − min)/15 and m = min; Q4_0 puts
the value of largest magnitude at q = 0, so d = −that/8 and m = −8d. A block is on its grid when every value
is within 1e-6 of the block's largest magnitude of m + d·q with q = round((v − m)/d) ∈ 0..15; a weight converts
only if all its blocks are (random or trained fp32 weights never are: their residuals are a fraction of d).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32  # GGUF's Q4_0 / Q4_1 block
TOLERANCE = 1e-6  # of the block's largest magnitude: float32 dequantisation leaves ≤ a few ulps


def _fit(blocks: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, whether each block is reproduced) for the grid m + d·q, q ∈ 0..15."""
    safe = np.where(d != 0, d, 1.0)
    q = np.clip(np.rint((blocks - m[..., None]) / safe[..., None]), 0, 15)
    err = np.abs(m[..., None] + safe[..., None] * q - blocks).max(-1)
    return q, err <= TOLERANCE * np.abs(blocks).max(-1) + 1e-30


def grid_of(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A [K, N] MatMul weight (ONNX layout: input × output) as MatMulNBits inputs — packed 4-bit values
    [N, K/32, 16], scales and float zero points [N·K/32] — or None when it is not on a 4-bit grid."""
    k, n = weight.shape
    if k % BLOCK:
        return None
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    d1, m1 = (high - low) / 15, low  # Q4_1
    q1, ok1 = _fit(blocks, d1, m1)
    if ok1.all():
        q, d, m = q1, d1, m1
    else:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        d0 = -extreme / 8  # Q4_0
        q0, ok0 = _fit(blocks, d0, -8 * d0)
        if not (ok1 | ok0).all():
            return None
        use1 = ok1[..., None]
        q, d, m = np.where(use1, q1, q0), np.where(ok1, d1, d0), np.where(ok1, m1, -8 * d0)
    d = np.where(d != 0, d, 1.0)  # a constant block: q = 0, its value is the zero point's
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: element 2i low nibble, 2i+1 high
    return packed, d.astype(np.float32).ravel(), (-m / d).astype(np.float32).ravel()


def convert_exact_int4(model: onnx.ModelProto, exclude: set[str]) -> list[str]:
    """Replace, in place, every frozen MatMul (not in ``exclude``) whose weight lies on a 4-bit grid by an exact
    MatMulNBits; returns the converted nodes' names."""
    from .lord import linear_weights

    converted, drop = [], set()
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    for node, weight in linear_weights(model):
        if node.name in exclude:
            continue
        grid = grid_of(numpy_helper.to_array(weight))
        if grid is None:
            continue
        packed, scales, zero_points = grid
        k, n = weight.dims
        base = weight.name
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q4"),
                                        numpy_helper.from_array(scales, f"{base}_scales"),
                                        numpy_helper.from_array(zero_points, f"{base}_zero_points")])
        model.graph.node[position[node.name]].CopyFrom(helper.make_node(  # in place: the graph stays sorted
            "MatMulNBits", [node.input[0], f"{base}_Q4", f"{base}_scales", f"{base}_zero_points"], list(node.output),
            name=node.name, domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK))
        drop.add(base)
        converted.append(node.name)
    if converted:
        for i in reversed(range(len(model.graph.initializer))):  # by index: no copy of the other weights
            if model.graph.initializer[i].name in drop:
                del model.graph.initializer[i]
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return converted
