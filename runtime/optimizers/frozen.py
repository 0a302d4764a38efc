"""Search part of the adapter vector, hold the rest fixed.

A causal LM's output bias is fitted in closed form at the start (``runtime/output_fit.py``);
the zeroth-order search then tunes the body only. Perturbing the 49k bias values as well
would add their variance to every estimate (a ZO estimate's variance grows with the number of
values it moves) for values that already sit near their optimum.
"""

from __future__ import annotations

import numpy as np

from .base import StepReport


class Frozen:
    """Wraps an optimizer over ``full[index]``; candidates and ``theta`` are full vectors."""

    def __init__(self, inner, full: np.ndarray, index: np.ndarray):
        self.inner, self.index = inner, np.asarray(index, dtype=np.int64)
        self.name = inner.name
        self._full = np.array(full, dtype=np.float32, copy=True)

    @property
    def step(self) -> int:
        return self.inner.step

    @property
    def theta(self) -> np.ndarray:
        self._full[self.index] = self.inner.theta
        return self._full

    def _expand(self, part: np.ndarray) -> np.ndarray:
        full = self._full.copy()
        full[self.index] = part
        return full

    def ask(self) -> list[np.ndarray]:
        return [self._expand(c) for c in self.inner.ask()]

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport:
        return self.inner.tell([c[self.index] for c in candidates], losses)

    def __getattr__(self, name):
        """The wrapped optimizer's settings and extras (config, lr(), lr_scale, ...); its roll_back
        (the trainer's divergence guard) takes and its distribution() returns full vectors here.
        Absent there, absent here."""
        if name == "inner":
            raise AttributeError(name)
        value = getattr(self.inner, name)
        if name == "roll_back":
            return lambda theta, lr_factor=0.5: value(np.asarray(theta)[self.index], lr_factor)
        if name == "distribution":  # σ over the full vector: 0 where values are held fixed
            return lambda: self._scatter(value())
        return value

    def _scatter(self, part: np.ndarray) -> np.ndarray:
        full = np.zeros_like(self._full)
        full[self.index] = part
        return full

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays, scalars = self.inner.state_dict()
        return {**arrays, "frozen.full": self.theta.copy()}, scalars

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        self._full = np.array(arrays["frozen.full"], dtype=np.float32, copy=True)
        self.inner.load_state_dict({k: v for k, v in arrays.items() if k != "frozen.full"}, scalars)
