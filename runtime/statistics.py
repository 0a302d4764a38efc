"""Per-layer hidden-state statistics, read once before training (forward passes of the base model).

The population optimizers scale each layer's block of their random projection by the
std of the hidden states entering that layer (DFO for LoRA, 2403.01754, after BBTv2):
a layer whose inputs vary more gets proportionally larger search steps.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle, Encoded

CLIP_PERCENTILE = 99.9  # a few "massive activation" channels would otherwise set the std


def layer_input_std(bundle: Bundle, encoded: Encoded, batch_size: int = 16, limit: int = 64) -> list[float] | None:
    """Std of the hidden states entering each layer (padding excluded, |values| clipped at the
    99.9th percentile), over the first ``limit`` examples; None when the bundle has no such outputs."""
    names = bundle.manifest.hidden_states
    if not names or len(encoded) == 0:
        return None
    start = bundle.layout.initial(0)  # every adapter type starts at the base model
    sums = [[] for _ in names]
    rows = np.arange(min(len(encoded), limit))
    for begin in range(0, len(rows), batch_size):
        feeds = bundle.feeds(encoded, rows[begin : begin + batch_size])
        mask = feeds["attention_mask"].astype(bool)
        for values, out in zip(sums, bundle.run(feeds, start, names)):
            values.append(out[mask].ravel())
    stds = []
    for values in sums:
        flat = np.concatenate(values).astype(np.float64)
        bound = np.percentile(np.abs(flat), CLIP_PERCENTILE)
        stds.append(float(np.std(np.clip(flat, -bound, bound))))
    return stds


def layer_input_bases(bundle: Bundle, encoded: Encoded, k: int, batch_size: int = 16, limit: int = 256) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per layer, the top-``k`` principal directions of the hidden states entering it (the uncentred
    second moment over the non-padding tokens of the first ``limit`` examples), as ([hidden, k]
    orthonormal columns, their k eigenvalues); None when the bundle has no such outputs.

    A linear layer's weight gradient is δ·xᵀ, so the input side of its update lies in the span of
    its inputs x; uncentred, because that span includes the inputs' mean."""
    names = bundle.manifest.hidden_states
    if not names or len(encoded) == 0:
        return None
    start = bundle.layout.initial(0)
    moments: list[np.ndarray | None] = [None] * len(names)
    rows = np.arange(min(len(encoded), limit))
    for begin in range(0, len(rows), batch_size):
        feeds = bundle.feeds(encoded, rows[begin : begin + batch_size])
        mask = feeds["attention_mask"].astype(bool)
        for index, out in enumerate(bundle.run(feeds, start, names)):
            x = out[mask].astype(np.float64)
            moments[index] = x.T @ x if moments[index] is None else moments[index] + x.T @ x
    bases = []
    for moment in moments:
        values, vectors = np.linalg.eigh(moment)
        top = np.argsort(values)[::-1][:k]
        bases.append((vectors[:, top].astype(np.float32), values[top]))
    return bases
