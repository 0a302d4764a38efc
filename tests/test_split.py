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
    split_bundle(folder, [1], log=lambda m: None)
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
    whole_graph = Bundle(split_copy, use_segments=False)
    assert bundle._session is None, "a split bundle must not hold the whole graph's weights beside its segments"
    whole = [whole_graph.run(feeds, c, ["loss"])[0] for c in candidates]
    for c, ref in zip(candidates, whole):
        (loss,) = bundle.run(feeds, c, ["loss"])
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
    whole = Bundle(split_copy, use_segments=False)
    np.testing.assert_allclose(losses, CandidateEvaluator(whole).losses(feeds, candidates), rtol=1e-6)


@pytest.fixture(scope="module")
def bert3_bundles(tmp_path_factory, export_bundle_for):
    """A three-layer BERT bundle and its copy cut at layers 1 and 2."""
    from tests.models import tiny_bert

    root = tmp_path_factory.mktemp("bert3")
    whole = export_bundle_for("bert3-cls", tiny_bert(root / "model", layers=3), task="classification",
                              labels=["neg", "pos"], pooling="mean")
    cut = root / "cut"
    shutil.copytree(whole, cut)
    split_bundle(cut, [1, 2], log=lambda m: None)
    return whole, cut


def test_only_segments_above_the_change_run_again(bert3_bundles):
    from edgeft.adapters import layer_of
    from edgeft.runtime import Bundle
    from edgeft.runtime.split import SegmentChain

    whole, cut = (Bundle(p) for p in bert3_bundles)
    chain = SegmentChain(cut)
    runs = [0, 0, 0]
    for i, session in enumerate(chain.sessions):  # count each segment's runs
        chain.sessions[i] = _Counting(session, runs, i)
    feeds = sample_batch(cut.manifest, 60, 3, 10, seed=5)
    base = cut.layout.flatten(random_adapters(cut.manifest, 1))
    # each pair: the base (re-runs what the previous pair changed), then a change in one layer
    for changed_layer, expected_runs in ((2, [1, 1, 2]), (1, [1, 2, 4]), (0, [2, 4, 6])):
        c = base.copy()
        for t in cut.layout.tensors:
            if layer_of(t.name) == changed_layer:
                c[cut.layout.slice_of(t.name)] += 0.1
        for candidate in (base, c):
            (loss,) = chain.run(feeds, candidate, ["loss"])
            np.testing.assert_allclose(loss, whole.run(feeds, candidate, ["loss"])[0], rtol=1e-5, atol=1e-6)
        assert runs == expected_runs, (changed_layer, runs)


class _Counting:
    def __init__(self, session, runs, index):
        self.session, self.runs, self.index = session, runs, index

    def run(self, *args):
        self.runs[self.index] += 1
        return self.session.run(*args)

    def __getattr__(self, name):  # get_inputs, get_outputs, ...
        return getattr(self.session, name)


def test_layerwise_training_uses_the_split(bert3_bundles, sentiment_data):
    """Same run with and without the split: the same losses step by step; the split was used."""
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle, TrainConfig, Trainer, make_optimizer

    runs = []
    for path in bert3_bundles:
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


@pytest.mark.parametrize("at, message", [("0", "above layer 0"), ("7", "adapted layers: 0, 1"), ("x", "not a layer number")])
def test_split_at_a_wrong_layer_is_refused(bert_bundle, tmp_path, at, message):
    folder = tmp_path / "b"
    shutil.copytree(bert_bundle, folder)
    before = (folder / "edgeft.json").read_text()
    result = CliRunner().invoke(main, ["split", str(folder), "--at", at])
    assert result.exit_code == 2
    assert message in result.output
    assert (folder / "edgeft.json").read_text() == before


