"""Update rules applied to a zeroth-order gradient estimate ĝ (optax-style pieces).

Each rule has ``init(size) -> state`` (a dict of arrays, trivial to checkpoint) and
``apply(g_hat, state, lr) -> delta`` that mutates ``state`` in place; the optimizer
does θ ← θ − delta.
"""

from __future__ import annotations

import numpy as np


class SGD:
    name = "sgd"

    def init(self, size: int) -> dict:
        return {}

    def apply(self, g_hat, state, lr, step):
        return np.float32(lr) * g_hat


class Momentum:
    """ZO-SGD-MMT (ZO-Bench): heavy-ball momentum on the estimate."""

    name = "momentum"

    def __init__(self, beta: float = 0.9):
        self.beta = beta

    def init(self, size):
        return {"m": np.zeros(size, dtype=np.float32)}

    def apply(self, g_hat, state, lr, step):
        m = state["m"]
        m *= np.float32(self.beta)
        m += g_hat
        return np.float32(lr) * m


class Adam:
    """ZO-Adam (ZO-Bench): Adam's moments on the estimate, bias-corrected."""

    name = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def init(self, size):
        return {"m": np.zeros(size, dtype=np.float32), "v": np.zeros(size, dtype=np.float32)}

    def apply(self, g_hat, state, lr, step):
        m, v = state["m"], state["v"]
        m *= np.float32(self.beta1)
        m += np.float32(1 - self.beta1) * g_hat
        v *= np.float32(self.beta2)
        v += np.float32(1 - self.beta2) * g_hat * g_hat
        t = step + 1
        m_hat = m / np.float32(1 - self.beta1**t)
        v_hat = v / np.float32(1 - self.beta2**t)
        return np.float32(lr) * m_hat / (np.sqrt(v_hat) + np.float32(self.eps))

    def descend(self, named: dict, names: list[str], gradients: dict, states: dict, lr: float, count: int, step: int) -> None:
        """One step on the tensors ``names`` of ``named``, in place, from their gradients summed over ``count``
        examples (the exact fits': ``encoder_fit``, ``prompt_fit``)."""
        for key in names:
            update = self.apply((gradients[key] / count).astype(np.float32).ravel(), states[key], lr, step)
            named[key] -= update.reshape(named[key].shape)


class Kalman:
    """A LoKO-style diagonal Kalman filter (arXiv 2410.11551) fed with ZO estimates.

    Forward-only adaptation: LoKO observes backprop gradients; here the observation is
    the ZO estimate ĝ. Per coordinate, the state is the gradient mean μ with variance P;
    process noise q lets it drift; the observation noise R is an EMA of (ĝ − μ)², so noisy
    coordinates move less. Linear cost: three vectors of the adapter's size.
    """

    name = "kalman"

    def __init__(self, process_noise: float = 0.1, noise_ema: float = 0.99):
        self.q, self.ema = process_noise, noise_ema

    def init(self, size):
        return {"mu": np.zeros(size, dtype=np.float32), "p": np.ones(size, dtype=np.float32),
                "r": np.ones(size, dtype=np.float32)}

    def apply(self, g_hat, state, lr, step):
        mu, p, r = state["mu"], state["p"], state["r"]
        p += np.float32(self.q)
        innovation = g_hat - mu
        r *= np.float32(self.ema)
        r += np.float32(1 - self.ema) * innovation * innovation
        gain = p / (p + r + np.float32(1e-12))
        mu += gain * innovation
        p *= 1 - gain
        return np.float32(lr) * mu


RULES = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "kalman": Kalman}
