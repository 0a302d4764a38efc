"""MonteCLoRA, forward-only: the adapter as a Gaussian distribution, fitted by natural evolution strategies.

MonteCLoRA (arXiv 2411.04358) treats LoRA's parameters as a posterior estimated from Monte-Carlo
samples, for stability across hyperparameters and lower-variance predictions; its estimator is a
gradient. The forward-only estimator of the same expected-loss objective is a natural evolution
strategy (separable NES, Wierstra et al. 2014): keep q(θ) = N(μ, diag(σ²)) over the adapter and
minimise

    J(μ, σ) = E_q[L(θ)] + (β / n) · KL(q ‖ p),   p = N(μ₀, τ²·I)   (μ₀ the start, n training examples)

Per step, q antithetic pairs θ = μ ± σ⊙εᵢ (εᵢ ~ N(0, I) from a seed, never stored; 2·q passes) give

    ∂J/∂μ   ≈ mean_i dᵢ·εᵢ / σ          dᵢ = (L⁺ᵢ − L⁻ᵢ) / 2  (E[(σ⊙ε·∇)·ε/σ] = ∇)
    ∂J/∂logσ ≈ mean_i cᵢ·(εᵢ² − 1)       cᵢ = (L⁺ᵢ + L⁻ᵢ) / 2 − mean_j (L⁺ⱼ + L⁻ⱼ) / 2   (q ≥ 2; 0 for q = 1)

and the prior adds its closed form, (β/n)·(μ − μ₀)/τ² and (β/n)·(σ²/τ² − 1). At σ = σ₀ and β = 0 the
mean step is exactly MeZO's with ε = σ₀. (The natural gradient, σ²·∂J/∂μ, was tried first: where σ
grew tenfold it made the step tenfold and diverged on the shared test problem.) Like the other zeroth-order optimizers, the
default mean step divides the estimate by a running RMS of the projected gradients and moves each
value by ``auto_step(size)`` (``zeroorder.py``). The log σ gradient is taken in the loss's own units
(the pairs' curvature term is σ²·H, so data and prior balance at the posterior variance
σ² = (β/n) / (H + (β/n)/τ²)); σ stays within [σ₀/10, 10·σ₀]. In an edge budget σ barely moves from σ₀
(the curvature estimate from two pairs is very noisy and the prior's pull is β/n per step).

State: μ, log σ and the running RMS (checkpointed; the εᵢ are seeds). The trainer keeps the best μ;
``distribution()`` gives σ, which ``edgeft train`` saves beside the adapter (``edgeft.adapters``,
``distribution.safetensors``) so that ``edgeft predict/eval --samples N`` can average sampled adapters.
Simplifications against the paper, said plainly: one diagonal Gaussian, not a mixture with
Wishart/Dirichlet hyperpriors; the prior is an isotropic Gaussian around the start.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .base import StepReport
from .perturbation import direction
from .zeroorder import GRAD_RMS_DECAY, NONFINITE_LR_FACTOR, scheduled_lr, warmup_steps

SIGMA_RANGE = 10.0  # σ stays within [σ₀ / 10, 10·σ₀]


@dataclass(frozen=True)
class MonteCLoRAConfig:
    lr: float | None = None  # mean step; None: auto_step(size) on RMS-normalised estimates
    sigma: float = 1e-3  # σ₀, the start spread (MeZO's ε: the same probe size at the start)
    sigma_lr: float = 1.0  # log σ step per unit of its gradient (in the loss's units)
    queries: int = 2  # antithetic pairs per step (2·q passes); ≥ 2 for the σ update
    prior_std: float = 1.0  # τ (a weak prior: LoRA values move by 1e-3 to 1e-1)
    prior_weight: float = 1.0  # β
    examples: int = 1  # n, the training set's size (the KL is per example)
    warmup: int | None = None
    total_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if (self.lr is not None and self.lr <= 0) or self.sigma <= 0 or self.sigma_lr < 0 or self.prior_std <= 0:
            raise ValueError("needs lr > 0, sigma > 0, sigma_lr >= 0, prior_std > 0")
        if self.queries < 1 or self.prior_weight < 0 or self.examples < 1:
            raise ValueError("needs queries >= 1, prior_weight >= 0, examples >= 1")


class MonteCLoRA:
    name = "monteclora"

    def __init__(self, theta: np.ndarray, config: MonteCLoRAConfig = MonteCLoRAConfig()):
        self.config = config
        self._mu = np.array(theta, dtype=np.float32, copy=True)
        self._start = self._mu.copy()  # μ₀, the prior's centre
        self._log_sigma = np.full(self._mu.size, math.log(config.sigma), dtype=np.float32)
        self.step = 0
        self.lr_scale = 1.0
        self.grad_ms, self.grad_weight = 0.0, 0.0

    @property
    def theta(self) -> np.ndarray:
        return self._mu

    def distribution(self) -> np.ndarray:
        """σ per adapter value (the mean is ``theta``)."""
        return np.exp(self._log_sigma)

    def warmup_steps(self) -> int:
        return warmup_steps(self.config)

    def lr(self) -> float:
        return scheduled_lr(self.config, self.step, self._mu.size, self.lr_scale)

    def _noise(self, step: int, query: int) -> np.ndarray:
        return direction((self.config.seed, step, query), self._mu.size)

    def ask(self) -> list[np.ndarray]:
        sigma = self.distribution()
        out = []
        for q in range(self.config.queries):
            move = sigma * self._noise(self.step, q)
            out += [self._mu + move, self._mu - move]
        return out

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport:
        c = self.config
        losses = np.asarray(losses, dtype=np.float64)
        step, lr = self.step, self.lr()
        seeds = [[c.seed, step, q] for q in range(c.queries)]
        self.step += 1
        if not np.all(np.isfinite(losses)):
            self.lr_scale *= NONFINITE_LR_FACTOR
            return StepReport(self.step, float("nan"), lr, skipped=True,
                              message=f"non-finite loss at step {self.step}: step skipped, lr lowered to {self.lr():.3g}")
        plus, minus = losses[0::2], losses[1::2]
        sigma = self.distribution()
        typical = float(np.sqrt(np.mean(sigma.astype(np.float64) ** 2)))
        g = (plus - minus) / (2 * typical)  # projected gradients: MeZO's with ε = σ where σ is uniform
        centred = (plus + minus) / 2
        centred = centred - centred.mean() if c.queries > 1 else np.zeros_like(centred)
        report = StepReport(self.step, float(losses.mean()), lr, seeds=seeds, projected_grads=[float(x) for x in g])
        estimate = np.zeros_like(self._mu)
        curvature = np.zeros_like(self._mu)
        for q in range(c.queries):
            eps = self._noise(step, q)
            estimate += np.float32(g[q] / c.queries) * eps
            curvature += np.float32(centred[q] / c.queries) * (eps * eps - 1)
        prior = c.prior_weight / c.examples
        norm = np.float32(self._normaliser(g) if c.lr is None else 1.0)
        # ∂J/∂μ: the pairs' estimate, per value divided by its σ relative to the typical one (E[d·ε/σ] = ∇),
        # plus the prior's closed form
        mu_step = estimate * (np.float32(typical) / sigma) + np.float32(prior / c.prior_std**2) * (self._mu - self._start)
        self._mu -= np.float32(lr) * norm * mu_step
        if c.sigma_lr > 0:
            # ∂J/∂log σ in the loss's own units: σ²·H from the pairs' curvature, (β/n)(σ²/τ² − 1) from the prior;
            # they balance at the posterior variance σ² = (β/n) / (H + (β/n)/τ²)
            log_step = curvature + np.float32(prior) * (sigma * sigma / np.float32(c.prior_std**2) - 1)
            self._log_sigma -= np.float32(c.sigma_lr * self.lr_scale) * log_step
            np.clip(self._log_sigma, math.log(c.sigma / SIGMA_RANGE), math.log(c.sigma * SIGMA_RANGE), out=self._log_sigma)
        return report

    def _normaliser(self, g: np.ndarray) -> float:
        """1 / running RMS of the projected gradients, for the default lr (as ``ZeroOrder``)."""
        self.grad_ms = GRAD_RMS_DECAY * self.grad_ms + (1 - GRAD_RMS_DECAY) * float(np.mean(g**2))
        self.grad_weight = GRAD_RMS_DECAY * self.grad_weight + (1 - GRAD_RMS_DECAY)
        rms = math.sqrt(self.grad_ms / self.grad_weight)
        return 1.0 / rms if rms > 0 else 0.0

    def roll_back(self, theta: np.ndarray, lr_factor: float = 0.5) -> None:
        self._mu = np.array(theta, dtype=np.float32, copy=True)
        self.lr_scale *= lr_factor

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"theta": self._mu.copy(), "log_sigma": self._log_sigma.copy(), "start": self._start.copy()}
        return arrays, {"step": self.step, "lr_scale": self.lr_scale, "grad_ms": self.grad_ms,
                        "grad_weight": self.grad_weight, "config": asdict(self.config)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        self._mu = np.array(arrays["theta"], dtype=np.float32, copy=True)
        self._log_sigma = np.array(arrays["log_sigma"], dtype=np.float32, copy=True)
        self._start = np.array(arrays["start"], dtype=np.float32, copy=True)
        self.step, self.lr_scale = int(scalars["step"]), float(scalars["lr_scale"])
        self.grad_ms, self.grad_weight = float(scalars["grad_ms"]), float(scalars["grad_weight"])
