"""The top layer's MLP of a Llama-family causal LM, prepared for its exact-gradient fit on the device.

Everything above the top MLP's output is cheap to differentiate by hand: the output adds to the
residual stream, which only the final RMSNorm and the LM head read. So the loss gradient of a LoRA
on the top MLP's gate, up and down projections is a function of forward outputs (the final
residual, the MLP's input and its gate and up outputs) and three frozen weights (the LM head, the
final norm's scale, the down projection): ``runtime/top_fit.py`` computes it in numpy, with no
backward graph. This module picks the modules, captures those outputs in the traced forward and
writes the weights the device needs.

Measured with torch before building it (SmolLM2-135M, three tragedies → 8,192 Macbeth tokens, 40 Adam
steps of batch 4, body otherwise frozen, seed 0): output bias alone 55.76 → 52.11 perplexity; bias +
LoRA r8 on the top down projection 47.33; bias + LoRA on the top gate, up and down 44.30 (−20.6%,
against −27% for backprop LoRA on q, v of all 30 layers; bias + LoRA on q, v of the top 6 layers: 50.13).
(benchmarks/trial_output_side.py; results in docs/top-trial/.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from edgeft.manifest import TopMLP

from .quantize import GATED_FFN  # pre-norm, RMSNorm, SwiGLU MLP, plain LM head

WEIGHTS = "top_mlp.safetensors"
OUTPUTS = {"residual": "top.residual", "mlp_input": "top.mlp_input", "gate": "top.gate", "up": "top.up"}


def top_mlp_modules(model: nn.Module, architecture: str, adapter: str) -> dict[str, str] | None:
    """Module names of the top layer's gate, up and down projections, or None where the exact fit
    does not apply (another architecture or activation, or an adapter type other than LoRA)."""
    config = model.config
    if architecture not in GATED_FFN or adapter != "lora" or getattr(config, "hidden_act", None) != "silu":
        return None
    if getattr(config, "logit_scale", None) or getattr(config, "final_logit_softcapping", None):
        return None
    top = config.num_hidden_layers - 1
    names = {role: f"model.layers.{top}.mlp.{role}_proj" for role in ("gate", "up", "down")}
    try:
        for name in names.values():
            model.get_submodule(name)
    except AttributeError:
        return None
    return names


class Capture:
    """Forward hooks that keep the tensors the device's fit reads, for the traced forward to return."""

    def __init__(self, model: nn.Module, modules: dict[str, str]):
        self.values: dict[str, object] = {}
        mlp = model.get_submodule(modules["down"].rpartition(".")[0])
        model.get_submodule("model.norm").register_forward_pre_hook(self._keep_input("residual"))
        mlp.register_forward_pre_hook(self._keep_input("mlp_input"))
        for role in ("gate", "up"):
            model.get_submodule(modules[role]).register_forward_hook(self._keep_output(role))

    def _keep_input(self, key):
        def hook(module, args):
            self.values[key] = args[0]
        return hook

    def _keep_output(self, key):
        def hook(module, args, output):
            self.values[key] = output
        return hook

    def outputs(self) -> list:
        return [self.values.pop(key) for key in OUTPUTS]


def top_mlp_manifest(model: nn.Module, modules: dict[str, str]) -> TopMLP:
    return TopMLP(modules=dict(modules), outputs=dict(OUTPUTS), weights=WEIGHTS,
                  norm_eps=float(model.get_submodule("model.norm").variance_epsilon))


def write_top_mlp_weights(model: nn.Module, modules: dict[str, str], folder: Path) -> None:
    """The frozen weights the device's gradient needs (after adapter injection: the down projection
    is the wrapped layer's base, a PiSSA residual when the LoRA was initialised that way)."""
    from safetensors.numpy import save_file

    down = model.get_submodule(modules["down"])
    down = getattr(down, "base", down)

    def array(t):
        return np.ascontiguousarray(t.detach().float().numpy())

    save_file({"lm_head": array(model.get_output_embeddings().weight),
               "final_norm": array(model.get_submodule("model.norm").weight),
               "down": array(down.weight)}, str(Path(folder) / WEIGHTS))
