"""LoRA on torch linear layers whose A and B come from graph inputs, not parameters.

The exported graph takes every adapter tensor as an input, so the device can change
adapters without re-exporting. In torch this means: each wrapped layer reads its A
and B from a shared ``AdapterSlots`` table that the task wrapper fills at the start
of every forward from its own arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterTensor

DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


class AdapterSlots(dict):
    """name -> tensor for the forward being traced."""


class LoRALinear(nn.Module):
    """y = base(x) + scale · (x Aᵀ) Bᵀ with A [r, in], B [out, r] read from the slots."""

    def __init__(self, base: nn.Module, slots: AdapterSlots, a_name: str, b_name: str, scale: float):
        super().__init__()
        self.base, self.slots, self.a_name, self.b_name, self.scale = base, slots, a_name, b_name, scale

    def forward(self, x):
        a, b = self.slots[self.a_name], self.slots[self.b_name]
        return self.base(x) + ((x @ a.transpose(0, 1)) @ b.transpose(0, 1)) * self.scale


def _features(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear (weight [in, out])
        return module.weight.shape[0], module.weight.shape[1]
    return None


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> tuple[AdapterSlots, list[AdapterTensor]]:
    """Wrap every linear layer whose name ends with a target; return the slots and tensor specs.

    Module names (and so PEFT keys) are those of ``model`` itself, which is the
    class a user would hand to ``PeftModel.from_pretrained``.
    """
    slots = AdapterSlots()
    specs: list[AdapterTensor] = []
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets) and _features(module)
    ]
    if not matches:
        raise EdgeftError(f"no linear layer matches targets {','.join(targets)}")
    scale = alpha / rank
    for name, module in matches:
        fan_in, fan_out = _features(module)
        a_name, b_name = f"{name}.lora_A", f"{name}.lora_B"
        specs.append(AdapterTensor(a_name, [rank, fan_in], "kaiming-uniform", f"base_model.model.{name}.lora_A.weight", name, "lora_A"))
        specs.append(AdapterTensor(b_name, [fan_out, rank], "zeros", f"base_model.model.{name}.lora_B.weight", name, "lora_B"))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, slots, a_name, b_name, scale))
    return slots, specs
