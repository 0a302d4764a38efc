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
  tied otherwise, fp32 (the graph's tied head stays fp32); untied, as the other linears.
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


def _int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(codes, scales, offsets) of W [out, in] as the int4 graph holds it; None where the graph keeps it fp32
    (checked by the caller: here only the grid or ONNX Runtime's rounding)."""
    from .exact_int4 import BLOCK, grid_of

    rows, cols = w.shape
    grid = grid_of(np.ascontiguousarray(w.T))  # the ONNX MatMul layout [in, out]
    if grid is not None:
        packed, scales, offsets = grid
        return _unpacked(packed, rows, cols), scales.reshape(rows, cols // BLOCK), offsets.T
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    if cols % INT4_BLOCK:
        return None
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True))
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(w.T))
    return _unpacked(packed, rows, cols), scales.reshape(rows, -1).astype(np.float32), None


def _on_int4_grid(w: np.ndarray) -> bool:
    from .exact_int4 import grid_of

    return grid_of(np.ascontiguousarray(w.T)) is not None


def quantised_fit_weights(tensors: dict[str, np.ndarray], bits: str, tied: bool = False, down_fp32: bool = True,
                          dropped: str = "embed") -> dict[str, np.ndarray]:
    """The fit file's tensors for an int8/int4 bundle: each quantised matrix as ``block_weights.stored``
    writes it. ``tied``: the LM head is the embedding table; ``down_fp32``: the graph kept its down
    projections fp32 (``default_keep_fp32``). The embedding tables (``dropped`` and the names under it:
    ``embed``, a decoder's untied table; ``embedding``, an encoder's) are left out: such a bundle's fit starts
    from its own graph (the top blocks' from the graph below them, at the token ids; the encoder's from
    its ``hidden.0``)."""
    from .exact_tables import q8_grid

    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        role = name.rsplit(".", 1)[-1]
        if name == dropped or name.startswith(dropped + "."):
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
        if role == "down" and down_fp32 and not (bits == "int4" and _on_int4_grid(w)):
            out[name] = w
            continue
        quantised = _int8_rows(w) if bits == "int8" else _int4(w)
        out.update(stored(name, *quantised, packed=bits == "int4") if quantised is not None else {name: w})
    return out
