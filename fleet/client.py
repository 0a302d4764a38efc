"""A client's round, on the device (numpy + onnxruntime through edgeft.runtime; no torch, no Flower)."""

from __future__ import annotations

import math

import numpy as np

from edgeft.runtime import CandidateEvaluator
from edgeft.runtime.optimizers.zeroorder import auto_step

from . import directions
from .protocol import FleetConfig, Upload, digest


def local_round(bundle, train, theta: np.ndarray, config: FleetConfig, round_: int, client: int,
                index: np.ndarray) -> tuple[Upload, np.ndarray]:
    """``local_steps`` two-sided zeroth-order steps from the shared adapter ``theta`` on this client's
    data, each along a pool seed's direction; returns the summed projected gradient per seed index (what
    the fleet uploads) and the locally moved adapter (what FedAvg would upload instead)."""
    rng = np.random.default_rng([config.seed, round_, client])  # local choices: never on the wire
    seeds = directions.pool(config.seed, config.pool_size)
    evaluator = CandidateEvaluator(bundle)
    local = np.array(theta, dtype=np.float32, copy=True)
    sums: dict[int, float] = {}
    losses, squares = [], 0.0
    for _ in range(config.local_steps):
        j = int(rng.integers(config.pool_size))
        rows = np.sort(rng.choice(len(train), size=min(config.batch_size, len(train)), replace=False))
        feeds = bundle.feeds(train, rows)
        d = directions.direction(seeds[j], len(index))
        plus, minus = local.copy(), local.copy()
        plus[index] += np.float32(config.eps) * d
        minus[index] -= np.float32(config.eps) * d
        up, down = evaluator.losses(feeds, [plus, minus])
        g = (up - down) / (2 * config.eps)
        if not np.isfinite(g):
            continue  # a diverged candidate: nothing learned from this draw
        sums[j] = sums.get(j, 0.0) + float(g)
        squares += g * g
        # the local trajectory is never on the wire: --lr, or MeZO's default step on the RMS-normalised estimate
        rms = math.sqrt(squares / (len(losses) + 1))
        lr = config.lr if config.lr is not None else (auto_step(len(index)) / rms if rms > 0 else 0.0)
        local[index] = (local[index] - np.float32(lr * g) * d).astype(np.float32)
        losses.append(0.5 * (up + down))
    indices = sorted(sums)
    upload = Upload(indices, [sums[j] for j in indices], len(train), loss=float(np.mean(losses)) if losses else float("nan"),
                    forward_passes=evaluator.forward_passes, adapter=digest(theta))
    return upload, local
