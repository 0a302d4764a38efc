"""Zeroth-order optimizers built from pieces: a direction family, an update rule, a query schedule.

For each query i: z_i = direction(step, i); losses at θ+εz_i and θ−εz_i give the
projected gradient g_i = (L+ − L−) / 2ε (or its sign, ZO-SGD-Sign). The estimate
ĝ = mean_i g_i·z_i (+ wd·θ) goes through the update rule (SGD, momentum, Adam,
Kalman), and θ ← θ − update. ``conservative`` also evaluates θ itself and skips a
step whose direction has θ as the best of the three points (ZO-SGD-Cons, 3 forwards).

MeZO (Malladi et al. 2023) = Gaussian directions + SGD; the registry builds every
named variant from these pieces (``optimizers/__init__.py``).

Default step size (``lr=None``): the right MeZO lr differs by 10x between models (here:
1e-2 for MiniLM classification, 1e-3 for SmolLM2 prompts) because the projected
gradients differ in size (median |g| 0.15 vs 0.63) and in count (75k vs 460k values).
Both good settings move each coordinate by about the same amount per step, lr·|g| ≈
1e-3, and the larger adapter wants the smaller move. So the default divides ĝ by a
running RMS of the projected gradients (information the forward passes already give)
and moves each coordinate by ``auto_step(d) = 1e-3·sqrt(1e5/d)`` per unit of that
normalised estimate. Sign and Adam updates are scale-free already and take the same
per-coordinate step; momentum sums ~1/(1−β) estimates and takes (1−β) of it. The lr
warms up linearly over the first ``warmup`` steps (default lr: 5% of the run, ≤ 50).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .base import StepReport
from .directions import FAMILIES
from .updates import RULES

NONFINITE_LR_FACTOR = 0.5  # a step with non-finite losses is skipped and the lr multiplied by this
STEP_AT_REFERENCE, REFERENCE_SIZE = 1e-3, 1e5  # the default per-coordinate step, at 100k adapter values
GRAD_RMS_DECAY = 0.95  # running RMS of projected gradients (normalises the default step)


def auto_step(size: int) -> float:
    """Per-coordinate step of the default lr for an adapter of ``size`` values."""
    return STEP_AT_REFERENCE * math.sqrt(REFERENCE_SIZE / max(size, 1))


@dataclass(frozen=True)
class ZOConfig:
    lr: float | None = None  # None: auto_step(size) on RMS-normalised estimates (see module doc)
    eps: float = 1e-3
    warmup: int | None = None  # steps of linear lr warm-up; None: with the default lr 5% of total_steps (≤ 50), else 0
    queries: int | str = 1  # an int, or "auto": AdaZeta's schedule (grows with the epoch)
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "linear" (to zero at total_steps)
    total_steps: int = 1000
    seed: int = 0
    directions: str = "gaussian"  # gaussian | subspace | lowrank | activations
    update: str = "sgd"  # sgd | momentum | adam | kalman; "lora-pro[+rule]": LoRA-Pro's adjustment first (lora_pro.py)
    sign: bool = False
    conservative: bool = False
    rank: int = 2  # subspace / lowrank directions; activations: principal directions kept per layer
    refresh: int = 50  # steps a subspace basis / LOZO's v is kept
    max_queries: int = 15  # AdaZeta Q_max
    shrink: float = 0.85  # AdaZeta
    steps_per_epoch: int = 1  # AdaZeta counts epochs
    lora_pro_damping: float = 1.0  # update lora-pro: ρ of its damped inverses (lora_pro.py)

    def __post_init__(self):
        if (self.lr is not None and self.lr <= 0) or self.eps <= 0 or self.weight_decay < 0 or self.lora_pro_damping < 0:
            raise ValueError("needs lr > 0, eps > 0, weight_decay >= 0, lora_pro_damping >= 0")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError("needs warmup >= 0")
        if not (self.queries == "auto" or (isinstance(self.queries, int) and self.queries >= 1)):
            raise ValueError(f"queries must be a positive integer or 'auto', not {self.queries!r}")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"unknown lr schedule {self.schedule!r}")
        if self.directions not in FAMILIES or rule_name(self.update) not in RULES:
            raise ValueError(f"unknown directions {self.directions!r} or update {self.update!r}")


LORA_PRO = "lora-pro"


def rule_name(update: str) -> str:
    """The update rule of ``update``: "lora-pro" chains LoRA-Pro's adjustment before SGD, "lora-pro+R" before R."""
    if update == LORA_PRO:
        return "sgd"
    return update[len(LORA_PRO) + 1:] if update.startswith(LORA_PRO + "+") else update


