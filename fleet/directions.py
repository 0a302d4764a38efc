"""Directions anyone can reproduce: SplitMix64 counters → Rademacher signs.

A zeroth-order step is a seed and one scalar only if every device (and a client written in any
other language) turns the seed into the same direction. numpy's generators are not specified
outside numpy, so the fleet protocol uses SplitMix64 (Steele, Lea & Flood 2014; the generator
Java's SplittableRandom and xoshiro's seeding use), in counter form, and a sign per value:

    GAMMA = 0x9E3779B97F4A7C15
    mix(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
             z = (z ^ (z >> 27)) * 0x94D049BB133111EB
             return z ^ (z >> 31)                       (all arithmetic mod 2^64)
    output(seed, n) = mix(seed + n * GAMMA)             n = 1, 2, ...: SplitMix64's n-th output
    direction(seed)[i] = +1 if output(seed, i + 1) < 2^63 else -1      (i = 0, 1, ...)
    pool(fleet_seed)[j] = output(fleet_seed, j + 1)                    (the K seeds of the pool)

Signs are exact in every language (no floating point); test vectors are in docs/FLEET.md and
tests/test_fleet.py.
"""

from __future__ import annotations

import numpy as np

GAMMA = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK = (1 << 64) - 1


def output(seed: int, n: int) -> int:
    """SplitMix64's n-th output (n ≥ 1) for ``seed``, in plain Python integers (the reference)."""
    z = (seed + n * GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def outputs(seed: int, count: int, start: int = 1) -> np.ndarray:
    """Outputs ``start`` … ``start + count - 1`` as uint64, vectorised (numpy wraps mod 2^64)."""
    n = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK) + n * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def direction(seed: int, size: int) -> np.ndarray:
    """The Rademacher direction of ``seed``: ``size`` values of ±1 (float32)."""
    top = outputs(seed, size) >> np.uint64(63)
    return (1.0 - 2.0 * top.astype(np.float32)).astype(np.float32)


def pool(fleet_seed: int, k: int) -> list[int]:
    """The fleet's K shared seeds."""
    return [int(v) for v in outputs(fleet_seed, k)]
