"""The shared optimizer table: each optimizer must lower a small problem's loss, deterministically per seed."""

import numpy as np
import pytest

from edgeft.runtime.optimizers import REGISTRY, make_optimizer

# name -> settings that suit the 20-dim quadratic below
TABLE = {
    "mezo": dict(lr=0.02, eps=1e-3, queries=2),
}


def quadratic(candidates):
    """A badly scaled quadratic with its minimum at 1."""
    scales = np.linspace(0.5, 3.0, 20)
    return np.array([float(np.sum(scales * (c - 1.0) ** 2)) for c in candidates])


def run(name, seed, steps=300):
    opt = make_optimizer(name, np.zeros(20, dtype=np.float32), seed=seed, total_steps=steps, **TABLE[name])
    _steps(opt, steps)
    return opt


def test_every_registered_optimizer_is_in_the_table():
    assert set(TABLE) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_optimizer_lowers_the_loss(name):
    start = quadratic([np.zeros(20)])[0]
    end = quadratic([run(name, seed=0).theta])[0]
    assert end < 0.1 * start, f"{name}: loss {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_optimizer_is_deterministic_per_seed(name):
    a, b, c = run(name, 3, 30).theta, run(name, 3, 30).theta, run(name, 4, 30).theta
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def _steps(opt, n):
    for _ in range(n):
        candidates = opt.ask()
        opt.tell(candidates, quadratic(candidates))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_state_dict_resumes_bit_identically(name):
    full = run(name, 5, 40)
    first = make_optimizer(name, np.zeros(20, dtype=np.float32), seed=5, total_steps=40, **TABLE[name])
    _steps(first, 20)
    resumed = make_optimizer(name, np.full(20, 7.0, dtype=np.float32), seed=5, total_steps=40, **TABLE[name])
    resumed.load_state_dict(*first.state_dict())
    _steps(resumed, 20)
    assert resumed.theta.tobytes() == full.theta.tobytes()


def test_mezo_skips_non_finite_losses_and_lowers_lr():
    opt = make_optimizer("mezo", np.ones(5, dtype=np.float32), lr=0.1, seed=0)
    before = opt.theta.copy()
    report = opt.tell(opt.ask(), np.array([np.nan, 1.0]))
    assert report.skipped and "non-finite" in report.message
    assert opt.theta.tobytes() == before.tobytes()
    assert opt.lr() == pytest.approx(0.05)


def test_mezo_perturbation_is_a_seed():
    """tell() regenerates z from the seed: the update equals -lr * g * z for the asked z."""
    from edgeft.runtime.optimizers.perturbation import direction

    opt = make_optimizer("mezo", np.zeros(8, dtype=np.float32), lr=0.5, eps=0.01, seed=9)
    plus, minus = opt.ask()
    z = direction((9, 0, 0), 8)
    np.testing.assert_allclose(plus, 0.01 * z, rtol=1e-6)
    report = opt.tell([plus, minus], np.array([2.0, 1.0]))
    g = (2.0 - 1.0) / 0.02
    np.testing.assert_allclose(opt.theta, -0.5 * g * z, rtol=1e-5)
    assert report.seeds == [[9, 0, 0]] and report.projected_grads == [pytest.approx(g)]
