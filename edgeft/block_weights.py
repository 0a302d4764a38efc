"""Frozen weight matrices stored as 8- or 4-bit codes with per-block scales, for an int8/int4 bundle's exact fit.

An int8/int4 bundle's graph holds its weights at 8 or 4 bits; the exact fit (``runtime/top_blocks.py``)
recomputes the top blocks in numpy and, with fp32 copies, held 453 MB of SmolLM2's weights where the int4
graph holds 118 MB (docs/SCALE.md, session 22). In a safetensors file a matrix W [rows, cols] may instead be

    ``<name>.codes``   int8 [rows, cols]         (or ``<name>.nibbles``: uint8 [rows, cols / 2], 4-bit codes)
    ``<name>.scales``  float32 [rows, blocks]   (blocks divides cols: each scale covers cols / blocks values)
    ``<name>.offsets`` float32 [rows, blocks]   (optional)

meaning W[r, c] = codes[r, c] · scales[r, b] + offsets[r, b], b = c // (cols / blocks): 8-bit codes (a per-row
scale: blocks = 1) at one byte a weight, 4-bit ones (a MatMulNBits block, −8..7) at half a byte, two to a byte
as MatMulNBits packs them (column 2i in the low nibble, 2i + 1 in the high one, each stored as code + 8). The fit
multiplies by a matrix a slab of rows at a time (``times_transposed``, ``times``), each slab dequantised into one
buffer of SLAB_VALUES floats kept per row length: a whole fp32 copy of each shape (session 23) held ~110 MB of a
1 B model's gate/up/q/o/LM-head matrices, and a fresh array per use cost 12 ms for a 1536 × 576 matrix here,
filling a kept one 1 ms (page faults). Numpy only: the device reads these; ``export/fit_weights.py`` writes them.
"""

from __future__ import annotations

import numpy as np

SUFFIXES = (".codes", ".nibbles", ".scales", ".offsets")
CODES = (".codes", ".nibbles")
SLAB_VALUES = 1 << 20  # weights dequantised at once (4 MB): 512 rows of a 2,048-wide matrix, BLAS-sized still


