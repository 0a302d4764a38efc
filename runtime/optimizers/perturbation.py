"""The seed trick: a perturbation is a seed, not an array.

MeZO never stores its random direction z: it keeps the integers that generated it
and regenerates z whenever it is needed (to perturb, then to update). Logs,
checkpoints and federated messages carry ``(seed, projected_gradient)`` pairs,
from which anyone holding the starting adapter can replay a run exactly.

A seed here is a tuple of integers (run seed, step, query); numpy's
``SeedSequence`` mixes them, so neighbouring steps get independent directions.
"""

from __future__ import annotations

import numpy as np

Seed = tuple[int, ...]


def direction(seed: Seed, size: int) -> np.ndarray:
    """z ~ N(0, I) in float32, the same bits for the same seed on every machine."""
    return np.random.default_rng(np.random.SeedSequence(list(seed))).standard_normal(size, dtype=np.float32)
