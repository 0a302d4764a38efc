"""A causal prompt bundle's exact fit (runtime/prompt_fit.py): the numpy answer logits and their gradient
against ORT and torch autograd, the run that never opens the whole graph, and the manifest's contract."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.manifest import Manifest
from edgeft.runtime import Bundle
from edgeft.runtime.top_blocks import TopBlocksFit
from tests.models import SENTIMENT, record_opened_graphs, torch_prompt_reference


@pytest.fixture(scope="module")
def prompt_bundle(export_bundle_for, workdir):
    """The top 1 of 2 blocks fitted, untied embeddings: the fit runs the graph below the blocks."""
    from tests.models import tiny_llama

    folder = workdir / "tiny-llama-untied"
    return export_bundle_for("llama-prompt-untied-fit1", folder if folder.exists() else tiny_llama(folder, tied=False),
                             task="prompt", labels=["neg", "pos"], template="{text} it was",
                             verbalizer={"neg": "bad", "pos": "good"}, fit_layers=1)


def _feeds(rng, batch, length):
    ids = rng.integers(5, 200, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, length // 2 + 1 :] = 0  # right padding, as Bundle.feeds pads
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 2, size=batch).astype(np.int64)}


def _random_adapter(b, rng):
    return (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)  # every B ≠ 0: dA is not trivially zero


def test_the_bundle_carries_the_label_tokens_and_the_blocks(prompt_bundle, llama_prompt_default):
    m = Manifest.load(prompt_bundle)
    top = m.top_blocks
    assert top.layers == [1] and top.below == "below_top_blocks.onnx" and len(top.label_tokens) == 2
    assert Manifest.load(llama_prompt_default).top_blocks.layers == [0, 1]  # 80% of 2 layers, rounded


@pytest.fixture(scope="module")
def llama_prompt_default(export_bundle_for, llama_folder):
    return export_bundle_for("llama-prompt", llama_folder, task="prompt", labels=["neg", "pos"],
                             template="{text} it was", verbalizer={"neg": "bad", "pos": "good"})


@pytest.mark.parametrize("batch, length", [(2, 7), (3, 12)])
def test_the_answers_equal_the_graphs_pooled_state_and_logits(prompt_bundle, batch, length):
    """ORT on the whole graph against the graph below the blocks + numpy, at two shapes with right padding."""
    alone, whole = Bundle(prompt_bundle, open_graph=False), Bundle(prompt_bundle)
    fit = TopBlocksFit(alone.folder, alone.manifest, alone.below_session)
    rng = np.random.default_rng(length)
    feeds = _feeds(rng, batch, length)
    theta = _random_adapter(alone, rng)
    named = alone.layout.unflatten(theta)
    pooled, logits = whole.run(feeds, theta, ["pooled", "logits"])
    h, z = fit.answers(feeds, fit.entering(feeds, named), named)
    np.testing.assert_allclose(h, pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, logits, rtol=1e-4, atol=1e-4)
    assert alone._session is None


@pytest.mark.parametrize("batch, length, fitted", [(2, 7, None), (3, 11, None), (3, 9, ["q", "v", "gate", "up", "down"])])
def test_the_prompt_gradients_equal_torch_autograd(llama_prompt_default, llama_folder, batch, length, fitted):
    """Both blocks fitted (the lowest one's input is the embeddings); the third case fits q, v too (the
    gradient reaching the earlier positions through attention, RoPE and the grouped KV heads)."""
    b = Bundle(llama_prompt_default)
    top = b.manifest.top_blocks
    if fitted:
        top.fitted = fitted
    fit = TopBlocksFit(b.folder, b.manifest)
    rng = np.random.default_rng(batch * length)
    feeds = _feeds(rng, batch, length)
    named = b.layout.unflatten(_random_adapter(b, rng))
    names = ["output.weight", "output.bias", *fit.tensor_names()]
    got = {n: np.zeros(named[n].shape) for n in names}
    summed = fit.accumulate_answers(feeds, fit.entering(feeds, named), named, got)
    total, want = torch_prompt_reference(llama_folder, b.manifest, feeds, {k: np.array(v) for k, v in named.items()},
                                         top.label_tokens)
    np.testing.assert_allclose(summed, total, rtol=1e-4)
    for name in names:
        scale = np.abs(want[name]).max()
        assert scale > 1e-7, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.fixture
def sentiment_file(tmp_path):
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in SENTIMENT))
    return path


def test_the_default_prompt_run_fits_without_the_whole_graph(prompt_bundle, sentiment_file, tmp_path, monkeypatch):
    """edgeft train's default recipe with a budget: the probe, the fit, its held-out scoring and the trainer's
    ranking run without model.onnx; the kept adapter scores on the whole graph as the fit said."""
    from edgeft.adapters import load_adapter
    from edgeft.runtime import evaluate
    from edgeft.training import TrainRequest, run_training

    opened = record_opened_graphs(monkeypatch)
    summary = run_training(TrainRequest(prompt_bundle, sentiment_file, tmp_path / "run", eval_data=sentiment_file,
                                        budget="30fwd", eval_every=5, progress=False), log=lambda m: None)
    assert opened == ["below_top_blocks.onnx"], opened
    fit = summary["output_fit"]
    assert fit["kind"].startswith("label-word probe + LoRA on the top 1 blocks")
    assert fit["forward_passes"] == 30 and fit["steps"] == 29 and summary["steps"] == 0
    assert fit["train_loss_last"] < fit["train_loss_first"]
    from edgeft.runtime.trainer import rank_key

    assert fit["kept"] == (rank_key("prompt", fit["eval_after"], True) > rank_key("prompt", fit["eval_before"], True))
    # the kept point calibrated on the held-out data: the same predictions, a loss no higher than its raw one
    raw = next(e for e in fit["evals"] if e["step"] == fit["best_step"])
    assert fit["eval_after"]["accuracy"] == raw["accuracy"] and fit["eval_after"]["loss"] <= raw["loss"] + 1e-9
    assert fit["temperature"] > 0
    b = Bundle(prompt_bundle)
    kept = load_adapter(tmp_path / "run" / "adapter", b.layout, base=b.layout.initial(0))
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    graph = evaluate(b, kept, enc, 32)
    assert graph["accuracy"] == summary["best"]["accuracy"]
    np.testing.assert_allclose(graph["loss"], summary["best"]["loss"], rtol=1e-4)


def test_a_prompt_run_without_held_out_data_keeps_its_last_point_scored_without_the_whole_graph(
        prompt_bundle, sentiment_file, tmp_path, monkeypatch):
    """No --eval-data: the fit's last point, scored on the training set by the fit itself (the trainer ranks on that
    set and must not open model.onnx for it); the whole graph scores the saved adapter the same on that set."""
    from edgeft.adapters import load_adapter
    from edgeft.runtime import evaluate
    from edgeft.training import TrainRequest, run_training

    opened = record_opened_graphs(monkeypatch)
    summary = run_training(TrainRequest(prompt_bundle, sentiment_file, tmp_path / "run", budget="12fwd",
                                        progress=False), log=lambda m: None)
    assert opened == ["below_top_blocks.onnx"], opened
    fit = summary["output_fit"]
    assert fit["steps"] == 11 and fit["best_step"] == 11 and "eval_after" not in fit and summary["steps"] == 0
    b = Bundle(prompt_bundle)
    kept = load_adapter(tmp_path / "run" / "adapter", b.layout, base=b.layout.initial(0))
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    graph = evaluate(b, kept, enc, 32)
    assert graph["accuracy"] == summary["best"]["accuracy"] == fit["train_after"]["accuracy"]
    np.testing.assert_allclose(graph["loss"], summary["best"]["loss"], rtol=1e-4)


def test_the_prompt_fit_lowers_the_loss_and_is_deterministic(prompt_bundle):
    from edgeft.runtime.prompt_fit import PromptFitConfig, fit_prompt

    b = Bundle(prompt_bundle, open_graph=False)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    runs = [fit_prompt(b, enc, b.layout.initial(0), 4, seed=3, config=PromptFitConfig(steps=13, lr=1e-2)) for _ in range(2)]
    (theta, losses, info), (again, _, _) = runs
    assert len(losses) == 10 and info["forward_passes"] == 13  # 3 batches for the probe's pass, then 10 steps
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert theta.tobytes() == again.tobytes()
    moved = {t.name for t in b.layout.tensors if np.any(b.layout.unflatten(theta)[t.name] != b.layout.unflatten(b.layout.initial(0))[t.name])}
    assert moved == {"output.weight", "output.bias", *TopBlocksFit(b.folder, b.manifest, b.below_session).tensor_names()}


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


@pytest.mark.parametrize("tokens, message", [([1], "one token id per label"), ([1, -2], "one token id per label"),
                                             (None, "every prompt bundle's top_blocks has it"),
                                             ([1, 99999], "not rows of its LM head")])
def test_bad_label_tokens_are_refused(prompt_bundle, tmp_path, tokens, message):
    target = _copy(prompt_bundle, tmp_path)
    raw = json.loads((target / "edgeft.json").read_text())
    raw["top_blocks"]["label_tokens"] = tokens
    (target / "edgeft.json").write_text(json.dumps(raw))
    with pytest.raises(EdgeftError, match=message):
        b = Bundle(target, open_graph=False)
        TopBlocksFit(b.folder, b.manifest)


def test_the_plan_of_a_prompt_bundle_probes_its_fit(prompt_bundle, sentiment_file, tmp_path):
    """edgeft plan (default recipe) probes the prompt fit (the graph below the blocks and numpy), within 15% of a
    budgeted run's peak."""
    import subprocess
    import sys

    from edgeft.runtime.plan import plan_memory

    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "train", str(prompt_bundle), "--data", str(sentiment_file),
                             "-o", str(tmp_path / "run"), "--budget", "4fwd", "--batch-size", "4", "--eval-data",
                             str(sentiment_file), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    plan = plan_memory(prompt_bundle, None, 4)
    assert {p["path"] for p in plan.probes} == {"fit", "eval"}
    assert abs(plan.predicted_train_peak_rss_mb - measured) <= 0.15 * measured, (plan.predicted_train_peak_rss_mb, measured)


