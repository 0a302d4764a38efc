"""What every adapter type shares: the slots table the task wrapper fills, and the frozen
weight as [out, in] whatever the layer stores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdapterSlots(dict):
    """name -> tensor for the forward being traced."""


def features(module: nn.Module) -> tuple[int, int] | None:
    """(fan_in, fan_out) of a linear layer, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear (weight [in, out])
        return module.weight.shape[0], module.weight.shape[1]
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a view: writing it writes the layer)."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.T


class WeightUpdateLinear(nn.Module):
    """y = x (W + ΔW)ᵀ + b, ΔW = ``self.update(W, *slot tensors)`` computed in the graph every forward.

    The update is made on the weight side (cost ~ in·out per forward, independent of the batch),
    so ``edgeft deploy --merge`` folds it by evaluating the weight subgraph once.
    """

    def __init__(self, base: nn.Module, slots: AdapterSlots, names: list[str]):
        super().__init__()
        self.base, self.slots, self.names = base, slots, names

    def update(self, weight, *tensors):  # [out, in]
        raise NotImplementedError

    def forward(self, x):
        weight = self.base.weight if isinstance(self.base, nn.Linear) else self.base.weight.transpose(0, 1)
        update = self.update(weight, *[self.slots[n] for n in self.names])
        return F.linear(x, weight + update, self.base.bias)