def warmup_steps(config) -> int:
    """Linear lr warm-up length: ``config.warmup`` if set; else 5% of the run (at most 50 steps) with the
    default lr, none with an explicit one (it reproduces a paper's setting: MeZO has no warm-up)."""
    if config.warmup is not None:
        return config.warmup
    return min(50, config.total_steps // 20) if config.lr is None else 0


def scheduled_lr(config, step: int, size: int, lr_scale: float) -> float:
    """The lr of FZOO and MonteCLoRA: ``config.lr`` or ``auto_step(size)``, after the linear warm-up."""
    warm_steps = warmup_steps(config)
    warm = min(1.0, (step + 1) / warm_steps) if warm_steps else 1.0
    base = config.lr if config.lr is not None else auto_step(size)
    return base * warm * lr_scale


def adazeta_queries(epoch: int, total_epochs: int, max_queries: int, shrink: float) -> int:
    """Q_e = min(max(floor(shrink·e^inc), 1), Q_max), inc = log(Q_max/shrink)/log(total_epochs)."""
    if total_epochs <= 1:
        return max_queries
    inc = math.log(max_queries / shrink) / math.log(total_epochs)
    return int(min(max(math.floor(shrink * max(epoch, 1) ** inc), 1), max_queries))


class ZeroOrder:
    def __init__(self, theta: np.ndarray, config: ZOConfig = ZOConfig(), shapes=None, name: str = "zo", adjust=None,
                 bases=None):
        """``adjust(theta, ĝ) -> ĝ'``: a transformation of the estimate before the update rule (LoRA-Pro's,
        required when ``config.update`` names it). ``bases``: per tensor, its input basis or None (required
        by ``directions="activations"``)."""
        self.name = name
        self.config = config
        self._theta = np.array(theta, dtype=np.float32, copy=True)
        shapes = shapes or [(self._theta.size,)]
        extra = {"bases": bases} if config.directions == "activations" else {}
        self.directions = FAMILIES[config.directions](shapes, config.seed, rank=config.rank, refresh=config.refresh, **extra)
        self.rule = RULES[rule_name(config.update)]()
        if config.update.startswith(LORA_PRO) and adjust is None:
            raise ValueError("update lora-pro needs the bundle's LoRA pairs")
        self.adjust = adjust
        self.state = self.rule.init(self._theta.size)
        self.step = 0
        self.lr_scale = 1.0
        self.grad_ms = 0.0  # running mean of squared projected gradients (auto lr), bias-corrected by grad_weight
        self.grad_weight = 0.0

    @property
    def theta(self) -> np.ndarray:
        return self._theta

    def warmup_steps(self) -> int:
        return warmup_steps(self.config)

    def lr(self) -> float:
        """The step's learning rate; with the default (auto) lr, per unit of RMS-normalised estimate."""
        c = self.config
        decay = max(0.0, 1.0 - self.step / c.total_steps) if c.schedule == "linear" else 1.0
        warm = min(1.0, (self.step + 1) / self.warmup_steps()) if self.warmup_steps() else 1.0
        if c.lr is not None:
            return c.lr * decay * warm * self.lr_scale
        base = auto_step(self._theta.size) * ((1 - self.rule.beta) if self.rule.name == "momentum" else 1.0)
        return base * decay * warm * self.lr_scale

    def _normaliser(self, grads: np.ndarray) -> float:
        """1 / running RMS of projected gradients, for the auto lr (1 with an explicit lr or a sign update)."""
        if self.config.lr is not None or self.config.sign:
            return 1.0
        self.grad_ms = GRAD_RMS_DECAY * self.grad_ms + (1 - GRAD_RMS_DECAY) * float(np.mean(grads**2))
        self.grad_weight = GRAD_RMS_DECAY * self.grad_weight + (1 - GRAD_RMS_DECAY)
        rms = math.sqrt(self.grad_ms / self.grad_weight)
        return 1.0 / rms if rms > 0 else 0.0

    def queries(self) -> int:
        c = self.config
        if c.queries != "auto":
            return int(c.queries)
        epochs = max(1, math.ceil(c.total_steps / c.steps_per_epoch))
        return adazeta_queries(self.step // c.steps_per_epoch + 1, epochs, c.max_queries, c.shrink)

    def seeds(self) -> list[list[int]]:
        return [[self.config.seed, self.step, q] for q in range(self.queries())]

    def ask(self) -> list[np.ndarray]:
        eps = np.float32(self.config.eps)
        candidates = []
        for q in range(self.queries()):
            z = self.directions(self.step, q)
            candidates += [self._theta + eps * z, self._theta - eps * z]
        if self.config.conservative:
            candidates.append(self._theta.copy())
        return candidates

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport:
        c = self.config
        losses = np.asarray(losses, dtype=np.float64)
        seeds, lr, step = self.seeds(), self.lr(), self.step
        self.step += 1
        if not np.all(np.isfinite(losses)):
            self.lr_scale *= NONFINITE_LR_FACTOR
            return StepReport(self.step, float("nan"), lr, skipped=True,
                              message=f"non-finite loss at step {self.step}: step skipped, lr lowered to {self.lr():.3g}")
        pairs = losses[: 2 * len(seeds)]
        grads = (pairs[0::2] - pairs[1::2]) / (2 * c.eps)
        report = StepReport(self.step, float(pairs.mean()), lr, seeds=seeds, projected_grads=[float(g) for g in grads])
        if c.conservative and losses[-1] <= pairs.min():
            report.message = "conservative: θ was the best of the three points, step skipped"
            return report
        if c.sign:
            grads = np.sign(grads)
        grads = grads * self._normaliser(grads)
        g_hat = np.zeros_like(self._theta)
        for q, g in enumerate(grads):
            g_hat += np.float32(g / len(grads)) * self.directions(step, q)
        if self.adjust is not None:
            g_hat = self.adjust(self._theta, g_hat)
        if c.weight_decay:
            g_hat += np.float32(c.weight_decay) * self._theta
        self._theta -= self.rule.apply(g_hat, self.state, lr, step)
        return report

    def roll_back(self, theta: np.ndarray, lr_factor: float = 0.5) -> None:
        """Return to a known-good adapter with a smaller lr (the trainer's divergence guard)."""
        self._theta = np.array(theta, dtype=np.float32, copy=True)
        self.state = self.rule.init(self._theta.size)
        self.lr_scale *= lr_factor

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"theta": self._theta.copy(), **{f"rule.{k}": v.copy() for k, v in self.state.items()}}
        return arrays, {"step": self.step, "lr_scale": self.lr_scale, "grad_ms": self.grad_ms,
                        "grad_weight": self.grad_weight, "config": asdict(self.config)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        self._theta = np.array(arrays["theta"], dtype=np.float32, copy=True)
        self.state = {k[len("rule."):]: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items() if k.startswith("rule.")}
        self.step = int(scalars["step"])
        self.lr_scale = float(scalars["lr_scale"])
        self.grad_ms, self.grad_weight = float(scalars.get("grad_ms", 0.0)), float(scalars.get("grad_weight", 0.0))
