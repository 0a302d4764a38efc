"""Frozen weight matrices stored as 8-bit codes with per-block scales, for an int8/int4 bundle's exact fit.

An int8/int4 bundle's graph holds its weights at 8 or 4 bits; the exact fit (``runtime/top_blocks.py``)
recomputes the top blocks in numpy and, with fp32 copies, held 453 MB of SmolLM2's weights where the int4
graph holds 118 MB (docs/SCALE.md, session 22). In a safetensors file a matrix W [rows, cols] may instead be

    ``<name>.codes``   int8 [rows, cols]
    ``<name>.scales``  float32 [rows, blocks]   (blocks divides cols: each scale covers cols / blocks values)
    ``<name>.offsets`` float32 [rows, blocks]   (optional)

meaning W[r, c] = codes[r, c] · scales[r, b] + offsets[r, b], b = c // (cols / blocks): 4-bit codes (a
MatMulNBits block: −8..7) and 8-bit ones (a per-row scale: blocks = 1) alike, at one byte a weight. The fit
dequantises a matrix where it uses it, into a buffer reused for every matrix of that shape (a fresh fp32
array each time cost 12 ms for a 1536 × 576 matrix here, filling a kept one 1 ms: page faults), and the LM
head a slab of rows at a time. Numpy only: the device reads these; ``export/fit_weights.py`` writes them.
"""

from __future__ import annotations

import numpy as np

SUFFIXES = (".codes", ".scales", ".offsets")


class BlockWeight:
    """One matrix as codes and block scales (and offsets), dequantised on use."""

    def __init__(self, name: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, buffers: dict):
        if codes.dtype != np.int8 or codes.ndim != 2:
            raise ValueError(f"{name}.codes: expected a 2-D int8 tensor, got {codes.dtype} {list(codes.shape)}")
        rows, cols = codes.shape
        for part, values in (("scales", scales), ("offsets", offsets)):
            if values is None:
                continue
            if values.dtype != np.float32 or values.ndim != 2 or values.shape[0] != rows or not 0 < values.shape[1] <= cols \
                    or cols % values.shape[1] or values.shape != scales.shape:
                raise ValueError(f"{name}.{part}: shape {list(values.shape)} does not divide codes {list(codes.shape)}")
        self.codes, self.scales, self.offsets = codes, scales, offsets
        self.shape, self.dtype = codes.shape, np.dtype(np.float32)
        self.blocks = scales.shape[1]
        self._buffers = buffers  # shared by the matrices of one file: one working copy per shape

    def _fill(self, out: np.ndarray, start: int, stop: int) -> np.ndarray:
        np.copyto(out, self.codes[start:stop])  # int8 → float32 in place: no new allocation
        blocked = out.reshape(stop - start, self.blocks, -1)
        blocked *= self.scales[start:stop, :, None]
        if self.offsets is not None:
            blocked += self.offsets[start:stop, :, None]
        return out

    def dense(self) -> np.ndarray:
        """W in float32, in the shared buffer of this shape: valid until the next ``dense`` of that shape."""
        out = self._buffers.get(self.shape)
        if out is None:
            out = self._buffers[self.shape] = np.empty(self.shape, dtype=np.float32)
        return self._fill(out, 0, self.shape[0])

    def row_slabs(self, rows: int):
        """(start, W[start:start+rows] in float32) over every row: the LM head without its fp32 copy."""
        key = ("slab", rows, self.shape[1])
        out = self._buffers.get(key)
        if out is None:
            out = self._buffers[key] = np.empty((rows, self.shape[1]), dtype=np.float32)
        for start in range(0, self.shape[0], rows):
            stop = min(start + rows, self.shape[0])
            yield start, self._fill(out[: stop - start], start, stop)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """W[rows] in a new float32 array (a prompt bundle's label words)."""
        rows = np.asarray(rows)
        out = self.codes[rows].astype(np.float32).reshape(len(rows), self.blocks, -1)
        out *= self.scales[rows][:, :, None]
        if self.offsets is not None:
            out += self.offsets[rows][:, :, None]
        return out.reshape(len(rows), -1)


def grouped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray | BlockWeight]:
    """The file's tensors with every ``<name>.codes`` (+ scales, offsets) trio as one ``BlockWeight`` under
    ``<name>``; ValueError names a trio that is incomplete or inconsistent."""
    out, buffers = {}, {}
    for name, value in tensors.items():
        if not name.endswith(SUFFIXES):
            out[name] = value
    for name in tensors:
        if name.endswith(".codes"):
            base = name[: -len(".codes")]
            if base + ".scales" not in tensors:
                raise ValueError(f"{base}: has codes but no scales")
            out[base] = BlockWeight(base, tensors[name], tensors[base + ".scales"], tensors.get(base + ".offsets"), buffers)
    stray = [n for n in tensors if n.endswith((".scales", ".offsets")) and n.rsplit(".", 1)[0] + ".codes" not in tensors]
    if stray:
        raise ValueError(f"{stray[0]}: has no codes")
    return out


def matrix_shapes(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """A file's tensor shapes (``tensor_file.tensor_shapes``) by matrix: ``<name>.codes`` as ``<name>``, scales
    and offsets left out."""
    return {n[: -len(".codes")] if n.endswith(".codes") else n: s for n, s in shapes.items()
            if not n.endswith((".scales", ".offsets"))}


def dense(weight: np.ndarray | BlockWeight) -> np.ndarray:
    """An fp32 matrix as it is, or a ``BlockWeight`` dequantised (see ``BlockWeight.dense``)."""
    return weight.dense() if isinstance(weight, BlockWeight) else weight


def stored(name: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The tensors to write for one matrix (the writer's side of ``grouped``)."""
    out = {f"{name}.codes": np.ascontiguousarray(codes, dtype=np.int8),
           f"{name}.scales": np.ascontiguousarray(scales, dtype=np.float32)}
    if offsets is not None and np.any(offsets):
        out[f"{name}.offsets"] = np.ascontiguousarray(offsets, dtype=np.float32)
    return out
