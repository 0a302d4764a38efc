"""The linear-probe start's temperature: chosen by out-of-fold loss, it changes no prediction."""

import numpy as np

from edgeft.runtime.probe import fit_linear_probe, probe_temperature


def _few_shot(labels=20, per_label=16, dim=384, signal=0.3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((labels, dim)) * signal
    y = np.repeat(np.arange(labels), per_label)
    return means[y] + rng.standard_normal((len(y), dim)), y, means


def test_temperature_sharpens_an_under_confident_probe_and_keeps_its_predictions():
    x, y, means = _few_shot()
    t, before, after = probe_temperature(x, y, 20)
    assert t > 1.5 and after < before - 0.1  # C = 1 over 20 labels at 16 shots is under-confident
    rng = np.random.default_rng(1)  # held-out examples of the same classes: the scaled probe's loss is lower there too
    yt = rng.integers(0, 20, 2000)
    xt = means[yt] + rng.standard_normal((2000, x.shape[1]))
    w, b = fit_linear_probe(x, y, 20)

    def loss(scale):
        z = scale * (xt @ w.T + b)
        z -= z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(yt)), yt]).mean())

    assert loss(t) < loss(1.0)
    assert np.array_equal((xt @ w.T + b).argmax(1), (t * (xt @ w.T + b)).argmax(1))


def test_temperature_leaves_a_confident_probe_near_one():
    x, y, _ = _few_shot(labels=2, per_label=64, dim=8, signal=0.3)  # plenty of examples per parameter
    t, before, after = probe_temperature(x, y, 2)
    assert 0.5 <= t <= 2.0 and after <= before
