"""Derivative-free population optimizers on a random low-dimensional projection of the adapters.

The adapter vector θ has tens of thousands of values; CMA-ES and the Fireworks
Algorithm work in an intrinsic space of ``intrinsic_dim`` values y, mapped back by a
fixed random projection: θ = θ0 + P·y. P is regenerated from the seed, never saved.

* ``CMA``         pycma's CMA-ES (the well-kept library), ask/tell over y.
* ``Fireworks``   the Fireworks Algorithm (Tan & Zhu 2010): no maintained library
                  exists, so it is written here, small: fireworks explode into sparks,
                  fewer and wider sparks around worse fireworks, best kept.
* ``Layerwise``   the DFO-for-LoRA method (arXiv 2403.01754): one CMA-ES per layer on
                  that layer's adapters, layers optimised in turn (round-robin).

Projection scale: each adapter tensor's block of P is scaled by its *spread* (``spread.py``):
by default so that every adapter type's tensors move the weight update ΔW as much as LoRA B
does at 1/sqrt(fan-out) (``spread="update"``), or by 1/sqrt(its larger side) (``"shape"``;
1/sqrt(fan-in) for LoRA A and the head, the LoRA init scale). Scaling B by 1/sqrt(r) instead
made one unit of σ change B·A by more than the frozen weight itself, and CMA-ES at σ=1
wrecked the model within two generations (20NG: 67% → 12.5%). With ``layer_std`` (the std of the hidden states entering each layer,
``edgeft.runtime.layer_input_std``) each layer's blocks are further multiplied by
std_ℓ / median(std): DFO for LoRA's per-layer scaling (2403.01754, after BBTv2's
std = α·std_hat/(sqrt(d)·σ)) as a relative factor. Its absolute form with α = 1 would give
adapter values of the hidden states' own scale (~1): at σ = 1 that moves B·A by ~100x the
frozen weights, so the spread above keeps setting the size.

Resuming: pycma keeps its random state in numpy's global generator, so its state is
rebuilt by replaying the recorded losses (ask/tell without running the model): a
checkpoint holds one row of losses per generation, never a pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import StepReport
from .spread import SPREADS, shape_spread


@dataclass(frozen=True)
class PopulationConfig:
    intrinsic_dim: int = 64
    popsize: int = 20
    sigma: float = 1.0
    seed: int = 0
    total_steps: int = 1000
    fireworks: int = 5  # fireworks algorithm: number of fireworks
    generations_per_layer: int = 5  # layerwise: generations on one layer before the next
    projection: str = "shape"  # "shape" | "hidden": also scale each layer by its hidden-state std (module doc)
    layer_std: tuple[float, ...] | None = None  # hidden-state std entering each layer, for "hidden"
    spread: str = "update"  # "update" | "shape": how far each tensor moves (spread.py)
    lr: float | None = None  # unused; accepted so that shared CLI settings pass through
    eps: float | None = None

    def __post_init__(self):
        if self.intrinsic_dim < 2 or self.popsize < 4 or self.sigma <= 0:
            raise ValueError("needs intrinsic_dim >= 2, popsize >= 4, sigma > 0")
        if self.projection not in ("shape", "hidden"):
            raise ValueError(f"projection {self.projection!r}: expected 'shape' or 'hidden'")
        if self.projection == "hidden" and not self.layer_std:
            raise ValueError("projection 'hidden' needs the bundle's per-layer hidden states (export it again)")
        if self.spread not in SPREADS:
            raise ValueError(f"spread {self.spread!r}: expected one of {', '.join(SPREADS)}")

    @property
    def scales(self):
        """The per-layer std the projection uses (None: shape only)."""
        return self.layer_std if self.projection == "hidden" else None


def projection(shapes, dim: int, seed: int, groups=None, layer_std=None, spreads=None) -> np.ndarray:
    """P [n, dim]: Gaussian, each tensor's rows scaled by its spread (default: the shape rule) and
    1/sqrt(dim), and, given ``layer_std``, by its layer's std / the median over layers
    (``groups``: layer per tensor)."""
    typical = float(np.median(layer_std)) if layer_std else 1.0
    blocks = []
    for index, shape in enumerate(shapes):
        n = int(np.prod(shape))
        spread = spreads[index] if spreads is not None else shape_spread(shape)
        layer = groups[index] if groups is not None else -1
        factor = layer_std[layer] / typical if layer_std and 0 <= layer < len(layer_std) else 1.0
        rng = np.random.default_rng([seed, 11, index])
        blocks.append(rng.standard_normal((n, dim), dtype=np.float32) * np.float32(factor * spread / np.sqrt(dim)))
    return np.concatenate(blocks)


class CMA:
    name = "cma"

    def __init__(self, theta, config: PopulationConfig = PopulationConfig(), shapes=None, groups=None, spreads=None, **_):
        self.config = config
        self.theta0 = np.array(theta, dtype=np.float32, copy=True)
        self.shapes, self.groups = shapes or [(self.theta0.size,)], groups
        self._project(spreads)
        self._start()

    def _project(self, spreads):
        self.spreads = np.array([shape_spread(s) for s in self.shapes] if spreads is None else spreads, dtype=np.float64)
        self.P = projection(self.shapes, self.config.intrinsic_dim, self.config.seed, self.groups, self.config.scales,
                            self.spreads)

    def _start(self):
        import cma

        c = self.config
        self.es = cma.CMAEvolutionStrategy(np.zeros(c.intrinsic_dim), c.sigma,
                                           {"popsize": c.popsize, "seed": c.seed + 1, "verbose": -9})
        self.step, self.history, self._ys = 0, [], None

    def _map(self, y) -> np.ndarray:
        return self.theta0 + self.P @ np.asarray(y, dtype=np.float32)

    @property
    def theta(self) -> np.ndarray:
        return self._map(self.es.mean)

    def ask(self) -> list[np.ndarray]:
        self._ys = self.es.ask()
        return [self._map(y) for y in self._ys]

    def tell(self, candidates, losses) -> StepReport:
        losses = np.asarray(losses, dtype=np.float64)
        self.step += 1
        ok = np.isfinite(losses)
        # CMA-ES ranks candidates, so a non-finite loss only needs to rank last
        finite = np.where(ok, losses, (losses[ok].max() + 1e3) if ok.any() else 1e30)
        self.es.tell(self._ys, finite.tolist())
        self.history.append(finite.copy())
        return StepReport(self.step, float(np.median(finite)), float(self.es.sigma),
                          message=None if ok.all() else "non-finite losses ranked last")

    def state_dict(self):
        return {"theta0": self.theta0, "spreads": self.spreads,
                "history": np.array(self.history, dtype=np.float64).reshape(len(self.history), -1)}, \
               {"step": self.step, "config": asdict(self.config)}

    def load_state_dict(self, arrays, scalars):
        self.theta0 = np.array(arrays["theta0"], dtype=np.float32)
        self._project(arrays.get("spreads"))  # the projection the run began with
        self._start()
        for row in arrays["history"]:  # replay: same asks, same losses → same internal state
            self._ys = self.es.ask()
            self.es.tell(self._ys, list(row))
            self.history.append(np.array(row))
        self.step = int(scalars["step"])


class Fireworks:
    name = "fireworks"

    def __init__(self, theta, config: PopulationConfig = PopulationConfig(), shapes=None, groups=None, spreads=None, **_):
        self.config = config
        self.theta0 = np.array(theta, dtype=np.float32, copy=True)
        self.shapes, self.groups = shapes or [(self.theta0.size,)], groups
        self._project(spreads)
        d, n = config.intrinsic_dim, config.fireworks
        rng = np.random.default_rng([config.seed, 21])
        self.positions = np.vstack([np.zeros(d), rng.uniform(-config.sigma, config.sigma, (n - 1, d))])
        self.fitness = np.full(n, np.inf)
        self.step = 0
        self._points = None

    @property
    def theta(self) -> np.ndarray:
        return self.theta0 + self.P @ self.positions[int(np.argmin(self.fitness))].astype(np.float32)

    def _sparks(self) -> np.ndarray:
        c, f = self.config, self.fitness
        rng = np.random.default_rng([c.seed, 22, self.step])
        worst, best, tiny = f.max(), f.min(), 1e-12
        # better fireworks: more sparks, smaller amplitude (exploit); worse: fewer, wider (explore)
        counts = (worst - f + tiny) / (np.sum(worst - f) + tiny * len(f))
        counts = np.maximum(1, np.round(counts * (c.popsize - len(f))).astype(int))
        amplitudes = c.sigma * (f - best + tiny) / (np.sum(f - best) + tiny * len(f)) * len(f)
        amplitudes = np.maximum(amplitudes, c.sigma * 0.05)
        sparks = []
        for pos, count, amp in zip(self.positions, counts, amplitudes):
            for _ in range(count):
                dims = rng.random(len(pos)) < 0.5
                sparks.append(pos + dims * rng.uniform(-amp, amp, len(pos)))
        sparks.append(self.positions[np.argmin(f)] * rng.normal(1.0, 1.0))  # one Gaussian-scaled spark
        return np.array(sparks)

    def ask(self) -> list[np.ndarray]:
        self._points = self.positions if not np.isfinite(self.fitness).all() else self._sparks()
        return [self.theta0 + self.P @ p.astype(np.float32) for p in self._points]

    def tell(self, candidates, losses) -> StepReport:
        losses = np.where(np.isfinite(losses), np.asarray(losses, dtype=np.float64), np.inf)
        self.step += 1
        if self._points is self.positions:
            self.fitness = losses
        else:  # keep the best point, then the rest of the fireworks by fitness among all points
            points = np.vstack([self.positions, self._points])
            fitness = np.concatenate([self.fitness, losses])
            order = np.argsort(fitness, kind="stable")[: self.config.fireworks]
            self.positions, self.fitness = points[order], fitness[order]
        return StepReport(self.step, float(np.median(losses[np.isfinite(losses)])) if np.isfinite(losses).any() else float("nan"),
                          float(self.config.sigma))

    _project = CMA._project

    def state_dict(self):
        return {"theta0": self.theta0, "spreads": self.spreads, "positions": self.positions, "fitness": self.fitness}, \
               {"step": self.step}

    def load_state_dict(self, arrays, scalars):
        self.theta0 = np.array(arrays["theta0"], dtype=np.float32)
        self._project(arrays.get("spreads"))
        self.positions, self.fitness = np.array(arrays["positions"]), np.array(arrays["fitness"])
        self.step = int(scalars["step"])


class Layerwise:
    """One CMA-ES per layer; each generation changes one layer's adapters only."""

    name = "dfo-layerwise"

    def __init__(self, theta, config: PopulationConfig = PopulationConfig(), shapes=None, groups=None, spreads=None, **_):
        self.config = config
        self.theta0 = np.array(theta, dtype=np.float32, copy=True)
        shapes = shapes or [(self.theta0.size,)]
        groups = groups or [0] * len(shapes)
        self.spreads = np.array([shape_spread(s) for s in shapes] if spreads is None else spreads, dtype=np.float64)
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        self.layers = sorted(set(groups))
        self.index = {g: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, gi in enumerate(groups) if gi == g])
                      for g in self.layers}
        self.parts = {g: [i for i, gi in enumerate(groups) if gi == g] for g in self.layers}  # tensor indices per layer
        self.shapes = [tuple(s) for s in shapes]
        self._start()

    def _start(self):
        c = self.config
        self.current = self.theta0.copy()
        self.members = {g: CMA(self.current[self.index[g]], PopulationConfig(**{**asdict(c), "seed": c.seed + 100 * (i + 1)}),
                               [self.shapes[k] for k in self.parts[g]], [g] * len(self.parts[g]),
                               self.spreads[self.parts[g]]) for i, g in enumerate(self.layers)}
        self.step, self.history = 0, []

    @property
    def theta(self) -> np.ndarray:
        return self.current

    def active(self) -> int:
        return self.layers[(self.step // self.config.generations_per_layer) % len(self.layers)]

    def ask(self) -> list[np.ndarray]:
        layer = self.active()
        out = []
        for part in self.members[layer].ask():
            candidate = self.current.copy()
            candidate[self.index[layer]] = part
            out.append(candidate)
        return out

    def tell(self, candidates, losses) -> StepReport:
        layer = self.active()
        report = self.members[layer].tell(candidates, losses)
        self.history.append(np.asarray(self.members[layer].history[-1]))
        self.current[self.index[layer]] = self.members[layer].theta
        self.step += 1
        report.step = self.step
        report.message = f"layer {layer}"
        return report

    def state_dict(self):
        return {"theta0": self.theta0, "spreads": self.spreads,
                "history": np.array(self.history, dtype=np.float64).reshape(len(self.history), -1)}, {"step": self.step}

    def load_state_dict(self, arrays, scalars):
        self.theta0 = np.array(arrays["theta0"], dtype=np.float32)
        if arrays.get("spreads") is not None:
            self.spreads = np.array(arrays["spreads"], dtype=np.float64)
        self._start()
        for row in arrays["history"]:
            self.ask()
            self.tell(None, row)
