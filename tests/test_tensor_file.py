"""The one-copy safetensors reader: the library's values, and a one-line reason for a malformed file."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgeft.tensor_file import read_tensors


def test_reads_what_the_library_wrote(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((7, 3)).astype(np.float32), "d": rng.standard_normal(5),
               "q": rng.integers(0, 255, (4, 2, 3)).astype(np.uint8), "h": np.arange(6, dtype=np.float16),
               "empty": np.zeros((0, 4), np.float32), "i": np.array([3, -1], np.int64)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "np"})
    got = read_tensors(tmp_path / "t.safetensors")
    assert got.keys() == tensors.keys()
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape and np.array_equal(got[name], value)


def test_malformed_files_are_refused_with_a_reason(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    cases = {"truncated": (data[:-100], "file ends early|byte range"),
             "short": (data[:5], "header length"),
             "huge header": ((10**12).to_bytes(8, "little") + data[8:], "header length"),
             "not json": (data[:8] + b"\xff" * length + data[8 + length:], "not JSON"),
             "foreign dtype": (data.replace(b'"F32"', b'"Q99"'), "dtype"),
             "offsets": (data.replace(b"16384", b"16388"), "byte range")}
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=reason):
            read_tensors(path)
