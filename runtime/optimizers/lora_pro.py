"""LoRA-Pro's gradient adjustment (arXiv 2407.18242), applied to zeroth-order estimates.

A LoRA step on W = W₀ + s·B·A moves W as a full fine-tuning step would with the *equivalent gradient*
g̃ = s·(B·g^A + g^B·A). LoRA-Pro replaces LoRA's gradients g_A = s·Bᵀg, g_B = s·g·Aᵀ by the pair that
makes g̃ closest to the full gradient g (Frobenius norm), and among those the pair closest to LoRA's
own gradients:

    g^A = (1/s²)·(BᵀB)⁻¹·g_A + X·A
    g^B = (1/s²)·[I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹ − B·X,
    X:  BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·g_A·Aᵀ   (a Sylvester equation, r × r).

Every term is a function of A, B and the two LoRA gradients, so it applies unchanged to the
zeroth-order estimates ĝ_A, ĝ_B of a LoRA pair: an update-rule piece (``--set update=lora-pro``, or
``lora-pro+adam`` / ``lora-pro+momentum`` to chain it before another rule; registry name ``lora-pro``).

Two choices of ours, for forward-only use:

* B = 0 (LoRA's start): BᵀB is singular, and while B is small (BᵀB)⁻¹ multiplies the A part of a
  zeroth-order estimate — pure noise while B = 0, since A's true gradient s·Bᵀg is then zero — by
  1/|B|². The paper's form (``damping=0``: pseudo-inverses, eigenvalues below 1e-10 of the largest or
  an absolute 1e-20 counted as zero, so B = 0 gives g^A = 0) let A random-walk on the toy factorisation
  of tests/test_lora_pro.py until the problem stiffened (2,000 steps, one query: 2 of 4 seeds diverged
  to 1e45 and inf, the other 2 stayed at the start's loss; MeZO converged on all 4). The zeroth-order form inverts BᵀB + ρ·mean eig(AAᵀ)·I and AAᵀ + ρ·mean eig(BᵀB)·I
  (Tikhonov damping scaled by the other factor, ρ = 1 by default, ``--set
  lora_pro_damping=ρ``): with B = 0, g^A is of the order of g_A / (s²·ρ·mean eig(AAᵀ)) — the plain
  estimate's, not 1/|B|² times it; as B grows the adjustment approaches the paper's.
* Step length: with a small B, (BᵀB)⁻¹ makes g^A large. The adjusted pair is rescaled so that neither
  its equivalent update s·(B·g^A + g^B·A) nor the pair itself is longer than the unadjusted
  estimate's: LoRA-Pro chooses the direction, the optimizer's lr rule keeps choosing the length it
  was tuned for. (Matching the equivalent update alone let A grow without bound while B was small:
  a toy factorisation diverged to 1e49.)

The Sylvester equation is solved through the eigendecompositions of the two symmetric r × r
matrices (numpy only: the device has no scipy); undamped, it is tested against the least-squares definition
above (tests/test_lora_pro.py).
"""

from __future__ import annotations

import numpy as np

RELATIVE_CUTOFF, ABSOLUTE_CUTOFF = 1e-10, 1e-20


