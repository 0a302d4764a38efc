"""The encoder layers of a BERT-family classifier, prepared for their exact-gradient fit on the device.

The device fits the bundle's LoRA on these layers and its linear head from their exact loss gradient
without a backward graph: it reads the hidden state entering the lowest of them once per example (a
graph output every bundle has) and recomputes the layers, the pooling and the head in numpy, forward
and backward (``runtime/encoder_blocks.py``). This module checks that a model is one that code
reproduces (post-norm BERT layers with biases, absolute positions, erf GELU; a mean or CLS pooling) and
writes the frozen weights it needs (MiniLM-L6: 6 layers, 43 MB), with the embedding tables where the fit starts at
the bottom layer (47 MB more): the device then embeds the tokens in numpy and the fit runs no graph pass at all, so
the graph's session is closed while it runs (20 Newsgroups, batch 32: peak 574 MB with the cached states read from
the graph, eval's 455).

Why: on MiniLM no forward-only search moved the linear-probe start beyond noise in 200 passes
(docs/LEARNING.md), while backprop on the same LoRA gained up to +2 points; the exact gradient is what
backprop computes, here from forward outputs and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from edgeft.manifest import ENCODER_POOLING, ENCODER_ROLES, EncoderBlocks

WEIGHTS = "encoder_blocks.safetensors"
MODULES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}
NORMS = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
EMBEDDING = "embedding"  # the tensors' prefix: word, position, type tables and their LayerNorm
assert set(MODULES) == set(ENCODER_ROLES)


def _layer_prefix(model: nn.Module) -> str | None:
    """``encoder.layer`` (a bare BertModel) or ``<base>.encoder.layer``; None if the model has no such list."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(module, nn.ModuleList):
            return name
    return None


def encoder_block_layers(model: nn.Module, architecture: str, adapter: str, pooling: str, layers: list[int]) -> list[int] | None:
    """``layers`` where the device's encoder forward reproduces the model, else None (another architecture
    or activation, relative positions, a pooler head, an adapter other than LoRA)."""
    config = model.config
    if architecture != "bert" or adapter != "lora" or pooling not in ENCODER_POOLING or not layers:
        return None
    if getattr(config, "hidden_act", None) != "gelu" or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if getattr(config, "is_decoder", False) or _layer_prefix(model) is None:
        return None
    return list(layers)


def block_modules(model: nn.Module, layer: int) -> dict[str, str]:
    prefix = _layer_prefix(model)
    return {role: f"{prefix}.{layer}.{name}" for role, name in MODULES.items()}


def encoder_blocks_manifest(model: nn.Module, layers: list[int]) -> EncoderBlocks:
    config = model.config
    heads = int(config.num_attention_heads)
    return EncoderBlocks(layers=list(layers), modules=[block_modules(model, i) for i in layers], input=f"hidden.{layers[0]}",
                         weights=WEIGHTS, norm_eps=float(config.layer_norm_eps), heads=heads,
                         head_dim=int(config.hidden_size) // heads, embedding=EMBEDDING if layers[0] == 0 else None)


def write_encoder_block_weights(model: nn.Module, layers: list[int], folder: Path) -> None:
    """The frozen weights and biases of the layers, after adapter injection (a wrapped module contributes its base)."""
    from safetensors.numpy import save_file

    def array(t):
        return np.ascontiguousarray(t.detach().float().numpy())

    prefix, tensors = _layer_prefix(model), {}
    for i in layers:
        for role, name in MODULES.items():
            module = model.get_submodule(f"{prefix}.{i}.{name}")
            base = getattr(module, "base", module)
            tensors[f"{i}.{role}"], tensors[f"{i}.{role}.bias"] = array(base.weight), array(base.bias)
        for key, name in NORMS.items():
            norm = model.get_submodule(f"{prefix}.{i}.{name}")
            tensors[f"{i}.{key}"], tensors[f"{i}.{key}.bias"] = array(norm.weight), array(norm.bias)
    if layers[0] == 0:  # the device embeds the tokens itself: the fit then needs no graph pass
        embeddings = model.get_submodule(_layer_prefix(model).removesuffix("encoder.layer") + "embeddings")
        tensors[f"{EMBEDDING}.word"] = array(embeddings.word_embeddings.weight)
        tensors[f"{EMBEDDING}.position"] = array(embeddings.position_embeddings.weight)
        tensors[f"{EMBEDDING}.type"] = array(embeddings.token_type_embeddings.weight[0])
        tensors[f"{EMBEDDING}.norm"], tensors[f"{EMBEDDING}.norm.bias"] = array(embeddings.LayerNorm.weight), array(embeddings.LayerNorm.bias)
    save_file(tensors, str(Path(folder) / WEIGHTS))
