"""Tensor-train adapter (LoRETTA's reparameterised update, as used by AdaZeta: 2402.12370, 2406.18060).

ΔW [out, in] is a TT-matrix: out = o_1·…·o_k and in = i_1·…·i_k (balanced factorisations),
cores G_j [r_{j-1}, o_j, i_j, r_j] with r_0 = r_k = 1 and the TT rank r between, and

    ΔW[(a_1…a_k), (b_1…b_k)] = scale · G_1[:, a_1, b_1, :] · … · G_k[:, a_k, b_k, :]

Trainable per module: Σ r_{j-1}·o_j·i_j·r_j (~1-3k values for a 384×384 layer at r = 8,
against 6k for LoRA r = 8). The last core starts at zero (ΔW = 0, as LoRA's B), the others
Gaussian with std 1/sqrt(i_j·r_{j-1}) ("tt-normal"), so the contraction of the first cores
has entries of the LoRA-A scale 1/sqrt(in).
"""

from __future__ import annotations

from edgeft.manifest import AdapterTensor

from .common import AdapterSlots, WeightUpdateLinear, weight_out_in


def balanced_factors(n: int, parts: int) -> list[int]:
    """n as a product of ``parts`` factors as equal as its prime factors allow (largest first)."""
    primes, d, m = [], 2, n
    while d * d <= m:
        while m % d == 0:
            primes.append(d)
            m //= d
        d += 1
    if m > 1:
        primes.append(m)
    factors = [1] * parts
    for p in sorted(primes, reverse=True):  # largest prime into the smallest bucket
        factors[factors.index(min(factors))] *= p
    return sorted(factors, reverse=True)


def core_shapes(fan_out: int, fan_in: int, rank: int, cores: int) -> list[list[int]]:
    outs, ins = balanced_factors(fan_out, cores), balanced_factors(fan_in, cores)
    ranks = [1] + [rank] * (cores - 1) + [1]
    return [[ranks[j], outs[j], ins[j], ranks[j + 1]] for j in range(cores)]


def contract(cores, out_features: int, in_features: int):
    """The TT-matrix [out, in] of ``cores`` (torch tensors)."""
    result = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])  # [o, i, r]
    for core in cores[1:]:
        rows, cols, _ = result.shape
        r, o, i, nxt = core.shape
        merged = (result.reshape(rows * cols, r) @ core.reshape(r, o * i * nxt)).reshape(rows, cols, o, i, nxt)
        result = merged.permute(0, 2, 1, 3, 4).reshape(rows * o, cols * i, nxt)
    return result.reshape(out_features, in_features)


class TTLinear(WeightUpdateLinear):
    def __init__(self, base, slots: AdapterSlots, names: list[str], scale: float):
        super().__init__(base, slots, names)
        self.scale = scale

    def update(self, weight, *cores):
        return contract(cores, weight.shape[0], weight.shape[1]) * self.scale


def wrap_tt(name: str, module, slots: AdapterSlots, rank: int, alpha: float, cores: int):
    fan_out, fan_in = weight_out_in(module).shape
    shapes = core_shapes(fan_out, fan_in, rank, cores)
    specs = [AdapterTensor(f"{name}.tt_core_{j}", shape, "zeros" if j == cores - 1 else "tt-normal",
                           f"base_model.model.{name}.tt_core_{j}", name, "tt_core", [fan_out, fan_in])
             for j, shape in enumerate(shapes)]
    return TTLinear(module, slots, [s.name for s in specs], alpha / rank), specs
