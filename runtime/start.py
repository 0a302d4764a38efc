"""Where fine-tuning starts: the adapter at a zero update (LoRA: PEFT's init), and for classification a
linear-probe head.

A fresh random head trained by ZO alone learns next to nothing in an edge-sized
budget (research.md: 55.6% on Rotten Tomatoes after 1,433 MeZO steps). A linear
probe fitted on the few-shot set's pooled embeddings — forward passes only, no
backward graph — starts the optimizer from a good point (linear-probe-then-fine-tune).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.adapters import HEAD_WEIGHTS, load_adapter

from .bundle import Bundle, Encoded
from .evaluate import pooled_features
from .probe import fit_linear_probe


def starting_adapter(bundle: Bundle, train: Encoded, seed: int = 0, init_adapter=None, batch_size: int = 32) -> tuple[np.ndarray, str]:
    """The adapter vector to start from, and a short description of how it was made."""
    vector = bundle.layout.initial(seed)
    spec = bundle.manifest.adapter
    how = {"lora": "LoRA init (PiSSA)" if spec.init == "pissa" else "LoRA init (B = 0)", "loldu": "LoLDU init (z = 1)",
           "tt": "TT init (last core 0)", "bone": "Bone init (blocks 0)"}.get(spec.kind, f"{spec.kind} init")
    has_head = any(t.role == "head_weight" for t in bundle.layout.tensors)
    head_loaded = False
    if init_adapter is not None:
        vector = load_adapter(init_adapter, bundle.layout, base=vector)
        head_loaded = has_head and (Path(init_adapter) / HEAD_WEIGHTS).is_file()
        how = f"adapter from {init_adapter}"
    if has_head and not head_loaded:
        features = pooled_features(bundle, vector, train, batch_size)
        weight, bias = fit_linear_probe(features, train.labels, len(bundle.labels))
        named = bundle.layout.unflatten(vector)
        named["head.weight"][...] = weight
        named["head.bias"][...] = bias
        how += f" + linear-probe head fitted on {len(train)} examples"
    return vector, how
