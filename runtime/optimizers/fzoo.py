"""FZOO (arXiv 2506.09034): many one-sided directions around one base loss, normalised by their spread.

Per step: the loss l₀ at θ and lᵢ at θ + ε·uᵢ for N Rademacher directions uᵢ (N + 1 forward
passes, not 2N as N two-point MeZO queries would cost), then

    θ ← θ − η · Σᵢ (lᵢ − l₀) / (N · std(l₁..l_N)) · uᵢ

Dividing by the standard deviation of the N losses makes the step size independent of the
loss's scale and shrinks it where the losses disagree (noisy directions), an Adam-like
normalisation that needs no state. Directions are seeds (``(seed, step, i)``), as everywhere.

Default lr: the same per-coordinate step as the other zeroth-order optimizers' default
(``auto_step``: 1e-3 at 100k values, ∝ 1/sqrt(size)), since (lᵢ − l₀)/std is O(1) like their
RMS-normalised projected gradients. N = 8 is the paper's; it was not re-tuned here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import StepReport
from .zeroorder import NONFINITE_LR_FACTOR, scheduled_lr, warmup_steps


@dataclass(frozen=True)
class FZOOConfig:
    lr: float | None = None  # None: auto_step(size)
    eps: float = 1e-3
    directions_per_step: int = 8  # N
    warmup: int | None = None  # None: 5% of total_steps (≤ 50) with the default lr, else 0
    total_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if (self.lr is not None and self.lr <= 0) or self.eps <= 0:
            raise ValueError("needs lr > 0 and eps > 0")
        if self.directions_per_step < 2:
            raise ValueError("needs directions_per_step >= 2 (the spread of one loss is undefined)")


def rademacher(seed: tuple[int, ...], size: int) -> np.ndarray:
    """±1 in float32, the same bits for the same seed on every machine."""
    bits = np.random.default_rng(np.random.SeedSequence(list(seed))).integers(0, 2, size=size, dtype=np.int8)
    return (bits.astype(np.float32) * 2.0 - 1.0)


class FZOO:
    name = "fzoo"

    def __init__(self, theta: np.ndarray, config: FZOOConfig = FZOOConfig()):
        self.config = config
        self._theta = np.array(theta, dtype=np.float32, copy=True)
        self.step = 0
        self.lr_scale = 1.0

    @property
    def theta(self) -> np.ndarray:
        return self._theta

    def warmup_steps(self) -> int:
        return warmup_steps(self.config)

    def lr(self) -> float:
        return scheduled_lr(self.config, self.step, self._theta.size, self.lr_scale)

    def _direction(self, step: int, i: int) -> np.ndarray:
        return rademacher((self.config.seed, step, i), self._theta.size)

    def ask(self) -> list[np.ndarray]:
        eps = np.float32(self.config.eps)
        return [self._theta.copy()] + [self._theta + eps * self._direction(self.step, i)
                                       for i in range(self.config.directions_per_step)]

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport:
        c = self.config
        losses = np.asarray(losses, dtype=np.float64)
        step, lr, n = self.step, self.lr(), c.directions_per_step
        seeds = [[c.seed, step, i] for i in range(n)]
        self.step += 1
        if not np.all(np.isfinite(losses)):
            self.lr_scale *= NONFINITE_LR_FACTOR
            return StepReport(self.step, float("nan"), lr, skipped=True,
                              message=f"non-finite loss at step {self.step}: step skipped, lr lowered to {self.lr():.3g}")
        base, perturbed = losses[0], losses[1 : n + 1]
        spread = float(perturbed.std())
        report = StepReport(self.step, float(base), lr, seeds=seeds,
                            projected_grads=[float(x) for x in (perturbed - base) / c.eps])
        if spread <= 0.0:
            report.message = "fzoo: all perturbed losses equal, step skipped"
            return report
        update = np.zeros_like(self._theta)
        for i, li in enumerate(perturbed):
            update += np.float32((li - base) / (n * spread)) * self._direction(step, i)
        self._theta -= np.float32(lr) * update
        return report

    def roll_back(self, theta: np.ndarray, lr_factor: float = 0.5) -> None:
        self._theta = np.array(theta, dtype=np.float32, copy=True)
        self.lr_scale *= lr_factor

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return {"theta": self._theta.copy()}, {"step": self.step, "lr_scale": self.lr_scale, "config": asdict(self.config)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        self._theta = np.array(arrays["theta"], dtype=np.float32, copy=True)
        self.step, self.lr_scale = int(scalars["step"]), float(scalars["lr_scale"])
