"""Bone, block affine (2409.15371; PEFT's MiSS with ``init_weights="bat"``).

W [out, in] is cut into r×r blocks W[a, c]; one trainable r×r matrix B[a] per block row:

    ΔW[a, c] = W[a, c] · B[a] + B[a]

so the update reuses the frozen weight's own blocks. Trainable per module: out·r values,
B = 0 at the start (ΔW = 0). Needs in and out divisible by r. Same formula and tensor
layout as PEFT, so a saved adapter loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterTensor

from .common import AdapterSlots, WeightUpdateLinear, weight_out_in


class BoneLinear(WeightUpdateLinear):
    def update(self, weight, block):
        out_f, in_f = weight.shape
        r = block.shape[-1]
        blocks = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # [in/r, out/r, r, r]
        delta = blocks @ block + block
        return delta.permute(1, 2, 0, 3).reshape(out_f, in_f)


def wrap_bone(name: str, module, slots: AdapterSlots, rank: int):
    fan_out, fan_in = weight_out_in(module).shape
    if fan_in % rank or fan_out % rank:
        raise EdgeftError(f"--adapter bone: {name} is {fan_out}x{fan_in}, not divisible into {rank}x{rank} blocks (choose --rank)")
    block = f"{name}.bone_block"
    specs = [AdapterTensor(block, [fan_out // rank, rank, rank], "zeros", f"base_model.model.{name}.miss_block", name, "bone_block",
                           [fan_out, fan_in])]
    return BoneLinear(module, slots, [block]), specs
