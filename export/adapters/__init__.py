"""Adapter types, injected on the torch side before export: each wrapped layer reads its
trainable tensors from the forward's inputs (graph inputs after export).

``lora`` (zero-B or PiSSA init) adds x·Aᵀ·Bᵀ beside the layer; ``loldu``, ``tt`` and ``bone``
compute a weight update ΔW from their tensors (and, for LoLDU and Bone, the frozen weight).
Tensors with start values computed from the weights (PiSSA) come back in ``stored``: the
exporter writes them into the bundle.
"""

from __future__ import annotations

from torch import nn

from edgeft.adapters import layer_of
from edgeft.errors import EdgeftError
from edgeft.manifest import ADAPTER_KINDS, AdapterTensor

from .bone import wrap_bone
from .common import AdapterSlots, features
from .loldu import wrap_loldu
from .lora import LoRALinear, wrap_lora
from .tt import wrap_tt

KINDS = ADAPTER_KINDS
LORA_INITS = ("zeros", "pissa")

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


def inject_adapters(model: nn.Module, targets: list[str], kind: str = "lora", rank: int = 8, alpha: float = 16.0,
                    init: str = "zeros", tt_cores: int = 3,
                    layers: set[int] | None = None) -> tuple[AdapterSlots, list[AdapterTensor], dict]:
    """Wrap every linear layer whose name ends with a target (in ``layers`` only, when given: transformer
    layer indices); return (slots, tensor specs, stored start values).

    Module names (and so PEFT keys) are those of ``model`` itself, which is the class a user
    would hand to ``PeftModel.from_pretrained``. LoLDU and PiSSA rewrite the wrapped layers'
    frozen weights to their residuals.
    """
    if kind not in KINDS:
        raise EdgeftError(f"unknown adapter {kind!r} (expected one of {', '.join(KINDS)})")
    if init not in LORA_INITS or (init != "zeros" and kind != "lora"):
        raise EdgeftError(f"--init {init} is for --adapter lora only (inits: {', '.join(LORA_INITS)})")
    slots, specs, stored = AdapterSlots(), [], {}
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets) and features(module)
        and (layers is None or layer_of(name + ".") in layers)
    ]
    if not matches:
        raise EdgeftError(f"no linear layer matches targets {','.join(targets)}")
    for name, module in matches:
        if kind == "lora":
            wrapped, tensors = wrap_lora(name, module, slots, rank, alpha, init, stored)
        elif kind == "loldu":
            wrapped, tensors = wrap_loldu(name, module, slots, rank)
        elif kind == "tt":
            wrapped, tensors = wrap_tt(name, module, slots, rank, alpha, tt_cores)
        else:
            wrapped, tensors = wrap_bone(name, module, slots, rank)
        specs += tensors
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
    return slots, specs, stored


__all__ = ["KINDS", "LORA_INITS", "DEFAULT_TARGETS", "AdapterSlots", "LoRALinear", "inject_adapters"]
