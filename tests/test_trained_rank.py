"""compress --trained-rank (TRP, forward-only): the fold and the cut against their references at two shapes,
the soft threshold and energy rule, the command end to end, and its bad input."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgeft.adapters import save_adapter
from edgeft.cli import main
from edgeft.export import lord
from edgeft.export.bundle import random_adapters, sample_batch
from edgeft.export.merge import lora_branches
from edgeft.export.trained_rank import _fold_adapters, _truncate, _with_weights
from edgeft.manifest import Manifest
from edgeft.runtime import Bundle


def _run(model, feeds, adapters, output="pooled"):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {**feeds, **adapters})[0]


def _state(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.onnx"))
    manifest = Manifest.load(bundle_dir)
    layers = {init.name: (node, onnx.numpy_helper.to_array(init).astype(np.float64))
              for node, init in lord.linear_weights(model)}
    branches = lora_branches(model, manifest)
    inits = {i.name: i for i in model.graph.initializer}
    weights = {n: w for n, (_, w) in layers.items()} | {
        b.weight: onnx.numpy_helper.to_array(inits[b.weight]).astype(np.float64) for b in branches}
    return model, manifest, layers, branches, weights


def test_fold_adds_the_trained_lora_exactly_at_two_shapes(bert_bundle, tmp_path):
    """Folded weights with LoRA B = 0 compute what the unfolded graph computes with the trained LoRA."""
    model, manifest, layers, branches, weights = _state(bert_bundle)
    assert branches and all(b.weight in weights for b in branches)
    b = Bundle(bert_bundle)
    trained = random_adapters(manifest, seed=3)
    save_adapter(tmp_path / "adapter", b.layout, b.layout.flatten(trained), "", None)
    _fold_adapters(b.layout, 0, tmp_path / "adapter", branches, weights)
    plans, factors = _truncate(layers, weights, set(), None, 0.9, 0.01, last=False)  # nothing cut
    assert not factors
    folded = _with_weights(model, plans, weights)
    restarted = {**trained, **{br.b: np.zeros_like(trained[br.b]) for br in branches}}
    for batch, seq in ((2, 7), (3, 13)):
        feeds = sample_batch(manifest, 60, batch, seq, seed=seq)
        assert np.abs(_run(folded, feeds, restarted) - _run(model, feeds, trained)).max() < 1e-4


def test_cut_soft_thresholds_keeps_the_energy_and_matches_its_reference(bert_bundle):
    model, manifest, layers, _, weights = _state(bert_bundle)
    original = {n: w.copy() for n, w in weights.items()}
    cut = set(list(layers)[::2])
    shrink, energy = 0.05, 0.8
    plans, factors = _truncate(layers, weights, cut, None, energy, shrink, last=True)
    by_weight = {p.weight: p for p in plans}
    assert any(p.compressed for p in plans)
    for name, w in original.items():
        if name not in cut:
            assert np.array_equal(weights[name], w) and not by_weight.get(name).compressed
            continue
        s = np.linalg.svd(w, compute_uv=False)
        soft = np.maximum(s - shrink * s.mean(), 0)
        cumulative = np.cumsum(soft**2) / (soft**2).sum()
        rank = int(np.searchsorted(cumulative, energy - 1e-12) + 1)
        got = np.linalg.svd(weights[name], compute_uv=False)
        assert np.allclose(got[:rank], soft[:rank], atol=1e-8) and np.allclose(got[rank:], 0, atol=1e-8)
        assert by_weight[name].energy >= energy - 1e-9
        assert rank == 1 or cumulative[rank - 2] < energy  # the smallest rank that keeps it
        if by_weight[name].compressed:
            assert by_weight[name].rank == rank
    # the factored graph computes what the same weights held whole compute
    compressed = lord.apply(_with_weights(model, plans, weights), plans, factors)
    whole = _with_weights(model, [lord.LayerPlan(p.node, p.weight, p.shape, min(p.shape), 1.0) for p in plans], weights)
    adapters = random_adapters(manifest, seed=2)
    for batch, seq in ((2, 9), (3, 14)):
        feeds = sample_batch(manifest, 60, batch, seq, seed=seq)
        assert np.abs(_run(compressed, feeds, adapters) - _run(whole, feeds, adapters)).max() < 1e-4


def test_trained_rank_end_to_end(bert_bundle, sentiment_data, tmp_path):
    out = tmp_path / "trp"
    args = ["compress", str(bert_bundle), "-o", str(out), "--trained-rank", "--data", str(sentiment_data), "--energy",
            "0.8", "--folds", "2", "--steps", "6", "--batch-size", "4", "--optimizer", "mezo", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert len(report["folds"]) == 2 and [f["training"]["steps"] for f in report["folds"]] == [3, 3]
    assert report["kept"] < 1 and report["linear_params_after"] < report["linear_params_before"]
    first, second = (f["ranks"] for f in report["folds"])
    assert all(second[w] <= first[w] for w in first)  # a cut never gives rank back
    posthoc, _ = lord.plan(onnx.load(str(bert_bundle / "model.onnx")), energy=0.8)
    assert {p.weight for p in posthoc if p.compressed} >= {l["weight"] for l in report["layers"] if l["compressed"]}
    assert (out / "training" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "training" / "summary.json").is_file()
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data", str(sentiment_data), "--adapter",
                                          report["adapter"], "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert 0 <= json.loads(evaluated.output.strip().splitlines()[-1])["accuracy"] <= 1
    deployed = CliRunner().invoke(main, ["deploy", str(out), "--adapter", report["adapter"], "-o", str(tmp_path / "dep"),
                                         "--merge"])
    assert deployed.exit_code == 0 and "label_agreement 1" in deployed.output, deployed.output


@pytest.mark.parametrize("extra, message", [
    ([], "needs --data"),
    (["--data", "{data}", "--params-ratio", "0.5"], "--params-ratio"),
    (["--data", "{data}", "--steps", "1", "--folds", "2"], "fewer than one step per cut"),
    (["--data", "{data}", "--energy", "1.0"], "no linear layer would be smaller"),
    (["--data", "{data}", "--folds", "0"], "--folds must be at least 1"),
    (["--data", "{data}", "--shrink", "1.5"], "--shrink"),
    (["--data", "{missing}"], "no such file"),
])
def test_trained_rank_bad_input(bert_bundle, sentiment_data, tmp_path, extra, message):
    out = tmp_path / "out"
    args = [a.format(data=sentiment_data, missing=tmp_path / "none.jsonl") for a in extra]
    result = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(out), "--trained-rank", *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_trained_rank_refuses_what_it_cannot_fold_and_keeps_saved_work(bert_bundle, sentiment_data, tmp_path):
    lord_bundle = tmp_path / "lord"
    assert CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(lord_bundle), "--params-ratio", "0.5"]).exit_code == 0
    result = CliRunner().invoke(main, ["compress", str(lord_bundle), "-o", str(tmp_path / "x"), "--trained-rank",
                                       "--data", str(sentiment_data)])
    assert result.exit_code == 2 and "already LoRD-compressed" in result.output
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(taken), "--trained-rank", "--data",
                                       str(sentiment_data)])
    assert result.exit_code == 2 and "not empty" in result.output and (taken / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(tmp_path / "y"), "--energy", "0.8",
                                       "--data", str(sentiment_data)])
    assert result.exit_code == 2 and "needs --trained-rank" in result.output
