"""Population optimizers' spreads: under the "update" rule, moving any adapter tensor by its spread
changes the weight update ΔW by the same RMS whatever the adapter type (checked with the export's
own torch modules, not the numpy gains), and LoRA r=8, alpha=16 keeps the shape rule's size."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.adapters import AdapterLayout
from edgeft.export.adapters import inject_adapters
from edgeft.export.adapters.lora import LoRALinear
from edgeft.manifest import AdapterSpec
from edgeft.runtime.optimizers.spread import UPDATE_RMS, shape_spread, tensor_spreads

SHAPES = [(48, 64), (96, 32)]  # [out, in]: divisible into Bone blocks of 8 and balanced TT factors
KINDS = {"lora": dict(kind="lora", rank=8, alpha=16.0), "lora-r2": dict(kind="lora", rank=2, alpha=4.0),
         "pissa": dict(kind="lora", rank=4, alpha=8.0, init="pissa"), "tt": dict(kind="tt", rank=4, alpha=8.0),
         "bone": dict(kind="bone", rank=8), "loldu": dict(kind="loldu", rank=4)}


def _adapted(kind: str, shape):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(shape[1], shape[0]))
    settings = KINDS[kind]
    slots, specs, stored = inject_adapters(model, ["proj"], **settings)
    spec = AdapterSpec(kind=settings["kind"], rank=settings["rank"], alpha=settings.get("alpha", 16.0),
                       targets=["proj"], tensors=specs, init=settings.get("init", "zeros"))
    return model.proj, AdapterLayout(spec, stored)


def _delta_w(module, named: dict) -> torch.Tensor:
    """ΔW [out, in] the module adds for these tensor values, by its own torch code."""
    values = {k: torch.from_numpy(v).float() for k, v in named.items()}
    if isinstance(module, LoRALinear):
        return (module.scale * values[module.b_name] @ values[module.a_name]).double()
    return module.update(module.base.weight.data, *[values[n] for n in module.names]).double()


def _expected_rms(module, layout, theta, index) -> float:
    """RMS of ΔW(θ + u) − ΔW(θ) for unit-variance noise u in tensor ``index`` alone, exactly:
    ΔW is linear in each single tensor, so E‖J·u‖² = Σ_k ‖J·e_k‖² over the tensor's basis vectors."""
    t, off = layout.tensors[index], layout.offsets[index]
    start, total = _delta_w(module, layout.unflatten(theta)), 0.0
    for k in range(int(np.prod(t.shape))):
        moved = theta.copy()
        moved[off + k] += 1.0
        total += float(torch.sum((_delta_w(module, layout.unflatten(moved)) - start) ** 2))
    return math.sqrt(total / start.numel())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_update_spread_gives_every_type_the_same_weight_update(kind, shape):
    module, layout = _adapted(kind, shape)
    theta = layout.initial(seed=3)
    spreads = tensor_spreads(layout, theta, "update")
    target = UPDATE_RMS / math.sqrt(shape[0] * shape[1])
    for index, (t, spread) in enumerate(zip(layout.tensors, spreads)):
        if spread == shape_spread(t.shape):  # no first-order effect: LoRA A at B = 0, TT's first cores
            assert t.role in ("lora_A", "tt_core"), t.role
            continue
        change = spread * _expected_rms(module, layout, theta, index)
        # Bone's gain 1 is a lower bound (its W-block term adds to it); the others are exact
        high = 1.3 if t.role == "bone_block" else 1.001
        assert 0.999 * target < change < high * target, (t.name, change / target)


def test_lora_r8_alpha16_keeps_the_shape_rule_and_types_differ_under_it():
    module, layout = _adapted("lora", (384, 384))
    theta = layout.initial(seed=0)
    b = next(i for i, t in enumerate(layout.tensors) if t.role == "lora_B")
    assert tensor_spreads(layout, theta)[b] == pytest.approx(shape_spread(layout.tensors[b].shape), rel=0.05)
    # the shape rule moves a Bone block's update by an order of magnitude more than LoRA's
    _, bone = _adapted("bone", (384, 384))
    shape_rule, update_rule = (tensor_spreads(bone, bone.initial(0), rule)[0] for rule in ("shape", "update"))
    assert shape_rule / update_rule > 10


def test_checkpoint_keeps_the_projection_the_run_began_with():
    from edgeft.runtime.optimizers import make_optimizer

    _, layout = _adapted("lora", (48, 64))
    start = layout.initial(seed=1)
    opt = make_optimizer("cma", start, layout=layout, intrinsic_dim=8, popsize=6, seed=1)
    for _ in range(3):
        candidates = opt.ask()
        opt.tell(candidates, [float(np.sum(c**2)) for c in candidates])
    arrays, scalars = opt.state_dict()
    # resumed from a different placeholder start: the saved spreads, not new ones, shape the projection
    other = make_optimizer("cma", layout.initial(seed=2), layout=layout, intrinsic_dim=8, popsize=6, seed=1)
    other.load_state_dict(arrays, scalars)
    assert other.P.tobytes() == opt.P.tobytes() and other.theta.tobytes() == opt.theta.tobytes()
