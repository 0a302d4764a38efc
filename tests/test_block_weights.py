"""The coded matrices of an int8/int4 bundle's fit file (edgeft/block_weights.py): what is written reads back."""

import numpy as np
import pytest

from edgeft.block_weights import BlockWeight, dense, grouped, matrix_shapes, stored


@pytest.mark.parametrize("packed, blocks, offsets", [(False, 1, False), (True, 4, True), (True, 2, False)])
def test_stored_codes_read_back_as_the_matrix_they_encode(packed, blocks, offsets):
    rng = np.random.default_rng(blocks)
    rows, cols = 10, 32
    low, high = (-8, 8) if packed else (-127, 128)
    codes = rng.integers(low, high, size=(rows, cols)).astype(np.int8)
    scales = rng.random((rows, blocks), dtype=np.float32) + 0.1
    shifts = rng.standard_normal((rows, blocks)).astype(np.float32) if offsets else None
    want = codes.reshape(rows, blocks, -1) * scales[:, :, None] + (0 if shifts is None else shifts[:, :, None])
    want = want.reshape(rows, cols)
    tensors = {**stored("w", codes, scales, shifts, packed=packed), "norm": np.ones(cols, np.float32)}
    assert ("w.nibbles" in tensors) == packed and (tensors.get("w.nibbles", tensors.get("w.codes")).nbytes
                                                  == rows * cols // (2 if packed else 1))
    weights = grouped(tensors)
    w = weights["w"]
    assert isinstance(w, BlockWeight) and w.shape == (rows, cols) and weights["norm"] is tensors["norm"]
    assert matrix_shapes({n: list(v.shape) for n, v in tensors.items()}) == {"w": [rows, cols], "norm": [cols]}
    np.testing.assert_allclose(dense(w), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w.take(np.array([7, 2])), want[[7, 2]], rtol=1e-6, atol=1e-6)
    slabs = np.concatenate([rows_.copy() for _, rows_ in w.row_slabs(3)])
    np.testing.assert_allclose(slabs, want, rtol=1e-6, atol=1e-6)


def test_inconsistent_codes_are_refused():
    codes = np.zeros((3, 4), np.int8)
    with pytest.raises(ValueError, match="4-bit codes need"):
        stored("w", np.full((3, 4), 9, np.int8), np.ones((3, 1), np.float32), packed=True)
    cases = [({"w.nibbles": codes.view(np.uint8)[:, :2].copy()}, "has nibbles but no scales"),
             ({"w.nibbles": codes, "w.scales": np.ones((3, 1), np.float32)}, "uint8"),
             ({"w.codes": codes, "w.nibbles": codes.view(np.uint8)[:, :2].copy(), "w.scales": np.ones((3, 1), np.float32)},
              "stored twice"),
             ({"w.codes": codes, "w.scales": np.ones((3, 1), np.float32), "w.offsets": np.ones((3, 2), np.float32)},
              "does not divide"),
             ({"w.offsets": np.ones((3, 1), np.float32)}, "has no codes")]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            grouped(tensors)
