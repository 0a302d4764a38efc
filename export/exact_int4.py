"""Lossless int4: frozen weights that already lie on a 4-bit grid become MatMulNBits without rounding.

A GGUF model's Q4_1 and Q4_0 layers, dequantised to fp32 at export, are exactly d·q + m in every block of 32
values along the input dimension (q ∈ 0..15; Q4_0: m = −8d). ONNX Runtime's quantiser rounds them again onto
its own grid (round-to-nearest from each block's range), which cost SmolLM2-135M 12% perplexity
(docs/DEPLOY.md); recovering their own grid costs nothing.

Recovery, per block of 32 (written here: no library recovers a quantisation grid from dequantised values):
Q4_1 puts the block's minimum at q = 0 and its maximum at q = 15, so d = (max − min)/15 and m = min; Q4_0 puts
the value of largest magnitude at q = 0, so d = −that/8 and m = −8d. A block is on its grid when every value
is within 1e-6 of the block's largest magnitude of m + d·q with q = round((v − m)/d) ∈ 0..15; a weight converts
only if all its blocks are (random or trained fp32 weights never are: their residuals are a fraction of d).

Graph: w = d·(q − 8) + c per block, c = m + 8d, so x·W = MatMulNBits(x) (symmetric: no zero points, ONNX
Runtime's fast kernel) + (x·S)·C, where S [K, K/32] sums each block of inputs and C [K/32, N] holds the blocks'
offsets (Q4_0: none, the branch is left out). A float zero point −m/d would be one node, but ORT's kernel for
float zero points ran a 576 × 1536 MatMul of 512 rows 1.42x slower than fp32, this form 1.08x.
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
    """A [K, N] MatMul weight (ONNX layout: input × output) as packed 4-bit values [N, K/32, 16], scales
    [N·K/32] (symmetric MatMulNBits: value = (q − 8)·scale) and block offsets [K/32, N] — or None when it is
    not on a 4-bit grid."""
    k, n = weight.shape
    if k % BLOCK:
        return None
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    d1, m1 = (high - low) / 15, low  # Q4_1
    q1, ok1 = _fit(blocks, d1, m1)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    d0 = -extreme / 8  # Q4_0, preferred where both fit: it needs no offset
    q0, ok0 = _fit(blocks, d0, -8 * d0)
    if not (ok1 | ok0).all():
        return None
    q, d, m = np.where(ok0[..., None], q0, q1), np.where(ok0, d0, d1), np.where(ok0, -8 * d0, m1)
    d = np.where(d != 0, d, 1.0)  # a constant block: q = 0, its value is the offset's
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: element 2i low nibble, 2i+1 high
    return packed, d.astype(np.float32).ravel(), (m + 8 * d).T.astype(np.float32)


def convert_exact_int4(model: onnx.ModelProto, exclude: set[str]) -> tuple[list[str], list[str]]:
    """Replace, in place, every frozen MatMul (not in ``exclude``) whose weight lies on a 4-bit grid by an exact
    MatMulNBits (and its offset branch); returns the converted nodes' names and the offset branches' MatMuls
    (a later quantiser must leave those alone)."""
    from .lord import linear_weights

    converted, drop, tail = [], set(), []
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    for node, weight in linear_weights(model):
        if node.name in exclude:
            continue
        grid = grid_of(numpy_helper.to_array(weight))
        if grid is None:
            continue
        packed, scales, offsets = grid
        k, n = weight.dims
        base = weight.name
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q4"),
                                        numpy_helper.from_array(scales, f"{base}_scales")])
        has_offsets = bool(np.any(offsets))
        out = node.output[0]
        model.graph.node[position[node.name]].CopyFrom(helper.make_node(  # in place: the graph stays sorted
            "MatMulNBits", [node.input[0], f"{base}_Q4", f"{base}_scales"], [f"{out}_q4" if has_offsets else out],
            name=node.name, domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK))
        if has_offsets:
            sums = _block_sums(model, k)
            model.graph.initializer.append(numpy_helper.from_array(offsets, f"{base}_offsets"))
            tail += [helper.make_node("MatMul", [node.input[0], sums], [f"{out}_sums"], name=f"{node.name}/block_sums"),
                     helper.make_node("MatMul", [f"{out}_sums", f"{base}_offsets"], [f"{out}_offsets"],
                                      name=f"{node.name}/offsets"),
                     helper.make_node("Add", [f"{out}_q4", f"{out}_offsets"], [out], name=f"{node.name}/add_offsets")]
        drop.add(base)
        converted.append(node.name)
    if tail:  # each offset branch right after its MatMulNBits: the graph stays topologically sorted
        after: dict[str, list] = {}
        for extra in tail:
            after.setdefault(extra.name.rsplit("/", 1)[0], []).append(extra)
        nodes = []
        for node in model.graph.node:
            nodes += [node, *after.get(node.name, [])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    if converted:
        for i in reversed(range(len(model.graph.initializer))):  # by index: no copy of the other weights
            if model.graph.initializer[i].name in drop:
                del model.graph.initializer[i]
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return converted, [t.name for t in tail if t.op_type == "MatMul"]


def _block_sums(model: onnx.ModelProto, k: int) -> str:
    """The [K, K/32] 0/1 matrix that sums each block of 32 inputs (one per K, shared by the layers)."""
    name = f"edgeft_block_sums_{k}"
    if not any(t.name == name for t in model.graph.initializer):
        matrix = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32))
        model.graph.initializer.append(numpy_helper.from_array(matrix, name))
    return name