def _eig(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return np.maximum(values, 0.0), vectors


def _pinv(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    keep = values > max(RELATIVE_CUTOFF * values.max(initial=0.0), ABSOLUTE_CUTOFF)
    inverse = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    return (vectors * inverse) @ vectors.T


def solve_sylvester_symmetric(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """X with P·X + X·Q = C for symmetric positive semi-definite P, Q (pairs of eigenvalues summing to
    zero get X = 0 there: the equation leaves them free)."""
    pv, pu = _eig(p)
    qv, qu = _eig(q)
    total = pv[:, None] + qv[None, :]
    y = pu.T @ c @ qu
    y = np.where(total > ABSOLUTE_CUTOFF, y / np.where(total > ABSOLUTE_CUTOFF, total, 1.0), 0.0)
    return pu @ y @ qu.T


def adjust(a: np.ndarray, b: np.ndarray, g_a: np.ndarray, g_b: np.ndarray, scale: float,
           damping: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """LoRA-Pro's (g^A, g^B) for A [r, in], B [out, r] and LoRA's gradients g_A [r, in], g_B [out, r]
    (float64), with pseudo-inverses where BᵀB or AAᵀ are singular (module doc). ``damping`` ρ > 0 inverts
    BᵀB + ρ·mean eig(AAᵀ)·I and AAᵀ + ρ·mean eig(BᵀB)·I instead (the zeroth-order form, module doc)."""
    a, b, g_a, g_b = (np.asarray(x, dtype=np.float64) for x in (a, b, g_a, g_b))
    btb, aat = b.T @ b, a @ a.T
    r = len(btb)
    eye = np.eye(r)
    btb_d, aat_d = btb + damping * np.trace(aat) / r * eye, aat + damping * np.trace(btb) / r * eye
    btb_inv, aat_inv = _pinv(*_eig(btb_d)), _pinv(*_eig(aat_d))
    s2 = 1.0 / (scale * scale)
    x = solve_sylvester_symmetric(btb, aat, -s2 * btb_inv @ g_a @ a.T)
    new_a = s2 * btb_inv @ g_a + x @ a
    new_b = s2 * (g_b - b @ (btb_inv @ (b.T @ g_b))) @ aat_inv - b @ x
    return new_a, new_b


class LoRAPro:
    """The adjustment over a flat adapter vector: ``pairs`` lists each LoRA pair's (A slice, A shape,
    B slice, B shape); values outside the pairs pass through unchanged."""

    def __init__(self, pairs: list[tuple[slice, tuple, slice, tuple]], scale: float, damping: float = 1.0):
        if not pairs:
            raise ValueError("update lora-pro needs LoRA adapters (pairs of lora_A / lora_B tensors)")
        self.pairs, self.scale, self.damping = pairs, float(scale), float(damping)

    def __call__(self, theta: np.ndarray, g_hat: np.ndarray) -> np.ndarray:
        out = np.array(g_hat, dtype=np.float32, copy=True)
        s = self.scale
        for sa, shape_a, sb, shape_b in self.pairs:
            a, b = theta[sa].reshape(shape_a).astype(np.float64), theta[sb].reshape(shape_b).astype(np.float64)
            g_a, g_b = g_hat[sa].reshape(shape_a).astype(np.float64), g_hat[sb].reshape(shape_b).astype(np.float64)
            new_a, new_b = adjust(a, b, g_a, g_b, s, self.damping)
            factor = min(_ratio(np.linalg.norm(b @ g_a + g_b @ a), np.linalg.norm(b @ new_a + new_b @ a)),
                         _ratio(np.hypot(np.linalg.norm(g_a), np.linalg.norm(g_b)),
                                np.hypot(np.linalg.norm(new_a), np.linalg.norm(new_b))))
            out[sa] = (factor * new_a).ravel()
            out[sb] = (factor * new_b).ravel()
        return out


def _ratio(plain: float, adjusted: float) -> float:
    return plain / adjusted if adjusted > 0 else 0.0


def lora_pairs(layout) -> list[tuple[slice, tuple, slice, tuple]]:
    """Each adapted module's (A slice, A shape, B slice, B shape) in ``layout``'s vector."""
    by_module: dict[str, dict[str, object]] = {}
    for t in layout.tensors:
        if t.role in ("lora_A", "lora_B") and t.module:
            by_module.setdefault(t.module, {})[t.role] = t
    pairs = []
    for parts in by_module.values():
        if len(parts) == 2:
            a, b = parts["lora_A"], parts["lora_B"]
            pairs.append((layout.slice_of(a.name), tuple(a.shape), layout.slice_of(b.name), tuple(b.shape)))
    return pairs
