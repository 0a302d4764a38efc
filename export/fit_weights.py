"""The exact fit's frozen weights for an int8/int4 bundle, quantised as its graph quantises them.

``compress --quantize`` used to copy the fit's fp32 file (``top_blocks.safetensors``): SmolLM2's int4 fit then held
453 MB of fp32 weights beside a 118 MB graph, and trained the fp32 blocks rather than the 4-bit ones the graph
runs. Now every matrix the graph holds quantised is stored as the graph holds it, as 8- or 4-bit codes with block
scales (``edgeft/block_weights.py``), and every one the graph keeps fp32 stays fp32 here:

* int4, a weight on a GGUF 4-bit grid: that grid (``exact_int4.grid_of``, as the graph's lossless MatMulNBits);
* int4, any other frozen linear: ONNX Runtime's own block quantiser with the graph's settings (symmetric,
  block ``INT4_BLOCK``), so the codes and scales are the graph's; the down projections stay fp32 (as
  ``default_keep_fp32`` leaves them in the graph);
* int8: 7-bit symmetric codes with one scale per output row, ``quantize_dynamic``'s per-channel weights with
  ``reduce_range``; down projections fp32. (The graph also quantises each activation at run time, which the fit does not: its
  gradient is of the graph without that rounding.)
* the LM head: tied to a table on GGUF's Q8_0 grid, that grid (``exact_tables.q8_grid``, the graph's bytes);
  tied otherwise, fp32 (the graph's tied head stays fp32); untied, as the other linears;
* an encoder's embedding tables (``graph_tables``): the int8 graph's own, read from its Gather → DequantizeLinear
  pairs (one scale and zero point a table), so the fit still embeds the tokens itself, lazily, as the graph
  does; int4 graphs keep their tables fp32, and so does the fit.
"""

from __future__ import annotations

import numpy as np

from edgeft.block_weights import stored

from .quantize import INT4_BLOCK

INT8_LEVELS = 64  # reduce_range's symmetric int8: codes −64..64, scale = max|w| / 64 (ONNX Runtime's quant_utils)


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(w).max(1, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / INT8_LEVELS, np.float32(1.0)).astype(np.float32)
    return np.clip(np.rint(w / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


def _unpacked(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """MatMulNBits' packed nibbles [N, K/block, block/2] (element 2i low, 2i+1 high) as q − 8, int8 [N, K]."""
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int16)
    q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    return (q.reshape(rows, -1)[:, :cols] - 8).astype(np.int8)


def _int4(w: np.ndarray, rounded: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(codes, scales, offsets) of W [out, in] as the int4 graph holds it: on a grid, that grid; else (``rounded``:
    the graph rounds it) ONNX Runtime's rounding; None where the graph keeps it fp32."""
    from .exact_int4 import BLOCK, grid_of

    rows, cols = w.shape
    grid = grid_of(np.ascontiguousarray(w.T))  # the ONNX MatMul layout [in, out]
    if grid is not None:
        packed, scales, offsets = grid
        return _unpacked(packed, rows, cols), scales.reshape(rows, cols // BLOCK), offsets.T
    if not rounded:
        return None
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    if cols % INT4_BLOCK:
        return None
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True))
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(w.T))
    return _unpacked(packed, rows, cols), scales.reshape(rows, -1).astype(np.float32), None


def graph_tables(model) -> list[tuple[np.ndarray, np.float32, int]]:
    """The int8 graph's quantised lookup tables: (codes [rows, cols] as stored, scale, zero point) for every Gather
    of an initializer whose output only a per-tensor DequantizeLinear reads."""
    from onnx import numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in init:
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "DequantizeLinear" or len(after[0].input) < 3:
            continue
        scale, zero = (init.get(n) for n in after[0].input[1:3])
        if scale is None or zero is None or list(scale.dims) or list(zero.dims):
            continue
        found.append((numpy_helper.to_array(init[node.input[0]]), np.float32(numpy_helper.to_array(scale)),
                      int(numpy_helper.to_array(zero))))
    return found


def _table_codes(table: np.ndarray, tables) -> tuple | np.ndarray | None:
    """The graph's quantised version of the fit's fp32 ``table`` (same shape, every value within a step of it):
    (codes, scales, offsets) for a 2-D table, the dequantised row 0 for the token-type row; None if none is."""
    for codes, scale, zero in tables:
        values = (codes.astype(np.float32) - np.float32(zero)) * scale
        rows = values[0] if table.ndim == 1 and values.ndim == 2 else values
        if rows.shape == table.shape and np.abs(rows - table).max() <= scale:
            if table.ndim == 1:
                return rows
            q = codes.astype(np.int16) - zero
            if q.min() >= -128 and q.max() <= 127:  # (q − zero)·scale, as DequantizeLinear computes it
                return q.astype(np.int8), np.full((len(q), 1), scale, np.float32), None
            return ((codes.astype(np.int16) - 128).astype(np.int8), np.full((len(q), 1), scale, np.float32),
                    np.full((len(q), 1), (128 - zero) * scale, np.float32))
    return None


def quantised_fit_weights(tensors: dict[str, np.ndarray], bits: str, tied: bool = False, down_fp32: bool = True,
                          dropped: str | None = "embed", tables: tuple[str, list] | None = None) -> dict[str, np.ndarray]:
    """The fit file's tensors for an int8/int4 bundle: each quantised matrix as ``block_weights.stored``
    writes it. ``tied``: the LM head is the embedding table; ``down_fp32``: the graph kept its down
    projections fp32 (``default_keep_fp32``). ``dropped``: a decoder's untied embedding table, left out (the top
    blocks' fit starts from the graph below them, at the token ids). ``tables``: an encoder's (prefix of its
    embedding tables, ``graph_tables`` of the compressed graph): each table as the graph holds it, fp32
    where the graph's is."""
    from .exact_tables import q8_grid

    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        role = name.rsplit(".", 1)[-1]
        if dropped is not None and name == dropped:
            continue
        if tables is not None and name.startswith(tables[0] + "."):
            found = None if role in ("norm", "bias") else _table_codes(w, tables[1])
            if isinstance(found, tuple):
                out.update(stored(name, *found))
            else:
                out[name] = w if found is None else found
            continue
        if w.ndim != 2:  # norms, biases
            out[name] = w
            continue
        if name == "lm_head" and tied:
            grid = q8_grid(w)
            if grid is None:
                out[name] = w
            else:
                q, scales = grid
                out.update(stored(name, (q.astype(np.int16) - 128).astype(np.int8), scales))
            continue
        kept = role == "down" and down_fp32  # fp32 in the graph, but an int4 graph's where it is on a grid
        if kept and bits == "int8":
            out[name] = w
            continue
        quantised = _int8_rows(w) if bits == "int8" else _int4(w, rounded=not kept)
        out.update(stored(name, *quantised, packed=bits == "int4") if quantised is not None else {name: w})
    return out
