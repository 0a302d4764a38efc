"""Forward-only optimizers behind one ask/tell interface; one registry line each.

Zeroth-order variants are assembled from pieces (directions × update rule × options,
see ``zeroorder.py``); population methods work in a random intrinsic subspace
(``population.py``).
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial

import numpy as np

from edgeft.adapters import layer_of

from .base import Optimizer, StepReport
from .frozen import Frozen
from .fzoo import FZOO, FZOOConfig
from .lora_pro import LoRAPro, lora_pairs
from .monteclora import MonteCLoRA, MonteCLoRAConfig
from .population import CMA, Fireworks, Layerwise, PopulationConfig
from .spread import tensor_spreads
from .zeroorder import LORA_PRO, ZeroOrder, ZOConfig


def _zo(name: str, **pieces):
    return partial(_build_zo, name, pieces)


def _shapes(layout):
    return [tuple(t.shape) for t in layout.tensors] if layout is not None else None


def _build_zo(name, pieces, theta, settings, layout):
    config = _config(ZOConfig, {**pieces, **settings})
    adjust = None
    if config.update.startswith(LORA_PRO):  # LoRA-Pro's adjustment needs each pair's place and LoRA's scale
        if layout is None:
            raise ValueError("update lora-pro needs the bundle's adapter layout")
        adjust = LoRAPro(lora_pairs(layout), layout.spec.scale, config.lora_pro_damping)
    bases = _input_bases(layout, settings.get("input_bases"), config.rank) if config.directions == "activations" else None
    return ZeroOrder(theta, config, _shapes(layout), name, adjust, bases)


# LoRA'd modules that read the hidden state entering their layer as it is (BERT-family encoders: the
# attention's input is the previous layer's LayerNorm output); a pre-norm decoder's q/k/v read
# RMSNorm(h)·g instead, whose principal directions differ, so their A tensors get Gaussian entries
READS_LAYER_INPUT = ("attention.self.query", "attention.self.key", "attention.self.value")


def _input_bases(layout, per_layer, k: int) -> list:
    """Per adapter tensor, the top-``k`` input directions of its layer (a LoRA A of a module in
    ``READS_LAYER_INPUT``) or None."""
    if layout is None or per_layer is None:
        raise ValueError("activation directions need the bundle's layout and its layers' input bases "
                         "(a bundle exported with hidden-state outputs)")
    out = []
    for t in layout.tensors:
        module = getattr(t, "module", None) or ""
        basis = None
        if getattr(t, "role", None) == "lora_A" and module.endswith(READS_LAYER_INPUT):
            layer = layer_of(t.name)
            if 0 <= layer < len(per_layer) and per_layer[layer].shape[0] == t.shape[1]:
                basis = per_layer[layer][:, :k]
        out.append(basis)
    if all(b is None for b in out):
        raise ValueError("no LoRA A here reads its layer's input as it is (BERT-family attention query/key/value): "
                         "activation directions would be Gaussian; use mezo")
    return out


def _population(cls):
    def build(theta, settings, layout):
        config = _config(PopulationConfig, settings)
        if layout is None:
            return cls(theta, config)
        return cls(theta, config, shapes=_shapes(layout), groups=[layer_of(t.name) for t in layout.tensors],
                   spreads=tensor_spreads(layout, theta, config.spread))

    return build


# name -> builder(theta, settings, layout)
REGISTRY = {
    "mezo": _zo("mezo"),
    "zo-momentum": _zo("zo-momentum", update="momentum"),
    "zo-adam": _zo("zo-adam", update="adam"),
    "zo-sign": _zo("zo-sign", sign=True),
    "zo-cons": _zo("zo-cons", conservative=True),
    "subzero": _zo("subzero", directions="subspace", rank=8, refresh=2000),
    "lozo": _zo("lozo", directions="lowrank", rank=2, refresh=50),
    "lozo-m": _zo("lozo-m", directions="lowrank", rank=2, refresh=50, update="momentum"),
    "zo-activations": _zo("zo-activations", directions="activations", rank=16),
    "adazeta": _zo("adazeta", queries="auto"),
    "zo-kalman": _zo("zo-kalman", update="kalman"),
    "lora-pro": _zo("lora-pro", update="lora-pro"),
    "fzoo": lambda theta, settings, layout: FZOO(theta, _config(FZOOConfig, settings)),
    "monteclora": lambda theta, settings, layout: MonteCLoRA(theta, _config(MonteCLoRAConfig, settings)),
    "cma": _population(CMA),
    "fireworks": _population(Fireworks),
    "dfo-layerwise": _population(Layerwise),
}


def _config(cls, settings: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in known and v is not None})


POPULATION = ("cma", "fireworks", "dfo-layerwise")  # search a projection; may use per-layer hidden-state std


def needs_input_bases(name: str, settings: dict) -> bool:
    """Whether ``name`` with ``settings`` perturbs along its layers' input directions (``input_bases``)."""
    return name == "zo-activations" or settings.get("directions") == "activations"


def forwards_per_step(name: str, settings: dict) -> int:
    """Forward passes one step of ``name`` costs with ``settings`` (to turn a pass budget into steps)."""
    if name in POPULATION:
        return int(settings.get("popsize") or PopulationConfig.popsize)
    if name == "fzoo":
        return int(settings.get("directions_per_step") or FZOOConfig.directions_per_step) + 1
    if name == "monteclora":
        return 2 * int(settings.get("queries") or MonteCLoRAConfig.queries)
    queries = settings.get("queries")
    queries = queries if isinstance(queries, int) else 1  # "auto" starts at one query and grows
    return 2 * queries + (1 if name == "zo-cons" else 0)


def make_optimizer(name: str, theta, layout=None, trainable: list[str] | None = None, **settings) -> Optimizer:
    """Build a registered optimizer; ``layout`` (the bundle's AdapterLayout) gives tensor shapes and layers.
    Population optimizers also take ``layer_std`` (``layer_input_std``) for ``projection="hidden"``
    and size each tensor's moves from the layout and the start ``theta`` (``spread.py``).
    ``trainable`` names the tensors to search (default: all); the others keep their value in ``theta``."""
    from edgeft.errors import EdgeftError

    if name not in REGISTRY:
        raise EdgeftError(f"unknown optimizer {name!r} (known: {', '.join(sorted(REGISTRY))})")
    theta = np.asarray(theta, dtype=np.float32)
    try:
        if layout is not None and trainable is not None and set(trainable) != set(layout.names()):
            part, index = layout.subset(trainable)
            return Frozen(REGISTRY[name](theta[index], settings, part), theta, index)
        return REGISTRY[name](theta, settings, layout)
    except ValueError as err:
        raise EdgeftError(f"--optimizer {name}: {err}") from None


def MeZO(theta, config: ZOConfig = ZOConfig()) -> ZeroOrder:
    """MeZO / ZO-SGD: Gaussian directions + SGD (the registry's "mezo")."""
    return ZeroOrder(theta, config, None, "mezo")


MeZOConfig = ZOConfig

__all__ = ["REGISTRY", "MeZO", "MeZOConfig", "Optimizer", "PopulationConfig", "StepReport", "ZOConfig",
           "ZeroOrder", "make_optimizer"]