def test_a_corrupt_segment_file_is_one_error_line(bert_bundle, sentiment_data, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bert_bundle, folder)
    split_bundle(folder, [1], log=lambda m: None)
    (folder / "segments" / "segment-1.onnx").write_bytes(b"not onnx")
    args = ["train", str(folder), "--data", str(sentiment_data), "-o", str(tmp_path / "run"), "--steps", "2",
            "--optimizer", "dfo-layerwise", "--set", "popsize=4", "--batch-size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load graph segment" in errors[0] and "segment-1.onnx" in errors[0]


def test_a_compressed_bundle_drops_the_segments(bert_bundle, tmp_path):
    from edgeft.export.compress import quantize_bundle
    from edgeft.manifest import Manifest

    folder = tmp_path / "b"
    shutil.copytree(bert_bundle, folder)
    split_bundle(folder, [1], log=lambda m: None)
    quantize_bundle(folder, tmp_path / "int8")
    assert Manifest.load(tmp_path / "int8").segments is None
    assert Manifest.load(folder).segments is not None


@pytest.fixture(scope="module")
def top_bundle(export_bundle_for, bert_folder):
    return export_bundle_for("bert-top1", bert_folder, task="classification", labels=["neg", "pos"], pooling="mean",
                             layers="top:1")


def test_export_top_layers_adapts_only_them_and_cuts_below(top_bundle):
    from edgeft.adapters import layer_of
    from edgeft.manifest import Manifest

    manifest = Manifest.load(top_bundle)
    assert {layer_of(t.name) for t in manifest.adapter.tensors} == {1, -1}  # layer 1 of 2, and the head
    assert manifest.segments.cuts == [1] and len(manifest.segments.files) == 2


@pytest.mark.parametrize("shape", [(2, 7), (3, 11)])
def test_top_layer_bundle_split_equals_its_whole_graph(top_bundle, shape):
    from edgeft.runtime import Bundle, CandidateEvaluator

    bundle = Bundle(top_bundle)
    feeds = sample_batch(bundle.manifest, 60, *shape, seed=shape[1])
    candidates = _candidates(bundle, seed=shape[0])
    evaluator = CandidateEvaluator(bundle)
    losses = evaluator.losses(feeds, candidates)
    whole_graph = Bundle(top_bundle, use_segments=False)
    whole = [float(whole_graph.run(feeds, c, ["loss"])[0].astype(np.float64).mean()) for c in candidates]
    np.testing.assert_allclose(losses, whole, rtol=1e-5, atol=1e-6)
    assert evaluator.split_passes == 3


def test_training_a_top_layer_bundle_runs_the_lower_layers_once(top_bundle, sentiment_data, tmp_path):
    """Whole few-shot set per step: the segment below the adapters runs once for the whole run."""
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, starting_adapter
    from tests.models import SENTIMENT

    b = Bundle(top_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta, _ = starting_adapter(b, enc)
    trainer = Trainer(b, enc, MeZO(theta, MeZOConfig(lr=1e-2, eps=1e-2, total_steps=5)),
                      TrainConfig(steps=5, batch_size=len(enc), eval_every=100))
    calls = []
    trainer.fit()
    chain = b.chain
    original = chain.sessions[0].run
    chain.sessions[0] = type("Counting", (), {"run": lambda self, *a, **k: calls.append(1) or original(*a, **k)})()
    for _ in range(3):
        trainer.step()
    assert trainer.evaluator.split_passes == trainer.evaluator.forward_passes == 16
    assert calls == [], "the lower segment ran again although the batch and its inputs were unchanged"


def test_bad_layers_spec_is_a_one_line_error(bert_folder, tmp_path):
    result = CliRunner().invoke(main, ["export", str(bert_folder), "-o", str(tmp_path / "b"), "--labels", "neg,pos",
                                       "--layers", "top:9"])
    assert result.exit_code != 0 and "--layers" in result.output and not (tmp_path / "b").exists()


def test_causal_lm_row_chunks_share_the_lower_segment_across_candidates(llama_lm_bundle, tmp_path, monkeypatch):
    """A causal LM batch run one row at a time: each row's lower segment runs once for all candidates."""
    import importlib

    from edgeft.runtime import Bundle, CandidateEvaluator

    evaluation = importlib.import_module("edgeft.runtime.evaluate")
    folder = tmp_path / "lm"
    shutil.copytree(llama_lm_bundle, folder)
    split_bundle(folder, [1], log=lambda m: None)
    bundle = Bundle(folder)
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET_BYTES", bundle.max_length * bundle.output_shape("logits")[-1] * 4)
    feeds = sample_batch(bundle.manifest, 60, 3, 9, seed=2)
    candidates = _candidates(bundle, seed=3)
    runs = [0, 0]
    for i, session in enumerate(bundle.chain.sessions):
        bundle.chain.sessions[i] = _Counting(session, runs, i)
    losses = CandidateEvaluator(bundle).losses(feeds, candidates)
    assert runs == [3, 9]  # 3 rows: the lower segment once per row, the upper per row and candidate
    whole = CandidateEvaluator(Bundle(folder, use_segments=False)).losses(feeds, candidates)
    np.testing.assert_allclose(losses, whole, rtol=1e-5)
