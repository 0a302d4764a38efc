"""Split graphs (``edgeft split``): lower once per batch + upper per candidate == the whole graph."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.export.bundle import random_adapters, sample_batch
from edgeft.export.split import split_bundle


@pytest.fixture(params=["bert-cls", "llama-lm"])
def split_copy(request, bert_bundle, llama_lm_bundle, tmp_path):
    source = {"bert-cls": bert_bundle, "llama-lm": llama_lm_bundle}[request.param]
    folder = tmp_path / request.param
    shutil.copytree(source, folder)
    split_bundle(folder, 1, log=lambda m: None)
    return folder


def _candidates(bundle, seed, vary_lower=False):
    """Three adapter vectors that differ only above layer 1 (or also below it)."""
    from edgeft.adapters import layer_of

    base = bundle.layout.flatten(random_adapters(bundle.manifest, seed))
    rng = np.random.default_rng(seed)
    out = [base]
    for _ in range(2):
        c = base.copy()
        for t in bundle.layout.tensors:
            if layer_of(t.name) != 0 or vary_lower:
                s = bundle.layout.slice_of(t.name)
                c[s] += rng.standard_normal(s.stop - s.start).astype(np.float32) * 0.05
        out.append(c)
    return out


@pytest.mark.parametrize("shape", [(2, 7), (3, 11)])
def test_split_matches_whole_graph_at_two_shapes(split_copy, shape):
    from edgeft.runtime import Bundle, CandidateEvaluator

    bundle = Bundle(split_copy)
    feeds = sample_batch(bundle.manifest, 60, *shape, seed=shape[1])
    candidates = _candidates(bundle, seed=shape[0])
    evaluator = CandidateEvaluator(bundle)
    split_losses = evaluator.losses(feeds, candidates)
    assert evaluator.split_passes == 3
    whole = [bundle.run(feeds, c, ["loss"])[0] for c in candidates]
    runner = evaluator._splits[0]
    for c, ref in zip(candidates, whole):
        (loss,) = runner.run(feeds, c, ["loss"])
        np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert len(set(split_losses.tolist())) == 3  # the upper adapters do change the loss


def test_candidates_that_differ_below_the_split_run_the_whole_graph(split_copy):
    from edgeft.runtime import Bundle, CandidateEvaluator

    bundle = Bundle(split_copy)
    feeds = sample_batch(bundle.manifest, 60, 2, 9, seed=1)
    candidates = _candidates(bundle, seed=4, vary_lower=True)
    evaluator = CandidateEvaluator(bundle)
    losses = evaluator.losses(feeds, candidates)
    assert evaluator.split_passes == 0
    assert evaluator.forward_passes == 3
    whole = Bundle(split_copy)
    whole.manifest.splits = []
    np.testing.assert_array_equal(losses, CandidateEvaluator(whole).losses(feeds, candidates))


def test_layerwise_training_uses_the_split(bert_bundle, sentiment_data, tmp_path):
    """Same run with and without the split: the same losses step by step; the split was used."""
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle, TrainConfig, Trainer, make_optimizer

    folder = tmp_path / "b"
    shutil.copytree(bert_bundle, folder)
    split_bundle(folder, 1, log=lambda m: None)
    runs = []
    for path in (bert_bundle, folder):
        bundle = Bundle(path)
        data = load_dataset(sentiment_data, bundle.labels)
        enc = bundle.encode(data.texts, data.labels)
        theta = bundle.layout.flatten(random_adapters(bundle.manifest, 0))
        opt = make_optimizer("dfo-layerwise", theta, layout=bundle.layout, seed=0)
        trainer = Trainer(bundle, enc, opt, TrainConfig(steps=6, batch_size=8, eval_every=100))
        losses = [trainer.step().loss for _ in range(6)]
        runs.append((losses, trainer.evaluator.split_passes))
    (whole, unused), (split, used) = runs
    assert unused == 0 and used > 0
    np.testing.assert_allclose(split, whole, rtol=1e-4)


@pytest.mark.parametrize("at, message", [("0", "above the lowest"), ("7", "choices: 1"), ("x", "not a layer number")])
def test_split_at_a_wrong_layer_is_refused(bert_bundle, tmp_path, at, message):
    folder = tmp_path / "b"
    shutil.copytree(bert_bundle, folder)
    before = (folder / "edgeft.json").read_text()
    result = CliRunner().invoke(main, ["split", str(folder), "--at", at])
    assert result.exit_code == 2
    assert message in result.output
    assert (folder / "edgeft.json").read_text() == before