def test_the_kept_point_is_calibrated_without_changing_a_prediction(prompt_bundle):
    """With held-out data the returned adapter's logits (the whole graph's) are the kept step's times the chosen
    temperature: the same predictions, the held-out loss at that temperature."""
    from edgeft.runtime.prompt_fit import PromptFitConfig, fit_prompt

    b = Bundle(prompt_bundle, open_graph=False)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta, losses, info = fit_prompt(b, enc, b.layout.initial(0), 12, seed=1, config=PromptFitConfig(steps=9, lr=1e-2),
                                     held_out=enc, eval_every=4)
    assert info["kept"] and info["temperature"] != 1.0, info  # 12 examples it trains on: the fit beats zero-shot there
    raw = dict(info["evals"])[info["best_step"]]
    whole = Bundle(prompt_bundle)
    (logits,) = whole.run(whole.feeds(enc, np.arange(len(enc))), theta, ["logits"])
    from edgeft.runtime.evaluate import classification_metrics

    got = classification_metrics(logits, enc.labels)
    assert got["accuracy"] == raw["accuracy"] == info["returned"]["accuracy"]
    np.testing.assert_allclose(got["loss"], info["returned"]["loss"], rtol=1e-4)
    assert info["returned"]["loss"] <= raw["loss"] + 1e-9
