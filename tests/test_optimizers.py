"""The shared optimizer table: every optimizer lowers a small problem's loss, deterministically per seed,
and resumes bit-identically from its state_dict."""

from types import SimpleNamespace

import numpy as np
import pytest

from edgeft.adapters import AdapterLayout
from edgeft.manifest import AdapterSpec, AdapterTensor
from edgeft.runtime.optimizers import REGISTRY, make_optimizer
from edgeft.runtime.optimizers.zeroorder import adazeta_queries

# Two 4x5 "layers" (40 values): enough structure for subspace/low-rank directions and layer-wise search.
LAYOUT = SimpleNamespace(tensors=[SimpleNamespace(name="layer.0.q.lora_A", shape=[4, 5]),
                                  SimpleNamespace(name="layer.1.q.lora_A", shape=[4, 5])])
# LoRA-Pro adjusts LoRA pairs: the same 40 values as two (A [2, 5], B [5, 2]) pairs. At A = B = 0 every
# LoRA gradient is zero (and so is LoRA-Pro's): it starts where LoRA does not vanish.
LORA_LAYOUT = AdapterLayout(AdapterSpec("lora", 2, 4.0, [], [
    AdapterTensor(f"layer.{i}.q.lora_{ab}", shape, "zeros", None, f"layer.{i}.q", f"lora_{ab}")
    for i in (0, 1) for ab, shape in (("A", [2, 5]), ("B", [5, 2]))]))
LORA_START = 0.5
# zo-activations perturbs a LoRA A only within its layer's input directions: the same two 4x5 tensors as
# A's of attention modules, each layer's inputs spanning the all-ones row (where the optimum lies) + one more
ACT_LAYOUT = SimpleNamespace(tensors=[SimpleNamespace(name=f"layer.{i}.attention.self.query.lora_A", shape=[4, 5],
                                                      role="lora_A", module=f"layer.{i}.attention.self.query") for i in (0, 1)])
ACT_BASES = [np.linalg.qr(np.column_stack([np.ones(5), np.random.default_rng(i).standard_normal(5)]))[0].astype(np.float32)
             for i in (0, 1)]
POP = dict(intrinsic_dim=40, popsize=12, sigma=2.0)
# name -> (settings for this 40-dim quadratic, steps)
TABLE = {
    "mezo": (dict(lr=0.02, eps=1e-3, queries=2), 300),
    "zo-momentum": (dict(lr=0.001, eps=1e-3), 300),
    "zo-adam": (dict(lr=0.05, eps=1e-3, queries=2), 300),
    "zo-sign": (dict(lr=0.02, eps=1e-3, queries=2), 300),
    "zo-cons": (dict(lr=0.02, eps=1e-3, queries=2), 300),
    "subzero": (dict(lr=0.02, eps=1e-3, queries=2, rank=2, refresh=10), 300),
    "lozo": (dict(lr=0.01, eps=1e-3, queries=2, refresh=5), 300),
    "lozo-m": (dict(lr=0.001, eps=1e-3, queries=2, refresh=5), 300),
    "zo-activations": (dict(lr=0.02, eps=1e-3, queries=2, rank=2, input_bases=ACT_BASES), 300),
    "adazeta": (dict(lr=0.02, eps=1e-3, max_queries=6, steps_per_epoch=30), 300),
    "zo-kalman": (dict(lr=0.01, eps=1e-3, queries=2), 300),
    "fzoo": (dict(lr=0.05, eps=1e-3, directions_per_step=4), 300),
    "monteclora": (dict(lr=0.02, sigma=1e-3, queries=2), 300),
    "lora-pro": (dict(lr=0.002, eps=1e-3, queries=2), 300),  # on the factorisation (loss_of)
    # population methods search a random projection, where this problem is ill-conditioned: more steps
    "cma": (POP, 300),
    "fireworks": (dict(POP, popsize=20, sigma=5.0), 400),
    "dfo-layerwise": (dict(POP, intrinsic_dim=20, sigma=5.0, generations_per_layer=5), 300),
}


def quadratic(candidates):
    """A badly scaled quadratic with its minimum at 1."""
    scales = np.linspace(0.5, 3.0, 40)
    return np.array([float(np.sum(scales * (c - 1.0) ** 2)) for c in candidates])


_TARGETS = [np.random.default_rng(i).standard_normal((5, 2)) @ np.random.default_rng(10 + i).standard_normal((2, 5)) * 0.5
            for i in (0, 1)]


def factorisation(candidates):
    """LoRA-Pro's problem: two rank-2 weight updates s·B·A to match (LoRA-Pro is a rule for losses of
    the weight update, not of the raw A and B values)."""
    out = []
    for c in candidates:
        named = LORA_LAYOUT.unflatten(np.asarray(c, dtype=np.float32))
        out.append(sum(float(np.sum((2.0 * named[f"layer.{i}.q.lora_B"] @ named[f"layer.{i}.q.lora_A"] - t) ** 2))
                       for i, t in enumerate(_TARGETS)))
    return np.array(out)


def loss_of(name):
    return factorisation if name == "lora-pro" else quadratic


