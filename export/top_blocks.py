"""The top decoder blocks of a Llama-family causal LM, prepared for their exact-gradient fit on the device.

The device fits a LoRA on the MLPs (gate, up, down) of the top blocks (by default the top 80% of
them, ``default_fit_layers``) from its exact loss gradient without a backward graph: it takes the
hidden state entering the lowest of them (a graph output every causal-LM bundle has) and recomputes
those blocks' forward and backward in numpy (``runtime/top_blocks.py``). This module checks that a
model is one that code reproduces (pre-norm RMSNorm, rotary attention without scaling, grouped KV
heads, SwiGLU, no biases, a plain LM head), names the modules and writes the frozen weights the
device needs, with the embedding table, and the graph of the layers below the blocks (``BELOW``): the
fit then embeds the tokens in numpy, runs that graph and computes the rest itself, and never opens
the whole graph, whose weights it would hold a second time (SmolLM2, K = 24: 518 MB graph, 453 MB
fit weights).

Why 80% (SmolLM2-135M, 30 layers, three tragedies → 8,750 Macbeth tokens, the fit for 10 minutes of
one core on held-back windows, seed 0, docs/fit-depth-trial/): test perplexity from 55.76 with the top
6 blocks' MLPs 39.00 (240 steps), 12: 35.57 (187), 18: 33.77 (159), 24: 31.80 (131), all 30: 31.69
(117) — deeper blocks cost steps but each step learns more, up to a plateau past 24 where the last
blocks only add memory (peak RSS 1,213 → 1,570 → 1,693 MB for 6, 24, 30). Backprop LoRA on q, v of all
30 layers in the same 10 minutes: 33.14 on that seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from edgeft.manifest import BLOCK_ROLES, TopBlocks

FIT_SHARE = 0.8  # of the layers, from the top: the default number of fitted blocks (see above)
FITTED = ["gate", "up", "down"]
WEIGHTS = "top_blocks.safetensors"
BELOW = "below_top_blocks.onnx"
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
assert set(MODULES) == set(BLOCK_ROLES)


def _rope_theta(config) -> float | None:
    """The RoPE base, or None where the rotary embedding is scaled (the device recomputes only plain RoPE)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta else None


def top_block_layers(model: nn.Module, architecture: str, adapter: str, count: int) -> list[int] | None:
    """The top ``count`` layers' indices, or None where the device's blocks forward would not reproduce
    the model (another architecture, activation, RoPE type, biases) or the adapter is not LoRA."""
    config = model.config
    if architecture != "llama" or adapter != "lora" or getattr(config, "hidden_act", None) != "silu":
        return None
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) or _rope_theta(config) is None:
        return None
    if getattr(config, "logit_scale", None) or getattr(config, "final_logit_softcapping", None):
        return None
    layers = int(config.num_hidden_layers)
    return list(range(layers - min(count, layers), layers))


def default_fit_layers(layer_count: int) -> int:
    return max(1, round(FIT_SHARE * layer_count))


def block_modules(layer: int) -> dict[str, str]:
    return {role: f"model.layers.{layer}.{name}" for role, name in MODULES.items()}


def fitted_modules(layers: list[int]) -> list[str]:
    """The modules the exporter puts a LoRA on for the fit (besides the user's targets)."""
    return [block_modules(i)[role] for i in layers for role in FITTED]


def _tied(model: nn.Module) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def top_blocks_manifest(model: nn.Module, layers: list[int], label_tokens: list[int] | None = None) -> TopBlocks:
    config = model.config
    heads = int(config.num_attention_heads)
    return TopBlocks(layers=list(layers), modules=[block_modules(i) for i in layers], fitted=list(FITTED),
                     input=f"hidden.{layers[0]}", weights=WEIGHTS, norm_eps=float(config.rms_norm_eps),
                     rope_theta=_rope_theta(config), heads=heads,
                     kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                     head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                     embedding="lm_head" if _tied(model) else "embed", below=BELOW if layers[0] > 0 else None,
                     label_tokens=None if label_tokens is None else [int(t) for t in label_tokens])


def write_top_block_weights(model: nn.Module, layers: list[int], folder: Path) -> None:
    """The frozen weights of the blocks, the final norm and the LM head, after adapter injection (a
    wrapped module contributes its base: a PiSSA residual where the LoRA was initialised that way)."""
    from safetensors.numpy import save_file

    def array(t):
        return np.ascontiguousarray(t.detach().float().numpy())

    tensors = {"lm_head": array(model.get_output_embeddings().weight),
               "final_norm": array(model.get_submodule("model.norm").weight)}
    if not _tied(model):
        tensors["embed"] = array(model.get_input_embeddings().weight)
    for i in layers:
        block = model.get_submodule(f"model.layers.{i}")
        tensors[f"{i}.input_norm"] = array(block.input_layernorm.weight)
        tensors[f"{i}.post_norm"] = array(block.post_attention_layernorm.weight)
        for role, name in block_modules(i).items():
            module = model.get_submodule(name)
            tensors[f"{i}.{role}"] = array(getattr(module, "base", module).weight)
    save_file(tensors, str(Path(folder) / WEIGHTS))


def write_below_graph(folder: Path, manifest) -> None:
    """``BELOW``: the bundle graph cut to the layers under the top blocks, from the embeddings
    (``hidden.0``, the token embedding's output; the token ids where the manifest names no embedding
    table: an int8/int4 bundle, whose graph embeds with its own quantised table) and the attention mask
    to the blocks' input, with the LoRA inputs of those layers. The cut is by data flow (``onnx.utils.Extractor``), so it is the same
    computation as the whole graph's up to that tensor (tests/test_top_blocks.py compares the two)."""
    import onnx
    from onnx import utils

    from edgeft.adapters import layer_of
    from edgeft.errors import EdgeftError
    from edgeft.manifest import MODEL_NAME

    from .onnx_files import load_model, save_model

    top = manifest.top_blocks
    model = load_model(Path(folder) / MODEL_NAME, weights=False)
    below = [t.name for t in manifest.adapter.tensors if 0 <= layer_of(t.name) < top.layers[0]]
    start = top.below_input()
    part = utils.Extractor(model).extract_model([start, "attention_mask", *below], [top.input])
    del model
    known = {i.name for i in part.graph.input} | {i.name for i in part.graph.initializer}
    known |= {o for n in part.graph.node for o in n.output}
    read = {x for n in part.graph.node for x in n.input if x}
    unfed = sorted(read - known)
    if unfed:  # the layers below read something besides the embeddings and the mask (e.g. the token ids)
        raise EdgeftError(f"cannot cut the graph below the top blocks: it reads {unfed[0]}")
    kept = [i for i in part.graph.input if i.name in read or i.name == start]
    del part.graph.input[:]
    part.graph.input.extend(kept)
    onnx.load_external_data_for_model(part, str(folder))
    save_model(part, Path(folder) / BELOW)