class BlockWeight:
    """One matrix as codes and block scales (and offsets), dequantised on use."""

    def __init__(self, name: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, buffers: dict,
                 packed: bool = False):
        kind = "nibbles" if packed else "codes"
        if codes.dtype != (np.uint8 if packed else np.int8) or codes.ndim != 2:
            raise ValueError(f"{name}.{kind}: expected a 2-D {'uint8' if packed else 'int8'} tensor, got {codes.dtype} {list(codes.shape)}")
        rows, cols = codes.shape[0], codes.shape[1] * (2 if packed else 1)
        for part, values in (("scales", scales), ("offsets", offsets)):
            if values is None:
                continue
            if values.dtype != np.float32 or values.ndim != 2 or values.shape[0] != rows or not 0 < values.shape[1] <= cols \
                    or cols % values.shape[1] or values.shape != scales.shape:
                raise ValueError(f"{name}.{part}: shape {list(values.shape)} does not divide codes {[rows, cols]}")
        self.codes, self.scales, self.offsets, self.packed = codes, scales, offsets, packed
        self.shape, self.dtype = (rows, cols), np.dtype(np.float32)
        self.blocks = scales.shape[1]
        self._buffers = buffers  # shared by the matrices of one file: one slab buffer per row length

    def _fill(self, out: np.ndarray, start: int, stop: int) -> np.ndarray:
        scales, offsets = self.scales[start:stop], None if self.offsets is None else self.offsets[start:stop]
        if self.packed:  # the nibbles (code + 8) into the even and odd columns; the + 8 taken off with the offsets
            nibbles = self.codes[start:stop]
            key = ("nibbles", nibbles.shape)  # a slab's shape: a few per file
            half = self._buffers.get(key)
            if half is None:
                half = self._buffers[key] = np.empty(nibbles.shape, dtype=np.uint8)
            np.bitwise_and(nibbles, 0x0F, out=half)
            out[:, 0::2] = half
            np.right_shift(nibbles, 4, out=half)
            out[:, 1::2] = half
            offsets = -8 * scales if offsets is None else offsets - 8 * scales
        else:
            np.copyto(out, self.codes[start:stop])  # int8 → float32 in place: no new allocation
        blocked = out.reshape(stop - start, self.blocks, -1)
        blocked *= scales[:, :, None]
        if offsets is not None:
            blocked += offsets[:, :, None]
        return out

    def dense(self) -> np.ndarray:
        """W in a new float32 array (tests, small matrices; the fit multiplies by slabs instead)."""
        return self._fill(np.empty(self.shape, dtype=np.float32), 0, self.shape[0])

    def slabs(self):
        """(start, W[start:start + n] in float32) over every row, n rows of SLAB_VALUES values at most, each
        slab in a buffer shared by the file's matrices of this row length: valid until the next slab."""
        cols = self.shape[1]
        rows = max(1, min(self.shape[0], SLAB_VALUES // cols))
        out = self._buffers.get(("slab", cols))
        if out is None or out.shape[0] < rows:
            out = self._buffers[("slab", cols)] = np.empty((rows, cols), dtype=np.float32)
        for start in range(0, self.shape[0], rows):
            stop = min(start + rows, self.shape[0])
            yield start, self._fill(out[: stop - start], start, stop)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """W[rows] in a new float32 array (a prompt bundle's label words)."""
        rows = np.asarray(rows)
        codes = self.codes[rows]
        if self.packed:
            codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(len(rows), -1).astype(np.int8) - np.int8(8)
        out = codes.astype(np.float32).reshape(len(rows), self.blocks, -1)
        out *= self.scales[rows][:, :, None]
        if self.offsets is not None:
            out += self.offsets[rows][:, :, None]
        return out.reshape(len(rows), -1)


def grouped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray | BlockWeight]:
    """The file's tensors with every ``<name>.codes`` or ``.nibbles`` (+ scales, offsets) trio as one
    ``BlockWeight`` under ``<name>``; ValueError names a trio that is incomplete or inconsistent."""
    out, buffers = {}, {}
    for name, value in tensors.items():
        if not name.endswith(SUFFIXES):
            out[name] = value
    for name in tensors:
        if name.endswith(CODES):
            base, kind = name.rsplit(".", 1)
            if base + ".scales" not in tensors:
                raise ValueError(f"{base}: has {kind} but no scales")
            if base in out:
                raise ValueError(f"{base}: stored twice")
            out[base] = BlockWeight(base, tensors[name], tensors[base + ".scales"], tensors.get(base + ".offsets"), buffers,
                                    packed=kind == "nibbles")
    stray = [n for n in tensors if n.endswith((".scales", ".offsets")) and n.rsplit(".", 1)[0] not in out]
    if stray:
        raise ValueError(f"{stray[0]}: has no codes")
    return out


def matrix_shapes(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """A file's tensor shapes (``tensor_file.tensor_shapes``) by matrix: ``<name>.codes`` or ``.nibbles`` as
    ``<name>`` (nibbles: two columns a byte), scales and offsets left out."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".nibbles"):
            out[name.rsplit(".", 1)[0]] = [shape[0], 2 * shape[1]]
        elif name.endswith(".codes"):
            out[name.rsplit(".", 1)[0]] = shape
        elif not name.endswith((".scales", ".offsets")):
            out[name] = shape
    return out


def times_transposed(z: np.ndarray, weight: np.ndarray | BlockWeight) -> np.ndarray:
    """z @ Wᵀ ([..., cols] → [..., rows]): W fp32 as it is, or a ``BlockWeight`` a slab of rows at a time."""
    if not isinstance(weight, BlockWeight):
        return z @ weight.T
    out = np.empty((*z.shape[:-1], weight.shape[0]), dtype=np.float32)
    for start, slab in weight.slabs():
        out[..., start : start + len(slab)] = z @ slab.T
    return out


def times(error: np.ndarray, weight: np.ndarray | BlockWeight) -> np.ndarray:
    """error @ W ([..., rows] → [..., cols]), as ``times_transposed``: the slabs' products summed."""
    if not isinstance(weight, BlockWeight):
        return error @ weight
    out = np.zeros((*error.shape[:-1], weight.shape[1]), dtype=np.float32)
    for start, slab in weight.slabs():
        out += error[..., start : start + len(slab)] @ slab
    return out


def rows(weight: np.ndarray | BlockWeight, ids: np.ndarray) -> np.ndarray:
    """weight[ids] in float32 (ids of any shape: the rows gain their axis), fp32 or stored as codes."""
    ids = np.asarray(ids)
    if not isinstance(weight, BlockWeight):
        return weight[ids]
    return weight.take(ids.ravel()).reshape(*ids.shape, weight.shape[1])


def stored(name: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None = None,
           packed: bool = False) -> dict[str, np.ndarray]:
    """The tensors to write for one matrix (the writer's side of ``grouped``); ``packed``: 4-bit codes (−8..7),
    two to a byte."""
    if packed:
        if codes.shape[1] % 2 or codes.min() < -8 or codes.max() > 7:
            raise ValueError(f"{name}: 4-bit codes need an even number of columns and values in −8..7")
        q = (codes.astype(np.int16) + 8).astype(np.uint8)
        out = {f"{name}.nibbles": np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))}
    else:
        out = {f"{name}.codes": np.ascontiguousarray(codes, dtype=np.int8)}
    out[f"{name}.scales"] = np.ascontiguousarray(scales, dtype=np.float32)
    if offsets is not None and np.any(offsets):
        out[f"{name}.offsets"] = np.ascontiguousarray(offsets, dtype=np.float32)
    return out
