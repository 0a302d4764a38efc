"""Lossless 8-bit embedding tables: a table already on GGUF's Q8_0 grid is stored once, as bytes.

A GGUF model's Q8_0 tensors, dequantised to fp32 at export, are exactly d·q in every block of 32 values along
the hidden dimension (q ∈ −127..127, d the block's largest magnitude / 127). SmolLM2's tied embedding is one:
its 49,152 × 576 table is 113 MB of fp32, more than half of the int4 bundle (docs/DEPLOY.md), and ONNX
Runtime's quantisers leave it alone because two nodes read it — the token lookup and, transposed, the LM head.

Recovered (per block: d = max|v| / 127, q = round(v / d), every value reproduced within 1e-6 of the block's
largest magnitude; written here: no library recovers a quantisation grid from dequantised values), the table
becomes one uint8 initializer (q + 128) with per-block scales, read by both:

* the lookup: ``GatherBlockQuantized`` (ONNX Runtime's contrib op) on the token ids;
* the LM head: the same op on every row id gives the fp32 table [V, K] at run time, and
  ``Gemm(h, table, transB=1)`` (h flattened to [rows, K]) replaces MatMul(h, Transpose(table)): the
  transposed fp32 copy ONNX Runtime used to fold at load time is gone too.

Exact: both paths compute the same fp32 values as before (tested against the fp32 graph's logits).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32  # GGUF's Q8_0 block
TOLERANCE = 1e-6  # of the block's largest magnitude


def q8_grid(table: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A [V, K] table as (uint8 q + 128 [V, K], scales [V, K/32]) when every block of 32 along K is d·q with
    q ∈ −127..127; None otherwise."""
    v, k = table.shape
    if k % BLOCK:
        return None
    blocks = table.reshape(v, k // BLOCK, BLOCK).astype(np.float64)
    amax = np.abs(blocks).max(-1)
    d = np.where(amax > 0, amax / 127, 1.0)
    q = np.rint(blocks / d[..., None])  # within ±127: |v| / d ≤ 127
    if (np.abs(q * d[..., None] - blocks).max(-1) > TOLERANCE * amax + 1e-30).any():
        return None
    return (q + 128).astype(np.uint8).reshape(v, k), d.astype(np.float32)


def _readers(model: onnx.ModelProto) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def convert_tied_tables(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Replace, in place, every embedding table (an initializer read by Gather lookups and, optionally, by
    Transpose → MatMul heads) that lies on the Q8_0 grid; returns the converted tables' names and the heads'
    Gemm nodes (a later quantiser must leave them alone: their weight is computed, not an initializer)."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = _readers(model)
    converted, heads_out = [], []
    for name, tensor in list(initializers.items()):
        uses = readers.get(name, [])
        gathers = [n for n in uses if n.op_type == "Gather" and n.input[0] == name
                   and all(a.i == 0 for a in n.attribute if a.name == "axis")]
        heads = [n for n in uses if _is_transpose(n)]
        if not gathers or len(gathers) + len(heads) != len(uses) or len(tensor.dims) != 2 or not all(n.name for n in uses):
            continue
        if any(r.op_type != "MatMul" or r.input[1] != h.output[0] for h in heads for r in readers.get(h.output[0], [])):
            continue
        grid = q8_grid(numpy_helper.to_array(tensor))
        if grid is None:
            continue
        heads_out += [r.name for h in heads for r in readers.get(h.output[0], [])]
        _rewrite(model, name, grid, gathers, heads, readers)
        converted.append(name)
    if converted and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return converted, heads_out


def _is_transpose(node) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm in (None, [1, 0])


def _rewrite(model, name, grid, gathers, heads, readers) -> None:
    data, scales = grid
    v, k = data.shape
    q8, s8, zp = f"{name}_q8", f"{name}_q8_scales", f"{name}_q8_zero"
    model.graph.initializer.extend([numpy_helper.from_array(data, q8), numpy_helper.from_array(scales, s8),
                                    numpy_helper.from_array(np.full(scales.shape, 128, np.uint8), zp)])
    lookup = dict(domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=BLOCK, bits=8)
    replace: dict[str, list] = {}
    for g in gathers:
        replace[g.name] = [helper.make_node("GatherBlockQuantized", [q8, g.input[1], s8, zp], list(g.output),
                                            name=g.name, **lookup)]
    if heads:
        rows = f"{name}_all_rows"
        model.graph.initializer.append(numpy_helper.from_array(np.arange(v, dtype=np.int64), rows))
        table = f"{name}_dequantized"
        first = True
        for h in heads:
            for mm in readers.get(h.output[0], []):
                x, out = mm.input[0], mm.output[0]
                nodes = [helper.make_node("GatherBlockQuantized", [q8, rows, s8, zp], [table],
                                          name=f"{name}/dequantize", **lookup)] if first else []
                first = False
                flat_shape = f"{out}_flat_shape"
                model.graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), flat_shape))
                vocab = f"{out}_vocab"
                model.graph.initializer.append(numpy_helper.from_array(np.array([v], np.int64), vocab))
                nodes += [helper.make_node("Reshape", [x, flat_shape], [f"{out}_flat_in"], name=f"{mm.name}/flatten"),
                          helper.make_node("Gemm", [f"{out}_flat_in", table], [f"{out}_flat"], name=mm.name, transB=1),
                          helper.make_node("Shape", [x], [f"{out}_in_shape"], name=f"{mm.name}/shape", end=-1),
                          helper.make_node("Concat", [f"{out}_in_shape", vocab], [f"{out}_shape"], name=f"{mm.name}/out_shape", axis=0),
                          helper.make_node("Reshape", [f"{out}_flat", f"{out}_shape"], [out], name=f"{mm.name}/unflatten")]
                replace[mm.name] = nodes
            replace[h.name] = []
    nodes = []
    for node in model.graph.node:  # in place: each replacement where its node was, so the graph stays sorted
        nodes += replace.get(node.name, [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for i in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[i].name == name:
            del model.graph.initializer[i]
