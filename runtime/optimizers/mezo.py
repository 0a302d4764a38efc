"""MeZO / ZO-SGD (Malladi et al. 2023): two forward passes per query, one scalar per step.

For each of ``queries`` seeds s: z = direction(s); losses at θ+εz and θ−εz give the
projected gradient g = (L+ − L−) / 2ε. The update is
θ ← θ − lr_t · (mean_s g_s·z_s + wd·θ), regenerating each z from its seed.
Defaults follow the paper's LoRA setting (lr 1e-4, ε 1e-3, one query, constant lr).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import StepReport
from .perturbation import direction

# A step whose losses are not finite is skipped and the lr multiplied by this.
NONFINITE_LR_FACTOR = 0.5


@dataclass(frozen=True)
class MeZOConfig:
    lr: float = 1e-4
    eps: float = 1e-3
    queries: int = 1
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "linear" (to zero at total_steps)
    total_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.lr <= 0 or self.eps <= 0 or self.queries < 1 or self.weight_decay < 0:
            raise ValueError("MeZO needs lr > 0, eps > 0, queries >= 1, weight_decay >= 0")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"unknown lr schedule {self.schedule!r}")


class MeZO:
    name = "mezo"

    def __init__(self, theta: np.ndarray, config: MeZOConfig = MeZOConfig()):
        self.config = config
        self._theta = np.array(theta, dtype=np.float32, copy=True)
        self.step = 0
        self.lr_scale = 1.0  # lowered after non-finite losses

    @property
    def theta(self) -> np.ndarray:
        return self._theta

    def lr(self) -> float:
        c = self.config
        decay = max(0.0, 1.0 - self.step / c.total_steps) if c.schedule == "linear" else 1.0
        return c.lr * decay * self.lr_scale

    def seeds(self) -> list[tuple[int, int, int]]:
        return [(self.config.seed, self.step, q) for q in range(self.config.queries)]

    def ask(self) -> list[np.ndarray]:
        eps = np.float32(self.config.eps)
        candidates = []
        for seed in self.seeds():
            z = direction(seed, self._theta.size)
            candidates += [self._theta + eps * z, self._theta - eps * z]
        return candidates

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport:
        losses = np.asarray(losses, dtype=np.float64)
        seeds = self.seeds()
        lr = self.lr()
        self.step += 1
        if not np.all(np.isfinite(losses)):
            self.lr_scale *= NONFINITE_LR_FACTOR
            return StepReport(self.step, float("nan"), lr, skipped=True,
                              message=f"non-finite loss at step {self.step}: step skipped, lr lowered to {self.lr():.3g}")
        grads = (losses[0::2] - losses[1::2]) / (2 * self.config.eps)
        update = np.zeros_like(self._theta)
        for seed, g in zip(seeds, grads):
            update += np.float32(g / len(seeds)) * direction(seed, self._theta.size)
        if self.config.weight_decay:
            update += np.float32(self.config.weight_decay) * self._theta
        self._theta -= np.float32(lr) * update
        return StepReport(self.step, float(losses.mean()), lr, seeds=[list(s) for s in seeds],
                          projected_grads=[float(g) for g in grads])

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return {"theta": self._theta.copy()}, {"step": self.step, "lr_scale": self.lr_scale, "config": asdict(self.config)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        self._theta = np.array(arrays["theta"], dtype=np.float32, copy=True)
        self.step = int(scalars["step"])
        self.lr_scale = float(scalars["lr_scale"])
