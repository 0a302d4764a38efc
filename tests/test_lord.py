"""LoRD compression pass: equivalent to its reconstructed reference, activation-aware beats plain, still trains."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.export import lord
from edgeft.export.bundle import random_adapters, sample_batch
from edgeft.manifest import Manifest


def _run(model, feeds, adapters, output="pooled"):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {**feeds, **adapters})[0]


def test_lord_matches_its_reference_at_two_shapes(bert_bundle):
    model = onnx.load(str(bert_bundle / "model.onnx"))
    manifest = Manifest.load(bert_bundle)
    plans, factors = lord.plan(model, params_ratio=0.5)
    assert any(p.compressed for p in plans)
    compressed, reference = lord.apply(model, plans, factors), lord.reconstructed(model, plans, factors)
    adapters = random_adapters(manifest, seed=2)
    for batch, seq in ((2, 7), (3, 13)):
        feeds = sample_batch(manifest, 60, batch, seq, seed=seq)
        assert np.abs(_run(compressed, feeds, adapters) - _run(reference, feeds, adapters)).max() < 1e-4
    # full rank is a no-op: same outputs as the original graph
    full_plans, full_factors = lord.plan(model, energy=1.0)
    feeds = sample_batch(manifest, 60, 3, 11, seed=0)
    assert np.abs(_run(lord.reconstructed(model, full_plans, full_factors), feeds, adapters)
                  - _run(model, feeds, adapters)).max() < 1e-4


def test_ranks_follow_the_requested_budget(bert_bundle):
    model = onnx.load(str(bert_bundle / "model.onnx"))
    plans, _ = lord.plan(model, params_ratio=0.5)
    for p in plans:
        assert p.params <= 0.5 * p.shape[0] * p.shape[1] + sum(p.shape) or not p.compressed
    energy_plans, _ = lord.plan(model, energy=0.9)
    assert all(p.energy >= 0.9 - 1e-9 for p in energy_plans)
    with pytest.raises(Exception, match="exactly one"):
        lord.plan(model, params_ratio=0.5, energy=0.9)


def test_activation_aware_beats_plain_on_calibration_data(bert_bundle):
    from edgeft.runtime import Bundle
    from tests.models import CORPUS

    b = Bundle(bert_bundle)
    model = onnx.load(str(bert_bundle / "model.onnx"))
    encoded = b.encode(CORPUS[:40], np.zeros(40, dtype=np.int64))
    covariances = lord.collect_covariances(b, model, encoded)
    feeds = b.feeds(encoded, np.arange(40))
    adapters = b.layout.unflatten(b.layout.initial(0))
    exact = _run(model, feeds, adapters)
    errors = {}
    for name, cov in (("plain", None), ("aware", covariances)):
        plans, factors = lord.plan(model, params_ratio=0.4, covariances=cov)
        errors[name] = np.abs(_run(lord.apply(model, plans, factors), feeds, adapters) - exact).mean()
    assert errors["aware"] < errors["plain"], errors


def test_cli_compress_keeps_a_trainable_bundle(bert_bundle, sentiment_data, tmp_path):
    out = tmp_path / "lord"
    result = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(out), "--params-ratio", "0.6",
                                       "--calibrate", str(sentiment_data), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "linear parameters" in result.output and "rank" in result.output and "warning" not in result.output
    plain = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(tmp_path / "plain"), "--params-ratio", "0.6"])
    assert plain.exit_code == 0 and "warning: without --calibrate" in plain.output
    result = CliRunner().invoke(main, ["train", str(out), "--data", str(sentiment_data), "-o", str(tmp_path / "run"),
                                       "--steps", "5", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["steps"] == 5


def test_svd_falls_back_when_lapack_does_not_converge(monkeypatch):
    """gesdd can fail on a badly scaled matrix: the Gram-matrix fallback gives the same factorisation."""
    rng = np.random.default_rng(0)
    for shape in ((40, 12), (12, 40)):
        m = rng.standard_normal(shape) * np.logspace(0, 6, shape[1])
        want = np.linalg.svd(m, compute_uv=False)

        def fail(*args, **kwargs):
            raise np.linalg.LinAlgError("SVD did not converge")

        with monkeypatch.context() as patch:
            patch.setattr(np.linalg, "svd", fail)
            u, s, vt = lord._svd(m)
        assert np.allclose(s, want, rtol=1e-6)
        assert np.abs((u * s) @ vt - m).max() < 1e-6 * np.abs(m).max()
