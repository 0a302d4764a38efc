"""The coded matrices of an int8/int4 bundle's fit file (edgeft/block_weights.py): what is written reads back."""

import numpy as np
import pytest

from edgeft import block_weights
from edgeft.block_weights import BlockWeight, grouped, matrix_shapes, stored, times, times_transposed


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
    np.testing.assert_allclose(w.dense(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w.take(np.array([7, 2])), want[[7, 2]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_products_by_slabs_equal_the_dense_ones(monkeypatch, packed):
    """z @ Wᵀ and e @ W a few rows of W at a time (a last slab shorter) equal the dense products, and the
    slab buffer is all they allocate for W: one per row length, SLAB_VALUES floats at most."""
    rng = np.random.default_rng(3)
    rows, cols = 11, 8
    monkeypatch.setattr(block_weights, "SLAB_VALUES", 4 * cols)  # 4 rows a slab: 4 + 4 + 3
    codes = rng.integers(-8, 8, size=(rows, cols)).astype(np.int8)
    w = grouped(stored("w", codes, rng.random((rows, 2), dtype=np.float32) + 0.1, packed=packed))["w"]
    want = w.dense()
    z, e = rng.standard_normal((2, 5, cols)).astype(np.float32), rng.standard_normal((2, 5, rows)).astype(np.float32)
    np.testing.assert_allclose(times_transposed(z, w), z @ want.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(times(e, w), e @ want, rtol=1e-5, atol=1e-5)
    assert [b.shape for k, b in w._buffers.items() if k[0] == "slab"] == [(4, cols)]
    np.testing.assert_array_equal(times_transposed(z, want), z @ want.T)  # fp32 matrices as they are


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
