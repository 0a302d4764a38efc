"""The fleet protocol (FedKSeed, arXiv 2312.06353, adapted): seeds and scalars on the wire, never weights.

Round r, for each sampled client: start from the shared adapter θ, run ``local_steps`` zeroth-order
steps on the client's own data, each along the direction of a seed drawn from the shared pool of
K seeds (``directions.py``), and upload only {seed index: summed projected gradient} and the number
of examples. The server checks every upload (``check_upload``), clips each value, combines them per
seed (weighted mean, median or trimmed mean) and broadcasts the round's pairs; every client and the
server apply them the same way (``apply_round``), so all hold the same adapter bit for bit, and a
device that joins late replays the history of pairs (kilobytes) instead of downloading the adapter.

``apply_round`` is the portable definition: for each pair (j, g) in ascending j, every searched value
θᵢ ← fl32(θᵢ − fl32(lr·g)·dᵢ) with dᵢ = ±1 the direction of pool seed j (one float32 rounding per
value; other values untouched). Each round's lr travels with its pairs: the server's ``--lr``, or by
default one fixed at the first round with pairs so that a round moves each value by MeZO's default
per-value step (``round_lr``) and kept from then on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError

from . import directions

AGGREGATES = ("mean", "median", "trimmed")


@dataclass
class FleetConfig:
    seed: int = 0  # the fleet's seed: the pool, client sampling, local batches
    pool_size: int = 1024  # K shared seeds (FedKSeed: a few thousand suffice for billion-parameter models)
    lr: float | None = None  # None: fixed at the first round with pairs so that its RMS step is MeZO's default
    eps: float = 1e-3
    local_steps: int = 4
    batch_size: int = 4
    clip: float = 10.0  # each uploaded value is clipped to [-clip, clip]
    reject_above: float = 1e6  # an upload with a value beyond this is garbage: rejected whole
    aggregate: str = "mean"  # mean (weighted by examples) | median | trimmed (trim_fraction from each side)
    trim_fraction: float = 0.2
    clients_per_round: int | None = None  # None: every client each round

    def __post_init__(self):
        if self.pool_size < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise EdgeftError("fleet: --pool-size, --local-steps and --batch-size must be at least 1")
        if not ((self.lr is None or self.lr > 0) and self.eps > 0 and self.clip > 0 and self.reject_above >= self.clip):
            raise EdgeftError("fleet: needs lr > 0, eps > 0, clip > 0 and reject_above >= clip")
        if self.aggregate not in AGGREGATES:
            raise EdgeftError(f"fleet: --aggregate {self.aggregate!r} (known: {', '.join(AGGREGATES)})")
        if not 0 <= self.trim_fraction < 0.5:
            raise EdgeftError("fleet: --trim-fraction must be in [0, 0.5)")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise EdgeftError("fleet: --clients-per-round must be at least 1")


@dataclass
class Upload:
    """What a client sends after its local steps (all of it: no weights)."""

    indices: list[int]
    values: list[float]
    examples: int
    known_round: int = 0  # the rounds it has applied (the server sends it only what it lacks)
    loss: float = float("nan")  # its mean local training loss (a metric, not used in the update)
    forward_passes: int = 0
    adapter: str = ""  # digest of the adapter it trained from (the server checks it holds the same one)

    def to_record(self) -> dict:
        return {"indices": [int(i) for i in self.indices], "values": [float(v) for v in self.values],
                "examples": int(self.examples), "known_round": int(self.known_round), "loss": float(self.loss),
                "forward_passes": int(self.forward_passes), "adapter": self.adapter}


def digest(theta: np.ndarray) -> str:
    """A short fingerprint of an adapter's exact bytes: every device must hold the same one."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(theta, dtype=np.float32).tobytes()).hexdigest()[:16]


