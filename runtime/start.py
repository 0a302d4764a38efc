"""Where fine-tuning starts: the adapter at a zero update (LoRA: PEFT's init), and for classification a
linear-probe head.

A fresh random head trained by ZO alone learns next to nothing in an edge-sized
budget (research.md: 55.6% on Rotten Tomatoes after 1,433 MeZO steps). A linear
probe fitted on the few-shot set's pooled embeddings — forward passes only, no
backward graph — starts the optimizer from a good point (linear-probe-then-fine-tune),
its logits scaled by the temperature with the least cross-validated loss (``probe_temperature``) when the
set is large enough for the folds to choose it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.adapters import HEAD_WEIGHTS, load_adapter

from .bundle import Bundle, Encoded
from .evaluate import pooled_features
from .probe import fit_linear_probe, probe_temperature


TEMPERATURE_FOLDS = 4
# Below this many examples the folds' choice is noise: MiniLM on Rotten Tomatoes at 32 examples chose 5.7, 0.25
# and 1.7 over three draws, and the first two raised the test loss (0.685 -> 1.046, 0.661 -> 0.682); on
# 20 Newsgroups at 320 it chose 4 on every draw and halved it (1.86 -> 0.98)
TEMPERATURE_MIN_EXAMPLES = 100


def starting_adapter(bundle: Bundle, train: Encoded, seed: int = 0, init_adapter=None, batch_size: int = 32,
                     temper: bool = True) -> tuple[np.ndarray, str]:
    """The adapter vector to start from, and a short description of how it was made. ``temper=False`` leaves the
    probe's logits at C = 1's scale, for the encoder fit to start from and calibrate afterwards on held-out data
    (``encoder_fit.fit_encoder``): from the sharpened head the training set is already fitted (20 Newsgroups: training
    loss 0.10–0.28) and the fit gained half as much (docs/learning-notes.md, session 20)."""
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
        how += f" + linear-probe head fitted on {len(train)} examples"
        if temper and len(train) >= TEMPERATURE_MIN_EXAMPLES:  # its logits' scale, by cross-validation on the same examples
            t, before, after = probe_temperature(features, train.labels, len(bundle.labels), folds=TEMPERATURE_FOLDS, seed=seed)
            weight, bias = weight * t, bias * t
            how += f", its logits scaled by {t:.3g} (out-of-fold loss {before:.3f} -> {after:.3f})"
        named = bundle.layout.unflatten(vector)
        named["head.weight"][...] = weight
        named["head.bias"][...] = bias
    return vector, how
