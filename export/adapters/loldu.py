"""LoLDU (2410.13618): a weight's LDU decomposition, only the diagonal and one scale trained.

At export: P·L·D·U = W (LU with partial pivoting, U made unit-diagonal); the first r terms
are kept as frozen factors and removed from the frozen weight, so that

    W_eff = W_res + σ · (P L_r D_r) · diag(z) · U_r,     W_res = W − P L_r D_r U_r

starts equal to W. Trainable per module: z [r] and σ [1] (r + 1 values).

The paper trains D itself (z starts at D_r, σ at alpha/r); here D_r is folded into the frozen
left factor and z, σ start at 1. The model is the same (D = D_r ⊙ z); the difference is the
scale the optimizer sees: every trained value is ~1, so one ZO perturbation size (ε) is
the same relative change for every pivot, whose magnitudes otherwise span orders.
"""

from __future__ import annotations

import math

import torch

from edgeft.manifest import AdapterTensor

from .common import AdapterSlots, WeightUpdateLinear, weight_out_in


class LoLDULinear(WeightUpdateLinear):
    def __init__(self, base, slots: AdapterSlots, names: list[str], left: torch.Tensor, right: torch.Tensor):
        super().__init__(base, slots, names)
        self.register_buffer("left", left)  # P L_r D_r [out, r]
        self.register_buffer("right", right)  # U_r [r, in]

    def update(self, weight, z, scale):
        return ((self.left * z) @ self.right) * scale


def wrap_loldu(name: str, module, slots: AdapterSlots, rank: int):
    weight = weight_out_in(module)
    fan_out, fan_in = weight.shape
    rank = min(rank, fan_out, fan_in)
    with torch.no_grad():
        p, lower, upper = torch.linalg.lu(weight.double())
        diag = torch.diagonal(upper)
        left = (p @ lower[:, :rank]) * diag[:rank]
        right = upper[:rank] / diag[:rank, None]
        weight.copy_((weight.double() - left @ right).to(weight.dtype))
        # at z = 1, scale = 1: unit noise u in z moves ΔW by Σ_k u_k·left_k·right_kᵀ (E‖·‖² = Σ‖left_k‖²‖right_k‖²);
        # a change c of the scale moves it by c·left·right
        entries = fan_out * fan_in
        z_gain = math.sqrt(float(torch.sum(left.norm(dim=0) ** 2 * right.norm(dim=1) ** 2)) / entries)
        scale_gain = float(torch.linalg.norm(left @ right)) / math.sqrt(entries)
    z, s = f"{name}.loldu_z", f"{name}.loldu_scale"
    specs = [AdapterTensor(z, [rank], "ones", f"base_model.model.{name}.loldu_z", name, "loldu_z", [fan_out, fan_in],
                           z_gain),
             AdapterTensor(s, [1], "ones", f"base_model.model.{name}.loldu_scale", name, "loldu_scale",
                           [fan_out, fan_in], scale_gain)]
    return LoLDULinear(module, slots, [z, s], left.float(), right.float()), specs
