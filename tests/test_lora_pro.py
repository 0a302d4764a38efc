"""LoRA-Pro's adjustment (arXiv 2407.18242) against its least-squares definition at two shapes, the
Sylvester solver against the Kronecker form, and the zeroth-order form's behaviour at B = 0."""

import numpy as np
import pytest

from edgeft.adapters import AdapterLayout
from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterSpec, AdapterTensor
from edgeft.runtime.optimizers import make_optimizer
from edgeft.runtime.optimizers.lora_pro import LoRAPro, adjust, lora_pairs, solve_sylvester_symmetric


def _equivalent(b, a, scale):
    """The linear map (g^A, g^B) → s·(B·g^A + g^B·A) as a matrix over the flattened pair."""
    (out, r), inner = b.shape, a.shape[1]
    columns = []
    for k in range(r * inner + out * r):
        v = np.zeros(r * inner + out * r)
        v[k] = 1.0
        columns.append((scale * (b @ v[: r * inner].reshape(r, inner) + v[r * inner :].reshape(out, r) @ a)).ravel())
    return np.stack(columns, 1)


@pytest.mark.parametrize("out, inner, r, scale", [(6, 5, 2, 2.0), (9, 7, 3, 0.5)])
def test_adjustment_is_the_closest_pair_whose_equivalent_gradient_best_matches_the_full_one(out, inner, r, scale):
    """The paper's theorem, checked independently: of all (g^A, g^B) minimising |s(B g^A + g^B A) − g|, the
    one nearest LoRA's own gradients (g_A = s Bᵀg, g_B = s g Aᵀ) is v₀ + M⁺(g − M v₀)."""
    rng = np.random.default_rng(out)
    a, b, g = rng.standard_normal((r, inner)), rng.standard_normal((out, r)), rng.standard_normal((out, inner))
    g_a, g_b = scale * b.T @ g, scale * g @ a.T
    new_a, new_b = adjust(a, b, g_a, g_b, scale)
    m = _equivalent(b, a, scale)
    v0 = np.concatenate([g_a.ravel(), g_b.ravel()])
    want = v0 + np.linalg.pinv(m) @ (g.ravel() - m @ v0)
    np.testing.assert_allclose(np.concatenate([new_a.ravel(), new_b.ravel()]), want, rtol=1e-8, atol=1e-9)
    # and it is not LoRA's plain pair: the adjustment changes something
    assert np.abs(want - v0).max() > 1e-3


@pytest.mark.parametrize("r", [2, 5])
def test_sylvester_solver_matches_the_kronecker_form(r):
    rng = np.random.default_rng(r)
    p, q = (lambda m: m @ m.T)(rng.standard_normal((r, r))), (lambda m: m @ m.T)(rng.standard_normal((r, r)))
    c = rng.standard_normal((r, r))
    x = solve_sylvester_symmetric(p, q, c)
    np.testing.assert_allclose(p @ x + x @ q, c, atol=1e-9)
    kron = np.kron(np.eye(r), p) + np.kron(q.T, np.eye(r))
    np.testing.assert_allclose(x.ravel(order="F"), np.linalg.solve(kron, c.ravel(order="F")), atol=1e-9)


def test_at_b_zero_the_paper_form_drops_the_a_estimate():
    """While B = 0, A's true gradient s·Bᵀg is zero: the undamped form returns g^A = 0 and the B part
    projected through (AAᵀ)⁻¹; the damped (zeroth-order) form keeps a bounded A part."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5)), np.zeros((6, 2))
    g_a, g_b = rng.standard_normal((2, 5)), rng.standard_normal((6, 2))
    new_a, new_b = adjust(a, b, g_a, g_b, 2.0)
    np.testing.assert_allclose(new_a, 0.0)
    np.testing.assert_allclose(new_b, g_b @ np.linalg.inv(a @ a.T) / 4.0)
    damped_a, _ = adjust(a, b, g_a, g_b, 2.0, damping=1.0)
    bound = 2 * np.linalg.norm(g_a) / (4.0 * np.trace(a @ a.T) / 2)
    assert 0 < np.linalg.norm(damped_a) < bound


def _layout(r=2, n=8):
    def t(name, shape, role):
        return AdapterTensor(f"layer.0.q.{name}", shape, "zeros", None, "layer.0.q", role)

    return AdapterLayout(AdapterSpec("lora", r, 2.0 * r, [], [t("lora_A", [r, n], "lora_A"), t("lora_B", [n, r], "lora_B")]))


def _factorisation(layout, target):
    def loss(candidates):
        out = []
        for c in candidates:
            m = layout.unflatten(np.asarray(c, dtype=np.float32))
            out.append(float(np.sum((2.0 * m["layer.0.q.lora_B"] @ m["layer.0.q.lora_A"] - target) ** 2)))
        return np.array(out)
    return loss


def test_lora_pro_trains_a_low_rank_factorisation_like_mezo():
    """The zeroth-order form on ||s·B·A − W||² from LoRA's start (B = 0): it converges where MeZO does, on
    every seed (the undamped form, run for 2,000 steps at queries 1, diverged on 2 of these 4 seeds)."""
    layout = _layout()
    rng = np.random.default_rng(0)
    target = rng.standard_normal((8, 8)) * 0.3
    start = np.concatenate([rng.uniform(-8**-0.5, 8**-0.5, 16), np.zeros(16)]).astype(np.float32)
    loss = _factorisation(layout, target)
    for seed in range(4):
        finals = {}
        for name in ("lora-pro", "mezo"):
            opt = make_optimizer(name, start, layout=layout, seed=seed, total_steps=300, lr=0.005, eps=1e-3)
            for _ in range(300):
                c = opt.ask()
                opt.tell(c, loss(c))
            finals[name] = loss([opt.theta])[0]
        assert finals["lora-pro"] < 0.5 * loss([start])[0] and finals["lora-pro"] < 1.1 * finals["mezo"], finals


def test_lora_pro_needs_lora_pairs_and_chains_before_another_rule():
    layout = _layout()
    theta = layout.initial(0)
    opt = make_optimizer("mezo", theta, layout=layout, update="lora-pro+adam", lr=1e-3)
    assert opt.rule.name == "adam" and isinstance(opt.adjust, LoRAPro)
    assert lora_pairs(layout) == [(slice(0, 16), (2, 8), slice(16, 32), (8, 2))]
    bone = AdapterLayout(AdapterSpec("bone", 2, 4.0, [], [AdapterTensor("layer.0.q.bone", [8, 2], "zeros", None,
                                                                        "layer.0.q", "bone_block")]))
    with pytest.raises(EdgeftError, match="LoRA"):
        make_optimizer("lora-pro", bone.initial(0), layout=bone)
    with pytest.raises(EdgeftError, match="layout"):
        make_optimizer("lora-pro", theta)
    with pytest.raises(EdgeftError, match="unknown directions .* or update"):
        make_optimizer("mezo", theta, layout=layout, update="lora-pro+nesterov")
