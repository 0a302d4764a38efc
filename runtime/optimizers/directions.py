"""Perturbation families for zeroth-order estimates: each direction is a function of a seed.

All three are stateless: the direction for (seed, step, query) is regenerated on
demand, which is what lets a checkpoint hold integers instead of arrays.

* ``Gaussian``  z ~ N(0, I) over the whole adapter vector (MeZO).
* ``Subspace``  SubZero (arXiv 2410.08989): per 2-D tensor (m×n), z = U·Z0·Vᵀ·sqrt(mn/r²)
  with U, V orthonormal (QR of Gaussians) refreshed every ``refresh`` steps, Z0 r×r Gaussian.
* ``LowRank``   LOZO (arXiv 2410.07698): per 2-D tensor z = u·vᵀ, u fresh each step, v kept
  for ``refresh`` steps. 1-D tensors get Gaussian entries in both.
* ``Activations`` ours (issue 12): a LoRA A [r, n] whose layer reads the hidden state entering it is
  perturbed only within the top-k principal directions U [n, k] of that hidden state, z = Z0·Uᵀ·sqrt(n/k)
  (Z0 r×k Gaussian): A's gradient s·Bᵀ·δ·xᵀ has its rows in the span of the inputs x. Every other tensor
  gets Gaussian entries. The bases are measured once, with forward passes of the base model
  (``runtime/statistics.py::layer_input_bases``), so a resumed run rebuilds the same directions.
"""

from __future__ import annotations

import numpy as np

from .perturbation import direction as gaussian_direction

Shape = tuple[int, ...]


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(s) for s in seed]))


class Gaussian:
    name = "gaussian"

    def __init__(self, shapes: list[Shape], seed: int, **_):
        self.size = int(sum(np.prod(s) for s in shapes))
        self.seed = seed

    def __call__(self, step: int, query: int) -> np.ndarray:
        return gaussian_direction((self.seed, step, query), self.size)


class _PerMatrix:
    """Directions assembled tensor by tensor; 2-D tensors get a structured block."""

    def __init__(self, shapes: list[Shape], seed: int, rank: int = 2, refresh: int = 50):
        self.shapes, self.seed, self.rank, self.refresh = [tuple(s) for s in shapes], seed, rank, max(1, refresh)
        self.size = int(sum(np.prod(s) for s in self.shapes))

    def __call__(self, step: int, query: int) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        offset = 0
        for index, shape in enumerate(self.shapes):
            n = int(np.prod(shape))
            if len(shape) == 2 and min(shape) > self.rank:
                out[offset : offset + n] = self.block(index, shape, step, query).ravel()
            else:
                out[offset : offset + n] = _rng(self.seed, step, query, index, 1).standard_normal(n, dtype=np.float32)
            offset += n
        return out


class Subspace(_PerMatrix):
    name = "subspace"

    def block(self, index, shape, step, query):
        m, n = shape
        r = self.rank
        epoch = step // self.refresh
        basis = _rng(self.seed, epoch, index, 2)
        u, _ = np.linalg.qr(basis.standard_normal((m, r)))
        v, _ = np.linalg.qr(basis.standard_normal((n, r)))
        z0 = _rng(self.seed, step, query, index, 3).standard_normal((r, r))
        return (u @ z0 @ v.T * np.sqrt(m * n / r**2)).astype(np.float32)


class LowRank(_PerMatrix):
    name = "lowrank"

    def v(self, index: int, shape, step: int) -> np.ndarray:
        return _rng(self.seed, step // self.refresh, index, 4).standard_normal((shape[1], self.rank))

    def block(self, index, shape, step, query):
        u = _rng(self.seed, step, query, index, 5).standard_normal((shape[0], self.rank))
        # scaled so that E[z_ij²] = 1, as for the Gaussian direction
        return (u @ self.v(index, shape, step).T / np.sqrt(self.rank)).astype(np.float32)


class Activations(_PerMatrix):
    name = "activations"

    def __init__(self, shapes: list[Shape], seed: int, rank: int = 2, refresh: int = 50, bases=None):
        super().__init__(shapes, seed, rank, refresh)
        if bases is None or len(bases) != len(self.shapes):
            raise ValueError("activation directions need a basis (or None) per adapter tensor")
        self.bases = bases

    def __call__(self, step: int, query: int) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        offset = 0
        for index, shape in enumerate(self.shapes):
            n = int(np.prod(shape))
            basis = self.bases[index]
            rng = _rng(self.seed, step, query, index, 6)
            if basis is None:
                out[offset : offset + n] = rng.standard_normal(n, dtype=np.float32)
            else:  # scaled so that E[z_ij²] = 1, as for the Gaussian direction
                z0 = rng.standard_normal((shape[0], basis.shape[1]), dtype=np.float32)
                out[offset : offset + n] = (z0 @ basis.T * np.sqrt(shape[1] / basis.shape[1])).ravel()
            offset += n
        return out


FAMILIES = {"gaussian": Gaussian, "subspace": Subspace, "lowrank": LowRank, "activations": Activations}
