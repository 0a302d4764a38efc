"""How far a population optimizer's projection moves each adapter tensor: its *spread*, the
std of the tensor's values per unit of the intrinsic coordinates (σ = 1, before 1/sqrt(dim)).

Two rules (``PopulationConfig.spread``):

* ``"shape"``: 1/sqrt(the tensor's larger side), the LoRA init scale: 1/sqrt(in) for LoRA A
  and the head, 1/sqrt(out) for LoRA B [out, r].
* ``"update"`` (default): the same *weight update* for every adapter type. Each tensor is
  moved so that the update it makes alone, ΔW = J·δ at the start values, has the RMS that
  LoRA r=8, alpha=16 (the reference that the shape rule was tuned on) gets from its B:

      RMS(ΔW) = UPDATE_RMS / sqrt(out·in),   spread = that / gain,

  gain = RMS(J·u) for a unit-variance u. The shape rule on a Bone block or the last TT core
  moved ΔW by 10-15x LoRA's, and CMA-ES at σ = 1 wrecked 20 Newsgroups (70% → 4-7%).
  Gains here come from the start values with numpy:
  LoRA B: scale·‖A‖/sqrt(in); LoRA A: scale·‖B‖/sqrt(out); TT core j: scale·sqrt(mean‖L‖²·
  mean‖R‖²), L and R the contractions of the cores before and after j; Bone: 1, a lower bound
  (ΔW = W_blk·B + B; the W_blk·B term adds ~r·RMS(W)² of variance, ~10% for MiniLM);
  LoLDU's z and scale: ``update_gain`` in the manifest, computed at export from the frozen
  LDU factors (the device does not have them). A tensor with no first-order effect (LoRA A
  while B = 0, TT cores before a zero core), the head, and LoLDU tensors of bundles exported
  before ``update_gain`` keep the shape rule.
"""

from __future__ import annotations

import math

import numpy as np

# s·sqrt(r/3) of LoRA r=8, alpha=16 with A ~ U(±1/sqrt(in)): the shape rule's ΔW RMS × sqrt(out·in)
UPDATE_RMS = 2.0 * math.sqrt(8 / 3)
SPREADS = ("update", "shape")


def shape_spread(shape) -> float:
    n = int(np.prod(shape))
    return 1.0 / math.sqrt(max(shape) if len(shape) > 1 else max(n, 1))


def tensor_spreads(layout, theta: np.ndarray, rule: str = "update") -> np.ndarray:
    """One spread per tensor of ``layout`` (``edgeft.adapters.AdapterLayout``), from the start ``theta``."""
    spreads = np.array([shape_spread(t.shape) for t in layout.tensors])
    if rule == "shape":
        return spreads
    sizes = [int(np.prod(t.shape)) for t in layout.tensors]
    offsets = np.cumsum([0, *sizes])
    values = {t.name: theta[off : off + n].reshape(t.shape) for t, off, n in zip(layout.tensors, offsets, sizes)}
    by_module: dict[str, list] = {}
    for t in layout.tensors:
        by_module.setdefault(getattr(t, "module", None), []).append(t)
    for index, t in enumerate(layout.tensors):
        if not getattr(t, "weight_shape", None):  # the head, or a bundle from before weight_shape
            continue
        out_f, in_f = t.weight_shape
        scale = layout.spec.alpha / layout.spec.rank
        gain = _gain(t, values, by_module[t.module], scale)
        if gain > 1e-12:
            spreads[index] = UPDATE_RMS / math.sqrt(out_f * in_f) / gain
    return spreads


def _gain(t, values, siblings, scale: float) -> float:
    """RMS of the weight update per unit-variance change of ``t`` (0: no first-order effect)."""
    out_f, in_f = t.weight_shape
    if t.role == "lora_B":
        a = values[next(s.name for s in siblings if s.role == "lora_A")]
        return scale * float(np.linalg.norm(a)) / math.sqrt(in_f)
    if t.role == "lora_A":
        b = values[next(s.name for s in siblings if s.role == "lora_B")]
        return scale * float(np.linalg.norm(b)) / math.sqrt(out_f)
    if t.role == "bone_block":
        return 1.0
    if getattr(t, "update_gain", None) is not None:  # measured at export (LoLDU: its frozen LDU factors)
        return float(t.update_gain)
    if t.role == "tt_core":
        # ΔW is linear in core j: ΔW[a, b] = L[a<j, b<j]·G_j[:, a_j, b_j, :]·R[a>j, b>j], so for unit
        # noise in G_j, mean(ΔW²) = mean‖L‖² · mean‖R‖² (exact; the cores before and after j fixed)
        cores = [values[s.name] for s in siblings if s.role == "tt_core"]
        j = [s.name for s in siblings if s.role == "tt_core"].index(t.name)
        left = _mean_square(_chain(cores[:j])) if j else 1.0
        right = _mean_square(_chain(cores[j + 1 :])) if j + 1 < len(cores) else 1.0
        return scale * math.sqrt(left * right)
    return 0.0


def _chain(cores) -> np.ndarray:
    """Cores [r_{j-1}, o_j, i_j, r_j] contracted over their shared ranks: [r_first, Πo, Πi, r_last]."""
    result = cores[0].astype(np.float64)
    for core in cores[1:]:
        r0, rows, cols, _ = result.shape
        _, o, i, nxt = core.shape
        merged = np.tensordot(result, core, axes=([3], [0]))  # [r0, rows, cols, o, i, nxt]
        result = merged.transpose(0, 1, 3, 2, 4, 5).reshape(r0, rows * o, cols * i, nxt)
    return result


def _mean_square(chain: np.ndarray) -> float:
    """Mean over the matrix entries of the squared norm over the open rank (one side is 1)."""
    return float(np.mean(np.sum(chain**2, axis=(0, 3))))