def check_upload(record, config: FleetConfig) -> Upload:
    """A client's upload as an Upload, or ValueError naming what is wrong (the server logs it and
    goes on without that client): unknown fields' types, seed indices outside the pool or repeated,
    non-finite or absurd values, a non-positive example count."""
    try:
        indices, values = list(record["indices"]), list(record["values"])
        examples, known = record["examples"], record.get("known_round", 0)
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed upload ({err.__class__.__name__}: {err})") from None
    if len(indices) != len(values):
        raise ValueError(f"{len(indices)} seed indices but {len(values)} values")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError("seed indices must be integers")
    bad = [i for i in indices if not 0 <= i < config.pool_size]
    if bad:
        raise ValueError(f"unknown seed index {bad[0]} (pool of {config.pool_size})")
    if len(set(indices)) != len(indices):
        raise ValueError("a seed index appears twice")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError("values must be numbers")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("non-finite value")
    if any(abs(v) > config.reject_above for v in values):
        raise ValueError(f"value beyond {config.reject_above:g}")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ValueError(f"example count {examples!r} is not a positive integer")
    if not isinstance(known, int) or known < 0:
        raise ValueError(f"known round {known!r} is not a round")
    loss = record.get("loss", float("nan"))
    passes = record.get("forward_passes", 0)
    held = record.get("adapter", "")
    return Upload(indices, [float(np.clip(v, -config.clip, config.clip)) for v in values], examples, known,
                  float(loss) if isinstance(loss, (int, float)) else float("nan"),
                  int(passes) if isinstance(passes, int) else 0, held if isinstance(held, str) else "")


def aggregate(uploads: list[Upload], config: FleetConfig) -> list[tuple[int, float]]:
    """The round's pairs, per seed index over all accepted clients (a client that did not draw a seed
    counts 0 there: the combined step is the average of the clients' steps)."""
    if not uploads:
        return []
    used = sorted({i for u in uploads for i in u.indices})
    table = np.zeros((len(uploads), len(used)))  # clients × seeds
    column = {j: c for c, j in enumerate(used)}
    for row, u in enumerate(uploads):
        for i, v in zip(u.indices, u.values):
            table[row, column[i]] = v
    if config.aggregate == "mean":
        weights = np.array([u.examples for u in uploads], dtype=np.float64)
        combined = weights @ table / weights.sum()
    elif config.aggregate == "median":
        combined = np.median(table, axis=0)
    else:
        cut = int(config.trim_fraction * len(uploads))
        ordered = np.sort(table, axis=0)
        combined = ordered[cut : len(uploads) - cut].mean(axis=0)
    return [(j, float(v)) for j, v in zip(used, combined) if v != 0.0]


def apply_round(theta: np.ndarray, pairs: list[tuple[int, float]], lr: float, seeds: list[int],
                index: np.ndarray) -> None:
    """θ ← θ − lr·Σ g·d(seed) over the searched values ``index``, in place, in the portable order."""
    for j, g in sorted(pairs):
        step = np.float32(lr * g)
        theta[index] = (theta[index] - step * directions.direction(seeds[j], len(index))).astype(np.float32)


def round_lr(config: FleetConfig, history: list[dict], pairs: list[tuple[int, float]], size: int) -> float | None:
    """The lr a round is applied with: --lr; else the run's first fixed one; else, at the first round
    with pairs, the per-value step of MeZO's default lr (``auto_step``) over the pairs' RMS."""
    from edgeft.runtime.optimizers.zeroorder import auto_step

    if config.lr is not None:
        return config.lr
    fixed = next((e["lr"] for e in history if e.get("lr")), None)
    if fixed is not None or not pairs:
        return fixed
    rms = math.sqrt(sum(g * g for _, g in pairs) / len(pairs))
    return auto_step(size) / rms if rms > 0 else None


@dataclass
class FleetState:
    """What the server keeps (and checkpoints): the settings, the start, and every round's pairs."""

    config: FleetConfig
    history: list[dict] = field(default_factory=list)  # [{"round": r, "lr": lr, "pairs": [[j, g], ...]}]
    start: dict | None = None  # a classification fleet's shared head (fleet/start.py): weight, bias, temperature

    @property
    def round(self) -> int:
        return len(self.history)

    def pairs_since(self, known_round: int) -> list[dict]:
        return self.history[known_round:]

    def save(self, path: Path) -> None:
        """Atomically: a temporary file renamed over the old one (a kill never leaves half a state)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": "edgeft-fleet-state", "config": asdict(self.config),
                                   "history": self.history, "start": self.start}, sort_keys=True))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "FleetState":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise EdgeftError(f"{path}: not a readable fleet state ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != "edgeft-fleet-state":
            raise EdgeftError(f"{path}: not an edgeft fleet state")
        return cls(FleetConfig(**raw["config"]), raw["history"], raw.get("start"))


def replay(theta0: np.ndarray, history: list[dict], config: FleetConfig, index: np.ndarray) -> np.ndarray:
    """The shared adapter after ``history``: the start with every round applied in turn."""
    theta = np.array(theta0, dtype=np.float32, copy=True)
    seeds = directions.pool(config.seed, config.pool_size)
    for entry in history:
        if entry["pairs"]:
            apply_round(theta, [(int(j), float(g)) for j, g in entry["pairs"]], entry["lr"], seeds, index)
    return theta
