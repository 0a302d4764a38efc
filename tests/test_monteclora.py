"""MonteCLoRA, forward-only: a run saves its distribution beside the mean; predict/eval --samples average
sampled adapters; calibration error; bad --samples and foreign distribution files are one-line errors."""

import json

import numpy as np
import pytest

from edgeft.distribution import DISTRIBUTION, load_distribution, save_distribution
from edgeft.runtime import Bundle
from edgeft.runtime.evaluate import calibration_error, sampled_probabilities
from tests.test_bad_input import assert_one_line_error, invoke


@pytest.fixture(scope="module")
def monteclora_run(bert_bundle, sentiment_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("monteclora") / "run"
    code, out = invoke("train", bert_bundle, "--data", sentiment_data, "-o", run, "--optimizer", "monteclora",
                       "--steps", "6", "--set", "sigma=0.05", "--json")
    assert code == 0, out
    return run


def test_a_monteclora_run_saves_its_spread_beside_the_mean(bert_bundle, monteclora_run):
    b = Bundle(bert_bundle)
    sigma = load_distribution(monteclora_run / "adapter", b.layout)
    assert sigma.shape == (b.layout.size,) and np.all(sigma > 0)  # every tensor searched: none held at 0
    assert np.all(sigma >= 0.05 / 10) and np.all(sigma <= 0.05 * 10)


def test_eval_and_predict_with_samples_average_sampled_adapters(bert_bundle, sentiment_data, monteclora_run):
    adapter = monteclora_run / "adapter"
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", adapter, "--samples", "4", "--json")
    assert code == 0, out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["samples"] == 4 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0 and metrics["spread"] > 0
    code, out = invoke("predict", bert_bundle, "a great film", "a dull film", "--adapter", adapter, "--samples", "3", "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 2 and all(r["spread"] >= 0 and r["label"] in ("neg", "pos") for r in rows)


def test_sampled_probabilities_with_zero_spread_equal_the_mean_adapter(bert_bundle):
    from edgeft.runtime import predict

    b = Bundle(bert_bundle)
    theta = (np.random.default_rng(0).standard_normal(b.layout.size) * 0.1).astype(np.float32)
    texts = ["the movie was great", "the plot was dull and boring"]
    probs, spread = sampled_probabilities(b, theta, np.zeros_like(theta), b.encode(texts, np.zeros(2, dtype=np.int64)), 3)
    np.testing.assert_allclose(probs, predict(b, theta, texts), rtol=1e-5)
    np.testing.assert_allclose(spread, 0.0, atol=1e-7)


def test_calibration_error_of_known_cases():
    labels = np.array([0, 1, 0, 1])
    right = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert calibration_error(right, labels) == pytest.approx(0.0)
    half = np.full((4, 2), 0.5)
    half[:, 0] += 1e-9  # always predicts 0: right on half, confidence 0.5
    assert calibration_error(half, labels) == pytest.approx(0.0, abs=1e-6)
    wrong = right[:, ::-1]
    assert calibration_error(wrong, labels) == pytest.approx(1.0)


def test_bad_samples_and_distributions_are_one_line_errors(bert_bundle, sentiment_data, monteclora_run, tmp_path):
    adapter = monteclora_run / "adapter"
    before = (adapter / DISTRIBUTION).read_bytes()
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", adapter, "--samples", "0")
    assert_one_line_error(code, out, "--samples 0")
    code, out = invoke("predict", bert_bundle, "fine", "--samples", "2")
    assert_one_line_error(code, out, "--samples needs --adapter")
    plain = tmp_path / "plain"
    code, _ = invoke("train", bert_bundle, "--data", sentiment_data, "-o", plain, "--optimizer", "mezo", "--steps", "1")
    assert code == 0
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", plain / "adapter", "--samples", "2")
    assert_one_line_error(code, out, "--optimizer monteclora")
    b = Bundle(bert_bundle)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / DISTRIBUTION).write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="not a readable distribution file"):
        load_distribution(foreign, b.layout)
    from safetensors.numpy import save_file

    save_file({"head.weight": np.ones((2, 2), dtype=np.float32)}, str(foreign / DISTRIBUTION),
              metadata={"format": "edgeft-distribution"})
    with pytest.raises(Exception, match="does not fit this bundle"):
        load_distribution(foreign, b.layout)
    save_distribution(foreign, b.layout, -np.ones(b.layout.size, dtype=np.float32))
    with pytest.raises(Exception, match="negative or non-finite"):
        load_distribution(foreign, b.layout)
    assert (adapter / DISTRIBUTION).read_bytes() == before  # nothing saved was touched
