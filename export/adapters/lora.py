"""LoRA on torch linear layers whose A and B come from graph inputs, not parameters.

The exported graph takes every adapter tensor as an input, so the device can change
adapters without re-exporting. In torch this means: each wrapped layer reads its A
and B from a shared ``AdapterSlots`` table that the task wrapper fills at the start
of every forward from its own arguments.

``init="pissa"`` (PiSSA, 2404.02948, as PEFT does it): A and B start at the top-r singular
vectors of W scaled by sqrt(S/scale), and W keeps only the residual W − U_r S_r V_rᵀ, so the
adapted layer starts equal to the original one but on its principal subspace. Those start
values are data: they are stored in the bundle (init "stored").
"""

from __future__ import annotations

import torch
from torch import nn

from edgeft.manifest import AdapterTensor

from .common import AdapterSlots, weight_out_in


class LoRALinear(nn.Module):
    """y = base(x) + scale · (x Aᵀ) Bᵀ with A [r, in], B [out, r] read from the slots."""

    def __init__(self, base: nn.Module, slots: AdapterSlots, a_name: str, b_name: str, scale: float):
        super().__init__()
        self.base, self.slots, self.a_name, self.b_name, self.scale = base, slots, a_name, b_name, scale

    def forward(self, x):
        a, b = self.slots[self.a_name], self.slots[self.b_name]
        return self.base(x) + ((x @ a.transpose(0, 1)) @ b.transpose(0, 1)) * self.scale


def wrap_lora(name: str, module: nn.Module, slots: AdapterSlots, rank: int, alpha: float, init: str, stored: dict):
    weight = weight_out_in(module)
    fan_out, fan_in = weight.shape
    a_name, b_name = f"{name}.lora_A", f"{name}.lora_B"
    specs = [AdapterTensor(a_name, [rank, fan_in], "kaiming-uniform", f"base_model.model.{name}.lora_A.weight", name, "lora_A", [fan_out, fan_in]),
             AdapterTensor(b_name, [fan_out, rank], "zeros", f"base_model.model.{name}.lora_B.weight", name, "lora_B",
                           [fan_out, fan_in])]
    scale = alpha / rank
    if init == "pissa":
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            root = torch.sqrt(s[:rank] / scale)
            a0, b0 = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
            residual = weight.double() - scale * (b0 @ a0)
            weight.copy_(residual.to(weight.dtype))  # a view of the module's own weight
        for spec, value in zip(specs, (a0, b0)):
            spec.init = "stored"
            stored[spec.name] = value.float().contiguous().numpy()
    return LoRALinear(module, slots, a_name, b_name, scale), specs
