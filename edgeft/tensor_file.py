"""Read a safetensors file straight into numpy arrays: one copy of the weights in memory, never two.

``safetensors.numpy.load_file`` (and ``safe_open(...).get_tensor``) copy each tensor out of the whole file
read into memory (or out of a memory map whose touched pages count as resident): loading a causal LM's
117 MB ``top_mlp.safetensors`` peaked at 250 MB for 139 MB held (measured here). This reader parses the
format's header (8-byte little-endian length, then JSON: dtype, shape and byte range per tensor) and
reads each tensor's bytes into an array allocated for it. Written by hand for that reason; files are
still written with the safetensors library.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER = 100 * 2**20


def _header(f, size: int) -> tuple[dict, int]:
    """The file's JSON header and where its tensor bytes begin."""
    length = int.from_bytes(f.read(8), "little")
    if size < 8 or not 0 < length <= min(MAX_HEADER, size - 8):
        raise ValueError("not a safetensors file (bad header length)")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + length


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the header alone (nothing else is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        header, _ = _header(f, path.stat().st_size)
    return {name: [int(d) for d in info["shape"]] for name, info in header.items()}


def _layout(header: dict, base: int, size: int) -> dict[str, tuple[type, list[int], int]]:
    """Each tensor's (dtype, shape, first byte in the file), checked against the file's size."""
    out = {}
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported or missing dtype")
        shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise ValueError(f"tensor {name!r}: its byte range does not match its shape or the file")
        out[name] = (dtype, shape, base + begin)
    return out


def check_tensors(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, after checking every tensor's dtype and byte range against the file (none is read):
    what ``read_tensors`` would refuse is refused here without the memory it takes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, base = _header(f, size)
    return {name: shape for name, (_, shape, _) in _layout(header, base, size).items()}


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path``; ValueError names what is wrong with a malformed one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, base = _header(f, size)
        out = {}
        for name, (dtype, shape, begin) in _layout(header, base, size).items():
            array = np.empty(shape, dtype=dtype)
            f.seek(begin)
            if array.nbytes and f.readinto(memoryview(array.reshape(-1)).cast("B")) != array.nbytes:
                raise ValueError(f"tensor {name!r}: file ends early")
            out[name] = array
    return out