def build(name, seed, steps, start=None):
    settings, _ = TABLE[name]
    start = start if start is not None else (LORA_START if name == "lora-pro" else 0.0)
    layout = LORA_LAYOUT if name == "lora-pro" else ACT_LAYOUT if name == "zo-activations" else LAYOUT
    return make_optimizer(name, np.full(40, start, dtype=np.float32), layout=layout, seed=seed, total_steps=steps, **settings)


def advance(opt, n):
    loss = loss_of(opt.name)
    for _ in range(n):
        candidates = opt.ask()
        opt.tell(candidates, loss(candidates))
    return opt


def test_every_registered_optimizer_is_in_the_table():
    assert set(TABLE) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_optimizer_lowers_the_loss(name):
    steps = TABLE[name][1]
    opt, loss = build(name, 0, steps), loss_of(name)
    start = loss([opt.theta])[0]
    end = loss([advance(opt, steps).theta])[0]
    assert end < 0.1 * start, f"{name}: loss {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_optimizer_is_deterministic_per_seed(name):
    a, b, c = (advance(build(name, s, 30), 30).theta for s in (3, 3, 4))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("name", sorted(TABLE))
def test_state_dict_resumes_bit_identically(name):
    full = advance(build(name, 5, 40), 40)
    first = advance(build(name, 5, 40), 20)
    resumed = build(name, 5, 40, start=7.0)  # a different start: everything must come from the state
    resumed.load_state_dict(*first.state_dict())
    advance(resumed, 20)
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


def test_adazeta_query_schedule_grows_to_its_cap():
    counts = [adazeta_queries(e, 20, 15, 0.85) for e in range(1, 21)]
    assert counts[0] == 1 and counts[-1] == 15 and counts == sorted(counts)


def test_low_rank_directions_are_low_rank():
    from edgeft.runtime.optimizers.directions import LowRank, Subspace

    for family, rank in ((LowRank, 2), (Subspace, 3)):
        z = family([(12, 10), (7,)], seed=0, rank=rank, refresh=5)(step=3, query=0)
        assert np.linalg.matrix_rank(z[:120].reshape(12, 10)) == rank
        assert z.shape == (127,)


def test_activation_directions_stay_in_their_layers_input_span():
    """A LoRA A of a module reading its layer's input moves only within that layer's basis; other tensors
    (here a B, and an A whose basis is too short for it) get full Gaussian entries."""
    from edgeft.runtime.optimizers import make_optimizer as build_one

    layout = SimpleNamespace(tensors=[*ACT_LAYOUT.tensors, SimpleNamespace(name="layer.0.attention.self.query.lora_B",
                                                                           shape=[5, 4], role="lora_B", module="layer.0.attention.self.query")])
    opt = build_one("zo-activations", np.zeros(60, dtype=np.float32), layout=layout, seed=1, rank=2, input_bases=ACT_BASES)
    z = opt.directions(step=4, query=0)
    for i in (0, 1):
        rows = z[20 * i : 20 * (i + 1)].reshape(4, 5)
        residual = rows - rows @ ACT_BASES[i] @ ACT_BASES[i].T
        assert np.abs(residual).max() < 1e-5 and np.abs(rows).max() > 0.1
    assert np.linalg.matrix_rank(z[40:].reshape(5, 4)) == 4  # the B: unrestricted
    with pytest.raises(Exception, match="input bases"):
        build_one("zo-activations", np.zeros(60, dtype=np.float32), layout=layout, seed=1)
    decoder = SimpleNamespace(tensors=[SimpleNamespace(name="model.layers.0.self_attn.q_proj.lora_A", shape=[4, 5],
                                                       role="lora_A", module="model.layers.0.self_attn.q_proj")])
    with pytest.raises(Exception, match="reads its layer's input"):  # a pre-norm decoder's q reads RMSNorm(h)
        build_one("zo-activations", np.zeros(20, dtype=np.float32), layout=decoder, seed=1, input_bases=ACT_BASES)


def test_layerwise_changes_one_layer_per_generation():
    opt = build("dfo-layerwise", 0, 10)
    for candidate in opt.ask():
        moved = np.flatnonzero(candidate != opt.theta)
        assert moved.min() >= 0 and moved.max() < 20  # layer 0 first


ZERO_ORDER = [name for name, (settings, _) in TABLE.items() if "intrinsic_dim" not in settings]


@pytest.mark.parametrize("name", ZERO_ORDER)
def test_default_step_size_lowers_the_loss(name):
    """No lr given: the RMS-normalised, size-scaled default step (with warm-up) still converges."""
    start = np.full(40, LORA_START if name == "lora-pro" else 0.0, dtype=np.float32)
    extra = {"examples": 100} if name == "monteclora" else {}  # edgeft train passes the training set's size
    extra.update({"input_bases": ACT_BASES} if name == "zo-activations" else {})
    layout = LORA_LAYOUT if name == "lora-pro" else ACT_LAYOUT if name == "zo-activations" else LAYOUT
    opt = make_optimizer(name, start, layout=layout, seed=0, total_steps=300, **extra)
    assert opt.config.lr is None and opt.warmup_steps() == 15
    advance(opt, 300)
    assert loss_of(name)([opt.theta])[0] < loss_of(name)([start])[0] / 5
